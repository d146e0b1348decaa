"""benchmarks/launch.py's choices: launches alternate between controller intervals or a field's values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "launch.py"


def _launch_script():
    spec = importlib.util.spec_from_file_location("launch_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launches_alternate_between_intervals_or_the_values_of_one_field(capsys) -> None:
    script = _launch_script()
    assert script.parse_args([]).variants == [("2", 2.0, []), ("0.5", 0.5, [])]
    args = script.parse_args(["--intervals", "1,0.5", "--alternate", "data.decode_tasks=0,1"])
    # Each value is one variant's --set, at the last interval.
    assert args.variants == [
        ("data.decode_tasks=0", 0.5, ["data.decode_tasks=0"]),
        ("data.decode_tasks=1", 0.5, ["data.decode_tasks=1"]),
    ]
    with pytest.raises(SystemExit):
        script.parse_args(["--alternate", "data.decode_tasks"])
    assert "--alternate 'data.decode_tasks': expected SECTION.FIELD=V1,V2" in capsys.readouterr().err
