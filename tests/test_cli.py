"""Finding one's way in the command lines: console scripts, preset summaries, documented config fields."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from pof3d import train
from pof3d.config import Config
from pof3d.config_fields import config_fields, field_docs, format_fields
from pof3d.errors import ConfigError
from pof3d.presets import PRESETS, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_has_a_console_script() -> None:
    assert set(SCRIPTS) == {"pof3d-train", "pof3d-data", "pof3d-evaluate", "pof3d-generate", "pof3d-sweep"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_resolves_and_shows_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, function = SCRIPTS[script].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_train_help_describes_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for name, entry in PRESETS.items():
        assert f"  {name} " in out and entry.summary in out


def test_every_config_field_is_documented_where_it_is_defined() -> None:
    undocumented = [f.path for f in config_fields(Config()) if not f.doc]
    assert not undocumented, f"fields without a #: doc comment: {undocumented}"


def test_field_docs_are_the_doc_comments_only() -> None:
    from pof3d.config import LossConfig, ModelConfig

    # A trailing #: comment; #: lines above a field, joined; a plain # heading is not a field's doc.
    assert field_docs(LossConfig)["pose_gd_weight"] == "pulls the pose learner toward D's pose prediction"
    assert field_docs(LossConfig)["double_blur"].startswith("while the blur fades, a pose-aware D predicts")
    assert "Mapping network" not in field_docs(ModelConfig)["z_dim"]


def test_list_fields_shows_path_type_preset_value_and_doc(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # docs wrap at the terminal's width, narrower under xdist
    assert train.main(["--preset", "tiny", "--list-fields", "train", "--set", "train.kimg=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kimg = next(line for line in lines if line.startswith("train.kimg "))
    assert kimg.split()[:3] == ["train.kimg", "float", "3.0"]
    assert "thousands of real images" in kimg
    assert not any(line.startswith("loss.") for line in lines)


def test_list_fields_shows_the_values_of_a_saved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "config.json"
    saved.write_text(load_config("tiny", ["loss.r1_gamma=7.5"]).to_json())
    assert train.main(["--config", str(saved), "--kimg", "2", "--list-fields"]) == 0
    out = capsys.readouterr().out
    assert f"values of --config {saved}" in out.splitlines()[0]
    value = {
        line.split()[0]: line.split()[2] for line in out.splitlines() if line.startswith(("loss.", "train."))
    }
    assert value["loss.r1_gamma"] == "7.5" and value["train.kimg"] == "2.0"  # the file's, then the flag


def test_list_fields_refuses_a_preset_and_a_config_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "config.json"
    saved.write_text(load_config("tiny").to_json())
    assert train.main(["--preset", "tiny", "--config", str(saved), "--list-fields"]) == 2
    assert "--config and --preset both name the base config" in capsys.readouterr().err


def test_list_fields_of_an_unknown_section_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--list-fields", "los"]) == 2
    assert "unknown config section 'los'; expected one of model, loss" in capsys.readouterr().err


def test_a_wrong_set_path_points_to_the_field_list() -> None:
    with pytest.raises(ConfigError, match=r"valid fields of loss: r1_gamma.*pof3d.train --list-fields loss"):
        load_config("tiny", ["loss.symetry_weight=0"])


def test_field_table_wraps_long_docs_under_their_column() -> None:
    text = format_fields(config_fields(load_config("tiny"), "loss"), width=100)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    start = lines[0].index("weight of D's R1")
    continued = [line for line in lines if line.startswith(" ")]
    assert continued and all(line[:start].strip() == "" and line[start] != " " for line in continued)
