"""The synthetic known-pose set: determinism, exact re-rendering, the pose distribution, geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pof3d.camera import from_label, pose_from_cam2world
from pof3d.data.shard_reader import iter_rows, read_manifest
from pof3d.data.synthetic import ensure_synthetic, generate
from pof3d.data.synthetic_scene import SETTINGS, make_instance, render, sample_poses
from pof3d.errors import DataError
from pof3d.presets import load_config


def _ks_statistic(sample: np.ndarray, cdf) -> float:
    x = np.sort(sample)
    f = cdf(x)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def _clipped_normal_cdf(std: float, clip: float):
    phi = np.vectorize(lambda x: 0.5 * (1 + math.erf(x / (std * math.sqrt(2)))))
    # Clipping moves the tails onto the bounds: the CDF is the normal one inside (-clip, clip).
    return lambda x: np.where(x >= clip, 1.0, phi(np.clip(x, -clip, clip)))


def test_pose_sample_matches_its_distribution():
    n = 20000
    crit = 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1% level
    s = SETTINGS["faces"]
    poses = sample_poses("faces", n, np.random.default_rng(123))
    assert poses.shape == (n, 2)
    assert _ks_statistic(poses[:, 0] - math.pi / 2, _clipped_normal_cdf(s.h_std, s.h_clip)) < crit
    assert _ks_statistic(poses[:, 1] - math.pi / 2, _clipped_normal_cdf(s.v_std, s.v_clip)) < crit
    assert np.abs(poses[:, 0] - math.pi / 2).max() <= s.h_clip + 1e-12
    # The test has power: a distribution 10% wider is rejected.
    assert _ks_statistic(poses[:, 0] - math.pi / 2, _clipped_normal_cdf(s.h_std * 1.1, s.h_clip)) > crit
    cars = sample_poses("cars", n, np.random.default_rng(123))
    assert _ks_statistic(cars[:, 0], lambda x: x / (2 * math.pi)) < crit
    assert cars[:, 0].min() >= 0 and cars[:, 0].max() < 2 * math.pi
    with pytest.raises(DataError, match="expected one of"):
        sample_poses("birds", 3, np.random.default_rng(0))


def test_settings_match_the_model_presets():
    m = load_config("tiny", []).model
    faces = SETTINGS["faces"]
    assert (faces.radius, tuple(faces.pivot), faces.focal, faces.box_warp) == (
        m.camera_radius,
        tuple(m.pivot),
        pytest.approx(m.focal),
        m.box_warp,
    )
    cars = load_config("cars128", []).model
    assert (SETTINGS["cars"].radius, SETTINGS["cars"].focal, SETTINGS["cars"].box_warp) == (
        cars.camera_radius,
        pytest.approx(cars.focal),
        cars.box_warp,
    )


@pytest.mark.parametrize("kind", ["faces", "cars"])
def test_objects_fit_the_box_fill_the_frame_and_are_symmetric(kind: str):
    s = SETTINGS[kind]
    front = math.pi / 2 if kind == "faces" else math.pi
    for i in range(20):
        inst = make_instance(kind, 7, i)
        assert np.all(np.abs(inst.centers) + inst.radii <= s.box_warp / 2 + 1e-9)
    inst = make_instance(kind, 7, 0)
    _, side = render(inst, np.array([math.pi / 2, math.pi / 2]), 64, kind)  # faces: frontal; cars: side
    assert 0.2 < np.isfinite(side).mean() < 0.8  # a good part of the frame, not cut off
    image, depth = render(inst, np.array([front, math.pi / 2]), 64, kind)
    fg = np.isfinite(depth)
    assert not fg[0].any() and not fg[-1, :8].any()  # background at the borders
    assert np.all(np.abs(depth[fg] - s.radius) < s.box_warp)
    # Bilateral symmetry: the mirrored pose renders the horizontally flipped image.
    for h in (front + 0.4, front - 0.9):
        mirrored = (2 * math.pi - h) if kind == "cars" else (math.pi - h)
        a, da = render(inst, np.array([h, 1.5]), 64, kind)
        b, db = render(inst, np.array([mirrored, 1.5]), 64, kind)
        assert np.abs(a[:, ::-1].astype(int) - b.astype(int)).mean() < 1.0
        assert (np.isfinite(da[:, ::-1]) == np.isfinite(db)).mean() > 0.995
    # A clear front: the back view differs much more than any mirror.
    back, back_depth = render(inst, np.array([front + math.pi, math.pi / 2]), 64, kind)
    either = fg | np.isfinite(back_depth)
    assert np.abs(back.astype(int) - image.astype(int))[either].mean() > 15.0
    # Instances differ in shape and colour.
    other, other_depth = render(make_instance(kind, 7, 1), np.array([front, math.pi / 2]), 64, kind)
    either = fg | np.isfinite(other_depth)
    assert np.abs(other.astype(int) - image.astype(int))[either].mean() > 15.0


def test_same_seed_same_bytes_and_rerender_reproduces_rows(tmp_path: Path):
    a = generate(tmp_path / "a", 24, 32, "faces", seed=3)
    b = generate(tmp_path / "b", 24, 32, "faces", seed=3)
    c = generate(tmp_path / "c", 24, 32, "faces", seed=4)
    ma, mb, mc = (read_manifest(str(p)) for p in (a, b, c))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert [s["sha256"] for s in ma["shards"]] != [s["sha256"] for s in mc["shards"]]
    assert ma["synthetic"]["distribution"]["h_std"] == 0.35 and ma["has_pose"] and ma["has_depth"]
    for row in iter_rows(str(a)):
        image, depth = render(make_instance("faces", 3, row["id"]), row["pose"], 32, "faces")
        np.testing.assert_array_equal(image, row["image"])
        np.testing.assert_array_equal(depth, row["depth"])
        cam2world, intr = from_label(torch.from_numpy(row["label"]).double())
        np.testing.assert_allclose(pose_from_cam2world(cam2world).numpy(), row["pose"], atol=1e-5)
        assert intr[0, 0].item() == pytest.approx(SETTINGS["faces"].focal, rel=1e-6)


@pytest.mark.slow
def test_parallel_generation_gives_the_same_bytes(tmp_path: Path):
    one = generate(tmp_path / "one", 150, 16, "cars", seed=1, workers=1)
    two = generate(tmp_path / "two", 150, 16, "cars", seed=1, workers=2)
    sha = [[s["sha256"] for s in read_manifest(str(p))["shards"]] for p in (one, two)]
    assert sha[0] == sha[1]


def test_ensure_synthetic_reuses_a_complete_matching_set(tmp_path: Path):
    first = ensure_synthetic(tmp_path, n=12, resolution=16, poses="faces", seed=0)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = ensure_synthetic(tmp_path, n=12, resolution=16, poses="faces", seed=0)
    assert again == first and (again / "manifest.json").stat().st_mtime_ns == stamp
    other = ensure_synthetic(tmp_path, n=14, resolution=16, poses="faces", seed=0)
    assert other != first and read_manifest(str(other))["rows"] == 14
    (first / "manifest.json").unlink()  # an incomplete set is regenerated, not reused
    rebuilt = ensure_synthetic(tmp_path, n=12, resolution=16, poses="faces", seed=0)
    assert read_manifest(str(rebuilt))["rows"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left
