"""The README's state diagram, drawn as Mermaid from machine.py's table by `transitions`.

`python -m callstate.diagram` prints it; `--write README.md` replaces the block between the
markers with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transitions.extensions import GraphMachine
from transitions.extensions.diagrams_mermaid import Graph

from callstate.machine import definition

BEGIN = "<!-- state-diagram:begin -->"
END = "<!-- state-diagram:end -->"
# transitions writes its title as the whole front matter; written as `title: ...`, Mermaid
# shows it above the diagram.
TITLE = "title: A call's status (callstate/machine.py)"


def mermaid() -> str:
    """The call machine as a Mermaid `stateDiagram-v2`, from the table it enforces now."""
    machine = GraphMachine(graph_engine="mermaid", title=TITLE, **definition())
    # A graph of the machine alone, not of a model: no state is styled as the current one.
    # (transitions' stub asks for the class; the engine takes the machine, as its base's does.)
    return Graph(machine).get_graph().source  # type: ignore[arg-type]


def with_diagram(text: str, diagram: str) -> str:
    """`text` with the block between the markers replaced by `diagram` in a ```mermaid fence,
    indented as the begin marker is (the README's diagram sits in a list item)."""
    start = text.find(BEGIN)
    end = text.find(END, start)
    if start < 0 or end < 0:
        raise ValueError(f"no {BEGIN} ... {END} block")
    line_start = text.rfind("\n", 0, start) + 1
    indent = text[line_start:start]
    lines = ["```mermaid", *diagram.splitlines(), "```"]
    block = "".join(f"{indent}{line}".rstrip() + "\n" for line in lines)
    return f"{text[: start + len(BEGIN)]}\n{block}{indent}{text[end:]}"


def write(path: Path) -> bool:
    """Rewrite the diagram block of the file at `path`; whether it changed."""
    text = path.read_text("utf-8")
    updated = with_diagram(text, mermaid())
    if updated != text:
        path.write_text(updated, "utf-8")
    return updated != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m callstate.diagram",
        description="Print the call state diagram (Mermaid), drawn from callstate/machine.py.",
    )
    parser.add_argument(
        "--write",
        metavar="FILE",
        type=Path,
        help=f"replace the block between {BEGIN} and {END} in FILE instead of printing",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        print(mermaid())
        return 0
    changed = write(args.write)
    print(f"{args.write}: state diagram {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
