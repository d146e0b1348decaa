"""Shard format and the dataset tool: round trips, bad inputs, interrupted writes, the CLI."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pof3d.camera import intrinsics, pose_to_cam2world, to_label
from pof3d.data import shards
from pof3d.data.__main__ import main
from pof3d.data.convert import convert
from pof3d.data.shard_reader import iter_rows, load_arrays, read_manifest, verify
from pof3d.data.shards import ShardWriter
from pof3d.errors import DataError


def _image_bytes(rng: np.random.Generator, size: int = 16, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _poses(n: int) -> torch.Tensor:
    return torch.tensor([[1.0 + i / 10, 1.5 - i / 20] for i in range(n)], dtype=torch.float64)


def _labels(names: list[str]) -> dict:
    """EG3D-style dataset.json: the faces camera at pose :func:`_poses` ``[i]`` for file i."""
    cam2world = pose_to_cam2world(_poses(len(names)), 2.7, (0.0, 0.0, 0.2))
    labels = to_label(cam2world, intrinsics(4.26, len(names)).double())
    return {"labels": [[n, label.tolist()] for n, label in zip(names, labels, strict=True)]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Nested folder: PNGs, a JPEG, a grayscale PNG, and dataset.json labels for all of them."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {
        "a.png": _image_bytes(rng),
        "sub/b.png": _image_bytes(rng),
        "sub/c.jpg": _image_bytes(rng, fmt="JPEG"),
        "d.png": _image_bytes(rng, mode="L"),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "dataset.json").write_text(json.dumps(_labels(sorted(files))))
    return src


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_folder_round_trip_is_bit_exact_and_keeps_labels(folder: Path, tmp_path: Path):
    out = convert(folder, tmp_path / "out")
    manifest = read_manifest(str(out))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*") if p.name != "dataset.json")
    assert manifest["rows"] == len(names) and manifest["resolution"] == 16 and manifest["has_label"]
    labels = dict(_labels(names)["labels"])
    raw = {r["source"]: r for r in pq.read_table(out / manifest["shards"][0]["file"]).to_pylist()}
    for row in iter_rows(str(out)):
        original = (folder / row["source"]).read_bytes()
        assert raw[row["source"]]["image"] == original  # bytes stored as given, not re-encoded
        np.testing.assert_array_equal(row["image"], _pixels(original))
        np.testing.assert_array_equal(row["label"], np.float32(labels[row["source"]]))
        pose = _poses(len(names))[names.index(row["source"])].numpy()
        np.testing.assert_allclose(row["pose"], pose, atol=1e-6)  # the label's camera, as (h, v)
        assert row["depth"] is None
    assert {r["source"] for r in iter_rows(str(out), ["source"])} == set(names)
    assert raw["sub/c.jpg"]["format"] == "jpeg"
    arrays = load_arrays(str(out), limit=3)
    assert (
        arrays["image"].shape == (3, 16, 16, 3)
        and np.isfinite(arrays["pose"]).all()
        and "depth" not in arrays
    )
    assert verify(str(out)) == {"rows": 4, "shards": 1, "skipped": 0}


def test_zip_with_dataset_json_and_resize(folder: Path, tmp_path: Path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    out = convert(archive, tmp_path / "out", resolution=8)
    rows = list(iter_rows(str(out)))
    assert len(rows) == 4 and all(r["image"].shape == (8, 8, 3) for r in rows)
    expected = np.asarray(
        Image.open(folder / "a.png").convert("RGB").resize((8, 8), Image.Resampling.LANCZOS)
    )
    np.testing.assert_array_equal(next(r for r in rows if r["source"] == "a.png")["image"], expected)
    assert all(r["label"] is not None for r in rows)


def test_many_shards_and_row_ids(tmp_path: Path):
    rng = np.random.default_rng(1)
    writer = ShardWriter(tmp_path / "s", 16, shard_mb=2000 / 2**20)  # ~2 kB shards
    images = [_image_bytes(rng) for _ in range(10)]
    for i, data in enumerate(images):
        writer.add(data, "png", 16, 16, f"img{i}", pose=np.array([1.0, 2.0]) * i)
    writer.close()
    manifest = read_manifest(str(tmp_path / "s"))
    assert len(manifest["shards"]) > 2 and sum(s["rows"] for s in manifest["shards"]) == 10
    rows = list(iter_rows(str(tmp_path / "s"), ["id", "image", "pose"]))
    assert [r["id"] for r in rows] == list(range(10))
    for r in rows:
        np.testing.assert_array_equal(r["image"], _pixels(images[r["id"]]))
        np.testing.assert_allclose(r["pose"], [r["id"], 2.0 * r["id"]])


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


BAD_CASES = {
    "truncated": ({"bad.png": lambda good: good[: len(good) // 2]}, "truncated"),
    "not_image": ({"notes.txt": lambda good: b"hello"}, "not an image"),
    "mixed_size": (
        {"z_big.png": lambda good: _image_bytes(np.random.default_rng(5), size=24)},
        "expected 16x16",
    ),
    "not_square": ({"wide.png": lambda good: _wide()}, "not square"),
}


def _wide() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_image_errors_name_the_file_and_skip_bad_counts(case: str, tmp_path: Path):
    rng = np.random.default_rng(2)
    good = {f"ok{i}.png": _image_bytes(rng) for i in range(3)}
    bad, expected = BAD_CASES[case]
    src = _write(tmp_path / "src", {**good, **{k: f(good["ok0.png"]) for k, f in bad.items()}})
    bad_name = next(iter(bad))
    with pytest.raises(DataError, match=expected) as err:
        convert(src, tmp_path / "out")
    assert bad_name in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()

    out = convert(src, tmp_path / "out2", skip_bad=True)
    manifest = read_manifest(str(out))
    assert manifest["rows"] == 3
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["items"][0]["name"] == bad_name


def test_label_file_mismatches(tmp_path: Path):
    rng = np.random.default_rng(3)
    names = ["a.png", "b.png", "c.png"]
    src = _write(tmp_path / "src", {n: _image_bytes(rng) for n in names})
    # A label for a file that is not there, one image without a label, one label of the wrong length.
    labels = _labels(["a.png", "ghost.png"])
    labels["labels"].append(["c.png", [1.0, 2.0]])
    (src / "dataset.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match="ghost.png"):
        convert(src, tmp_path / "o1")
    labels["labels"] = [e for e in labels["labels"] if e[0] != "ghost.png"]
    (src / "dataset.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match=r"b\.png: has no entry in dataset.json"):
        convert(src, tmp_path / "o2")
    labels["labels"].append(["b.png", _labels(["b.png"])["labels"][0][1]])
    (src / "dataset.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match="label of c.png .*expected 25"):
        convert(src, tmp_path / "o3")
    out = convert(src, tmp_path / "o4", skip_bad=True)
    assert read_manifest(str(out))["skipped"]["count"] == 1 and read_manifest(str(out))["rows"] == 2
    (src / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        convert(src, tmp_path / "o5")


def test_empty_source_and_missing_source(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="no such folder"):
        convert(tmp_path / "nope", tmp_path / "out")
    _write(tmp_path / "allbad", {"x.txt": b"x"})
    with pytest.raises(DataError, match="every one of 1 inputs was bad"):
        convert(tmp_path / "allbad", tmp_path / "out", skip_bad=True)


def test_crash_during_shard_write_leaves_nothing_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(4)
    real_write = pq.write_table

    def crash_half_way(table, where, **kwargs):  # a process dying mid-write: half a file, then gone
        real_write(table, where, **kwargs)
        data = Path(where).read_bytes()
        Path(where).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed")

    out = tmp_path / "s"
    writer = ShardWriter(out, 16, shard_mb=1500 / 2**20)
    writer.add(_image_bytes(rng), "png", 16, 16, "first")
    writer.add(_image_bytes(rng), "png", 16, 16, "second")  # cuts shard 0 (complete)
    monkeypatch.setattr(shards.pq, "write_table", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        writer.add(_image_bytes(rng), "png", 16, 16, "third")
        writer.add(_image_bytes(rng), "png", 16, 16, "fourth")
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]  # the torn one is a .tmp
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(out))
    with pytest.raises(DataError, match="no manifest.json"):
        list(iter_rows(str(out)))


def test_stray_and_corrupt_shards(tmp_path: Path):
    rng = np.random.default_rng(6)
    out = tmp_path / "s"
    writer = ShardWriter(out, 16)
    for i in range(3):
        writer.add(_image_bytes(rng), "png", 16, 16, f"i{i}")
    writer.close()
    # A torn shard of a later, interrupted write and an unlisted shard are not picked up.
    (out / ".part-00001.parquet.tmp").write_bytes(b"PAR1 torn")
    (out / "part-00007.parquet").write_bytes((out / "part-00000.parquet").read_bytes())
    assert len(list(iter_rows(str(out), ["id"]))) == 3
    assert verify(str(out))["rows"] == 3
    shard = out / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 differs"):
        verify(str(out))
    # A new write into the directory removes the old manifest first: a crash then leaves no valid set.
    with pytest.raises(DataError, match="already holds a shard set"):
        ShardWriter(out, 16)
    ShardWriter(out, 16, overwrite=True)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(out))


def test_manifest_of_another_version_is_refused(tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pof3d-shards", "schema_version": 99}))
    with pytest.raises(DataError, match="schema_version 99"):
        read_manifest(str(tmp_path))


def test_cli_convert_inspect_verify_and_exit_codes(folder: Path, tmp_path: Path, capsys):
    (folder / "junk.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    assert main(["convert", str(folder), "--out", str(out)]) == 2
    assert "junk.bin" in capsys.readouterr().err
    assert main(["convert", str(folder), "--out", str(out), "--skip-bad"]) == 0
    assert "skipped 1 bad inputs" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert '"schema_version": 1' in text and "row 0:" in text
    assert main(["verify", str(out)]) == 0
    assert "verified 4 rows" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", "--out", str(tmp_path / "x"), "--poses", "birds"])
    assert exit_info.value.code == 2
