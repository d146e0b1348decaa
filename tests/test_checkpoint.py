"""Checkpoints: round trip, atomic replacement, weights_only refusal, clear errors, latest lookup."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pof3d.checkpoint import (
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pof3d.errors import CheckpointError
from pof3d.presets import load_config


def _trained_pair(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return model, opt


def _save(path: Path, seed: int = 0, images_seen: int = 100, step: int = 1) -> tuple[Path, nn.Module]:
    model, opt = _trained_pair(seed)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(), "step": step}
    progress = {"images_seen": images_seen, "step": step, "tick": 0}
    return save_checkpoint(path, state, load_config("tiny"), progress), model


def _rewrite_manifest(ckpt: Path) -> None:
    """Make the manifest agree with the files again, as someone writing a malicious checkpoint would."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_model_optimiser_rng(tmp_path: Path) -> None:
    ckpt, model = _save(tmp_path / "ck", seed=1, images_seen=640, step=80)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "manifest.json",
        "progress.json",
        "state.pt",
    ]
    cfg, state, progress = load_checkpoint(ckpt)
    assert cfg.to_dict() == load_config("tiny").to_dict()
    assert progress == {"images_seen": 640, "step": 80, "tick": 0}

    restored, restored_opt = _trained_pair(seed=2)
    restored.load_state_dict(state["model"])
    restored_opt.load_state_dict(state["opt"])
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 4)
    restored.eval(), model.eval()
    assert torch.equal(model(x), restored(x))
    assert restored_opt.state_dict()["param_groups"][0]["betas"] == (0.0, 0.99)
    assert state["step"] == 80

    # RNG: restoring the saved state replays exactly the same draws in every generator.
    set_rng_state(state["rng"])
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_rng_state_continues_the_sequence(tmp_path: Path) -> None:
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ckpt = save_checkpoint(tmp_path / "rng", {"rng": rng_state()}, load_config("tiny"), {})
    expected = (random.getrandbits(64), np.random.randint(1 << 30), torch.randint(1 << 30, (4,)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(ckpt)[1]["rng"])
    assert random.getrandbits(64) == expected[0]
    assert np.random.randint(1 << 30) == expected[1]
    assert torch.equal(torch.randint(1 << 30, (4,)), expected[2])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, model = _save(tmp_path / "ck", seed=1, images_seen=100)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:50])  # half-written file
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "ck", seed=2, images_seen=200)
    monkeypatch.undo()

    _, state, progress = load_checkpoint(ckpt)
    assert progress["images_seen"] == 100
    assert all(
        torch.equal(a, b) for a, b in zip(state["model"].values(), model.state_dict().values(), strict=True)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directory left behind
    assert latest_checkpoint(tmp_path) == ckpt


def test_overwrite_replaces_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path / "ck", seed=1, images_seen=100)
    ckpt, model = _save(tmp_path / "ck", seed=2, images_seen=200)
    _, state, progress = load_checkpoint(ckpt)
    assert progress["images_seen"] == 200
    assert torch.equal(state["model"]["0.weight"], model.state_dict()["0.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_leftover_temp_dir_is_never_picked(tmp_path: Path) -> None:
    run = tmp_path / "run" / "checkpoints"
    good, _ = _save(run / "checkpoint_000001", images_seen=100)
    # A crash after the files were written but before the rename leaves a complete-looking hidden dir.
    shutil.copytree(good, run / ".checkpoint_000002.tmp-deadbeef")
    progress = run / ".checkpoint_000002.tmp-deadbeef" / "progress.json"
    progress.write_text(json.dumps({"images_seen": 999, "step": 9}))
    _rewrite_manifest(progress.parent)
    # A partial copy (e.g. an interrupted upload) of a newer checkpoint: state.pt truncated.
    partial = run / "checkpoint_000003"
    shutil.copytree(good, partial)
    (partial / "progress.json").write_text(json.dumps({"images_seen": 500, "step": 5}))
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["files"]["progress.json"]["bytes"] = (partial / "progress.json").stat().st_size
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "state.pt").write_bytes((good / "state.pt").read_bytes()[:100])
    assert not is_complete(partial)
    assert latest_checkpoint(tmp_path / "run") == good
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(partial)


def test_latest_orders_by_progress(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nothing") is None
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path / "checkpoint_b", images_seen=300, step=3)
    newest, _ = _save(tmp_path / "checkpoint_a", images_seen=900, step=9)
    _save(tmp_path / "checkpoint_c", images_seen=600, step=6)
    assert latest_checkpoint(tmp_path) == newest
    with pytest.raises(CheckpointError, match="run directory, its newest checkpoint is .*checkpoint_a"):
        load_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_python_object_is_refused(tmp_path: Path) -> None:
    ckpt, _ = _save(tmp_path / "ck")
    torch.save({"model": {}, "payload": _Payload()}, ckpt / "state.pt")
    _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be read .*Unsupported global"):
        load_checkpoint(ckpt)
    # A plain pickle (another protocol) is refused as well.
    with (ckpt / "state.pt").open("wb") as f:
        pickle.dump({"payload": _Payload()}, f, protocol=4)
    _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be read"):
        load_checkpoint(ckpt)
    assert not _Payload.ran


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return None


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.*not found"):
        load_checkpoint(tmp_path / "nowhere")
    ckpt, _ = _save(tmp_path / "ck")
    for name in ("state.pt", "config.json", "progress.json", "manifest.json"):
        broken = tmp_path / f"missing_{name}"
        shutil.copytree(ckpt, broken)
        (broken / name).unlink()
        with pytest.raises(CheckpointError, match=rf"missing_{name}/{name}: missing"):
            load_checkpoint(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    data = bytearray((corrupt / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt/state\.pt: SHA-256"):
        load_checkpoint(corrupt)
    _rewrite_manifest(corrupt)
    (corrupt / "state.pt").write_bytes(b"not a torch file at all")
    _rewrite_manifest(corrupt)
    with pytest.raises(CheckpointError, match=r"corrupt/state\.pt: cannot be read as a weights-only"):
        load_checkpoint(corrupt)


def test_config_of_another_schema(tmp_path: Path) -> None:
    ckpt, _ = _save(tmp_path / "ck")
    data = json.loads((ckpt / "config.json").read_text())
    data["model"]["renamed_field"] = 3
    (ckpt / "config.json").write_text(json.dumps(data))
    _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"config\.json: does not fit.*renamed_field"):
        load_checkpoint(ckpt)


def test_save_refuses_non_tensor_state(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['arr'\].*numpy"):
        save_checkpoint(tmp_path / "ck", {"extra": {"arr": np.zeros(3)}}, cfg, {})
    with pytest.raises(CheckpointError, match="progress.json"):
        save_checkpoint(tmp_path / "ck", {}, cfg, {"when": object()})
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []
