"""The README's set-up and test commands are exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(heading: str, text: str) -> str:
    match = re.search(rf"## {heading}\n+```bash\n(.+?)\n```", text, flags=re.S)
    assert match, f"README.md has no bash block under '## {heading}'"
    return match.group(1).strip()


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for heading in ("Set-up command", "Test command"):
        command = _command_after(heading, readme)
        assert command in ci_lines, f"{heading} of README.md is not a line of .ci/run: {command}"


def test_readme_main_command_is_the_training_entry_point() -> None:
    readme = (ROOT / "README.md").read_text()
    assert _command_after("Main command", readme) == ".venv/bin/python -m pof3d.train"
