"""The README's state diagram is the one `transitions` draws from machine.py's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from callstate import machine
from callstate.diagram import BEGIN, END, main, mermaid, with_diagram
from callstate.schema import CALL_STATUSES

README = Path(__file__).resolve().parents[2] / "README.md"


def moves(diagram: str) -> set[tuple[str, str]]:
    """The (from, to) pairs the diagram draws."""
    pairs = set()
    for line in diagram.splitlines():
        if " --> " in line:
            source, rest = line.strip().split(" --> ")
            pairs.add((source, rest.split(":")[0]))
    return pairs


def test_the_readme_holds_the_diagram_of_the_table() -> None:
    text = README.read_text("utf-8")
    assert with_diagram(text, mermaid()) == text, (
        "README.md's state diagram differs from callstate/machine.py's table: run "
        "`python -m callstate.diagram --write README.md`"
    )


def test_the_diagram_draws_every_move_of_the_table_and_no_other() -> None:
    expected = {("[*]", machine.NEW)} | {(machine.NEW, status) for status in CALL_STATUSES}
    expected |= {(source, dest) for source, dests in machine.TABLE.items() for dest in dests}
    assert moves(mermaid()) == expected


def test_a_changed_table_changes_the_diagram_and_fails_the_readme_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = README.read_text("utf-8")
    monkeypatch.setitem(machine.TABLE, "answered", ("agentEnded", "ended", "ringing"))
    assert ("answered", "ringing") in moves(mermaid())
    assert with_diagram(readme, mermaid()) != readme


def test_write_replaces_only_the_block_keeping_its_indent(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    before, after = "# Title\n\n1. Item:\n\n", "\n   More of the item.\n"
    path.write_text(f"{before}   {BEGIN}\n   stale\n   {END}{after}")
    assert main(["--write", str(path)]) == 0
    written = path.read_text()
    assert written.startswith(f"{before}   {BEGIN}\n   ```mermaid\n")
    assert written.endswith(f"   ```\n   {END}{after}")
    assert "stale" not in written
    assert "   stateDiagram-v2\n" in written
    assert main(["--write", str(path)]) == 0
    assert path.read_text() == written


def test_write_refuses_a_file_without_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    path.write_text("no diagram here\n")
    with pytest.raises(ValueError, match="state-diagram:begin"):
        main(["--write", str(path)])
    assert path.read_text() == "no diagram here\n"


def test_the_module_prints_the_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == mermaid() + "\n"
