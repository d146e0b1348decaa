"""EG3D-style camera labels become ground-truth poses: convert fills the pose column, bad labels are
named, and evaluation measures pose error and JS against those poses."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pof3d.camera import intrinsics, pose_to_cam2world, to_label
from pof3d.data.convert import convert
from pof3d.data.shard_reader import iter_rows, read_manifest
from pof3d.discriminator import Discriminator
from pof3d.errors import DataError
from pof3d.generator import Generator
from pof3d.metrics import evaluate_generator
from pof3d.metrics.pose import constant_guess_error_deg
from pof3d.presets import load_config

# ShapeNet-cars-like cameras: all around the car, some right next to the poles.
POSES = np.array(
    [[0.1, 1.5], [1.7, 1.2], [3.1, 2.0], [4.4, 1e-3], [5.9, math.pi - 1e-3], [6.2, 0.7]], dtype=np.float64
)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, bad_label: list[float] | None = None) -> Path:
    """An EG3D-style zip: images in a subfolder, dataset.json with the cars camera at :data:`POSES`;
    with ``bad_label``, one more image whose label is that."""
    m = load_config("cars128").model
    cam2world = pose_to_cam2world(torch.from_numpy(POSES), m.camera_radius, m.pivot)
    labels = to_label(cam2world, intrinsics(m.focal, len(POSES)).double()).float()  # float32, as EG3D's
    entries = [[f"00000/img{i:08d}.png", label.tolist()] for i, label in enumerate(labels)]
    if bad_label is not None:
        entries.append(["00000/bad.png", bad_label])
    with zipfile.ZipFile(path, "w") as z:
        for i, (name, _) in enumerate(entries):
            z.writestr(name, _png(i))
        z.writestr("dataset.json", json.dumps({"labels": entries}))
    return path


def test_convert_fills_the_pose_column_from_the_labels(tmp_path: Path):
    out = convert(_zip(tmp_path / "cars.zip"), tmp_path / "shards")
    assert read_manifest(str(out))["has_pose"]
    rows = sorted(iter_rows(str(out), ["source", "pose"]), key=lambda r: r["source"])
    poses = np.stack([r["pose"] for r in rows]).astype(np.float64)
    dh = np.remainder(poses[:, 0] - POSES[:, 0] + math.pi, 2 * math.pi) - math.pi
    assert np.abs(dh).max() < 1e-5 and np.abs(poses[:, 1] - POSES[:, 1]).max() < 1e-5


def test_a_label_that_is_not_a_rigid_camera_is_named(tmp_path: Path):
    sheared = to_label(pose_to_cam2world(torch.tensor([[1.0, 1.2]]), 1.7, (0.0, 0.0, 0.0)), intrinsics(1.0))
    sheared = sheared[0].tolist()
    sheared[1] += 0.2  # a shear in the rotation part
    archive = _zip(tmp_path / "cars.zip", bad_label=sheared)
    with pytest.raises(DataError, match=r"label of 00000/bad\.png is not a rigid camera: .*not orthonormal"):
        convert(archive, tmp_path / "o1")
    out = convert(archive, tmp_path / "o2", skip_bad=True)
    skipped = read_manifest(str(out))["skipped"]
    assert skipped["count"] == 1 and skipped["items"][0]["name"] == "00000/bad.png"
    assert "not orthonormal" in skipped["items"][0]["reason"]


def test_evaluation_measures_pose_error_and_js_on_labelled_real_images(tmp_path: Path):
    out = convert(_zip(tmp_path / "cars.zip"), tmp_path / "shards")
    small = ["model.triplane_resolution=16", "model.depth_samples=4", "model.importance_samples=4"]
    cfg = load_config(
        "tiny", small + ["model.neural_resolution=16", "model.image_resolution=32", "data.resolution=32"]
    )
    torch.manual_seed(0)
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    results = evaluate_generator(G, D, cfg, str(out), ["pose", "js"], num_samples=8)
    assert np.isfinite([results["pose_error_deg"], results["js"]]).all()
    # The floor is computed from the poses the labels carry, so it shows which poses were read.
    assert results["pose_error_guess_deg"] == pytest.approx(constant_guess_error_deg(POSES), abs=1e-3)
