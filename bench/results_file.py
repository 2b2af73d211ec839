"""Where every benchmark writes its figures: `bench/results/<kind>-<UTC stamp>.json`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_figures(kind: str, figures: dict[str, Any], out: Path | None = None) -> Path:
    """Write `figures` as JSON to `out`, or to a new stamped file of `kind`; return the path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out or RESULTS / f"{kind}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path
