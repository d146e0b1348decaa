"""generate/evaluate CLIs on a tiny random checkpoint; meshes, PLY files and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pof3d import evaluate, generate
from pof3d.checkpoint import load_checkpoint, save_checkpoint
from pof3d.discriminator import Discriminator
from pof3d.errors import ConfigError
from pof3d.generator import Generator
from pof3d.mesh import density_grid, extract_mesh, read_ply, write_ply
from pof3d.plots import plot_pose_distribution, save_image_grid
from pof3d.presets import load_config


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is as fast and does not fight other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = [
    "model.triplane_resolution=16",
    "model.depth_samples=6",
    "model.importance_samples=6",
    "model.neural_resolution=16",
    "model.image_resolution=32",
    "data.resolution=32",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    state = {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G.state_dict()}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", state, cfg, {"images_seen": 1234})


# ------------------------------------------------------------------------------------------ mesh


def _sphere_density(radius: float):
    # Raw density that is 10 (the iso-level) on the sphere, above inside, below outside.
    return lambda pts: 10 + 20 * (radius - pts.norm(dim=-1, keepdim=True))


def test_sphere_mesh_is_closed_and_on_the_sphere(tmp_path):
    grid = density_grid(_sphere_density(0.3), 40, box_side=1.0, chunk=5000)
    verts, faces = extract_mesh(grid, box_side=1.0)
    assert len(verts) > 100 and len(faces) > 100
    radii = np.linalg.norm(verts, axis=1)
    assert np.abs(radii - 0.3).max() < 0.02
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()  # no boundary edges: watertight
    assert len(verts) - len(counts) + len(faces) == 2  # Euler characteristic of a sphere
    for binary in (True, False):
        path = write_ply(tmp_path / f"s{binary}.ply", verts, faces, binary=binary)
        v2, f2 = read_ply(path)
        assert np.allclose(v2, verts, atol=1e-5) and np.array_equal(f2, faces)


def test_mesh_cut_by_box_is_closed_and_constant_field_is_empty():
    # A sphere larger than the box: the padding closes the surface at the box faces.
    grid = density_grid(_sphere_density(0.7), 24, box_side=1.0)
    verts, faces = extract_mesh(grid, box_side=1.0)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    assert (np.unique(edges, axis=0, return_counts=True)[1] == 2).all()
    assert np.abs(verts).max() <= 0.5 + 1e-6
    verts, faces = extract_mesh(np.zeros((8, 8, 8)), box_side=1.0)
    assert len(verts) == 0 and len(faces) == 0


# ----------------------------------------------------------------------------------------- plots


def test_image_grid_and_pose_plot(tmp_path):
    images = torch.rand(6, 3, 16, 20) * 2 - 1
    path = save_image_grid(images, tmp_path / "grid.png", ncols=4)
    assert Image.open(path).size == (4 * 20, 2 * 16)
    rng = np.random.default_rng(0)
    learned, true = rng.normal(1.5, 0.2, (500, 2)), rng.normal(1.6, 0.1, (500, 2))
    true[:10] = np.nan
    plot = plot_pose_distribution(learned, tmp_path / "poses.png", true=true)
    assert Image.open(plot).size[0] > 100


# ------------------------------------------------------------------------------------------ CLIs


def test_video_circles_the_pose_of_the_untruncated_latent(tmp_path):
    """With truncation the video's camera path starts from the latent's own learned pose (the
    official code computes the pose before truncating w), not from the truncated w's pose."""
    torch.manual_seed(0)
    G = Generator(load_config("tiny", SMALL).model).eval()
    G.map(torch.randn(64, G.cfg.z_dim), update_w_avg=True)
    z = torch.randn(1, G.cfg.z_dim)
    seen = []
    render = G.render
    G.render = lambda planes, ws, pose, noise_mode="random": seen.append(pose) or render(planes, ws, pose)
    generate.render_video(G, z, 0.0, 3, False, tmp_path / "v.gif")
    expected = generate.camera_path(G.predict_pose(G.map(z))[0], 3, False)
    torch.testing.assert_close(torch.cat(seen), expected)
    truncated = generate.camera_path(G.predict_pose(G.map(z, truncation_psi=0.0))[0], 3, False)
    assert (torch.cat(seen) - truncated).abs().max() > 1e-4


def test_parse_seeds():
    assert generate.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("a", "3-1", "-2", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            generate.parse_seeds(bad)


def test_generate_writes_grid_videos_meshes(checkpoint, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["--checkpoint", str(checkpoint), "--seeds", "0-2", "--out", str(out), "--video", "--frames", "3"]
    assert generate.main(argv + ["--mesh", "--mesh-resolution", "12"]) == 0
    assert "wrote 1 samples, 1 poses, 3 videos, 3 meshes" in capsys.readouterr().out
    assert Image.open(out / "samples.png").size == (2 * 32, 2 * 32)  # 3 images, 2 columns
    gif = Image.open(out / "seed0001.gif")
    assert gif.size == (32, 32) and gif.n_frames == 3
    verts, faces = read_ply(out / "seed0002.ply")
    assert len(verts) > 0 and faces.max() < len(verts)
    assert (out / "poses.png").stat().st_size > 0
    # Same seed, same image: the grid is reproducible.
    assert (
        generate.main(["--checkpoint", str(checkpoint), "--seeds", "0-2", "--out", str(tmp_path / "g2")]) == 0
    )
    assert np.array_equal(
        np.asarray(Image.open(out / "samples.png")), np.asarray(Image.open(tmp_path / "g2/samples.png"))
    )


def test_generate_bad_input_exits_2(checkpoint, tmp_path, capsys):
    assert generate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert generate.main(["--checkpoint", str(checkpoint), "--seeds", "x"]) == 2


def test_evaluate_cli_writes_json_and_logs_to_mlflow(checkpoint, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("eval-test")).info.run_id
    cfg, state, _ = load_checkpoint(checkpoint)
    tracked = save_checkpoint(
        tmp_path / "tracked",
        state,
        cfg,
        {"images_seen": 4000, "mlflow_run_id": run_id, "mlflow_tracking_uri": uri},
    )
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(tracked), "--metrics", "re", "--num-samples", "8", "--out", str(out)]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "reprojection_error" in printed and str(out / "metrics.json") in printed
    record = json.loads((out / "metrics.json").read_text())
    value = record["metrics"]["reprojection_error"]
    assert 0 <= value < 1 and record["images_seen"] == 4000 and record["mlflow_run_id"] == run_id
    history = client.get_metric_history(run_id, "eval/reprojection_error")
    assert [(m.step, m.value) for m in history] == [(4000, pytest.approx(value))]


def test_evaluate_bad_input_exits_2(checkpoint, tmp_path, monkeypatch, capsys):
    assert evaluate.main(["--checkpoint", str(checkpoint), "--metrics", "fd"]) == 2
    assert "unknown metric 'fd'" in capsys.readouterr().err
    monkeypatch.setenv("POF3D_CACHE", str(tmp_path))
    monkeypatch.delenv("POF3D_INCEPTION", raising=False)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--metrics", "fid"]) == 2
    assert "inception-2015-12-05.pt" in capsys.readouterr().err


def test_evaluate_generator_names_and_skips(checkpoint, caplog):
    from pof3d.metrics import evaluate_generator, resolve_metrics

    assert resolve_metrics(["JS_yaw", "re", "reprojection_error", "fid", "kid"]) == ["js", "re", "fid", "kid"]
    with pytest.raises(ConfigError, match="unknown metric 'psnr'"):
        resolve_metrics(["psnr"])
    cfg, G, D, _ = evaluate.load_models(checkpoint)
    G.train()
    with caplog.at_level("WARNING"):
        results = evaluate_generator(G, D, cfg, None, ["pose", "depth", "fid", "kid"], num_samples=4)
    assert results == {}
    text = caplog.text
    assert "pose error skipped" in text and "depth error skipped" in text and "fid/kid skipped" in text
    assert G.training  # the caller's train/eval mode is restored


# ----------------------------------------------------------------------------- with a shard set


@pytest.fixture(scope="module")
def sphere_shards(tmp_path_factory):
    """A small shard set of analytically rendered coloured spheres with true poses and depth."""
    from pof3d.camera import intrinsics, pose_to_cam2world
    from pof3d.data.shards import ShardWriter, encode_png
    from pof3d.renderer import make_rays

    cfg = load_config("tiny", SMALL)
    m, res, n = cfg.model, 32, 24
    g = torch.Generator().manual_seed(0)
    poses = torch.stack(
        (1.571 + 0.3 * torch.randn(n, generator=g), 1.571 + 0.1 * torch.randn(n, generator=g)), -1
    )
    cam = pose_to_cam2world(poses, m.camera_radius, m.pivot)
    origins, dirs = make_rays(cam, intrinsics(m.focal, n), res)
    centre = torch.tensor(m.pivot)
    rel = origins - centre
    b = (rel * dirs).sum(-1)
    disc = b**2 - ((rel**2).sum(-1) - 0.2**2)
    hit = disc > 0
    t = torch.where(hit, -b - disc.clamp(min=0).sqrt(), torch.full_like(b, float("inf")))
    p = origins + dirs * t.nan_to_num(posinf=0.0)[..., None] - centre
    colour = 0.5 + 0.5 * torch.stack(
        (torch.sin(15 * p[..., 0]), p[..., 1] * 4, torch.cos(12 * p[..., 2])), -1
    )
    colour = torch.where(hit[..., None], colour.clamp(0, 1), torch.ones_like(colour))
    writer = ShardWriter(tmp_path_factory.mktemp("shards") / "spheres", resolution=res)
    for i in range(n):
        pixels = (colour[i].reshape(res, res, 3) * 255).round().to(torch.uint8).numpy()
        writer.add(
            encode_png(pixels),
            "png",
            res,
            res,
            f"sphere{i}",
            pose=poses[i].numpy(),
            depth=t[i].reshape(res, res).numpy(),
        )
    writer.close()
    return str(writer.out)


def test_evaluate_generator_all_metrics_on_shards(checkpoint, sphere_shards, tmp_path):
    from pof3d.metrics import evaluate_generator

    cfg, G, D, _ = evaluate.load_models(checkpoint)
    torch.manual_seed(0)
    stand_in = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2)
    )
    features = lambda x: stand_in(x).flatten(1)  # noqa: E731
    names = ["pose", "js", "depth", "re", "fid", "kid"]
    results = evaluate_generator(
        G, D, cfg, sphere_shards, names, num_samples=16, feature_fn=features, cache=tmp_path
    )
    expected = {"pose_error_deg", "pose_error_guess_deg", "js", "js_yaw", "js_pitch", "depth_error"}
    expected.add("depth_estimator_error")
    moments = {
        f"{who}_{axis}_{stat}_deg"
        for who in ("learned", "true")
        for axis in ("yaw", "pitch")
        for stat in ("mean", "std")
    }
    assert expected | moments | {"reprojection_error", "fid", "kid"} == set(results)
    assert all(np.isfinite(v) for v in results.values()), results
    # The true poses are the shards' (yaw 90 +- 17 deg, pitch 90 +- 6 deg), not the synthetic sampler's;
    # the joint JS is at least each marginal's (a marginal loses information) and an untrained pose
    # learner is off the data's distribution.
    assert results["true_yaw_mean_deg"] == pytest.approx(90, abs=10)
    assert results["true_pitch_std_deg"] < results["true_yaw_std_deg"]
    assert results["js"] >= max(results["js_yaw"], results["js_pitch"]) - 1e-12 and results["js"] > 0
    assert results["fid"] > 0 and results["depth_error"] >= 0
    assert len(list((tmp_path / "depth").glob("depth-estimator-*.pt"))) == 1
    # Same seed, same figures (the estimator now comes from the cache).
    again = evaluate_generator(
        G, D, cfg, sphere_shards, names, num_samples=16, feature_fn=features, cache=tmp_path
    )
    assert again == pytest.approx(results)


def test_random_feature_stand_in_on_shards(checkpoint, sphere_shards, tmp_path):
    """fd_random/kd_random need no weights file, render the fakes once with the depth error, and the
    real-image features are cached under their own key."""
    from pof3d.metrics import evaluate_generator

    cfg, G, D, _ = evaluate.load_models(checkpoint)
    names = ["fd_random", "kd_random", "depth"]
    results = evaluate_generator(G, D, cfg, sphere_shards, names, num_samples=16, cache=tmp_path)
    assert {"fd_random", "kd_random", "depth_error", "depth_estimator_error"} == set(results)
    assert results["fd_random"] > 0 and np.isfinite(results["kd_random"])
    assert len(list((tmp_path / "stats").glob("real-features-*.npy"))) == 1
    again = evaluate_generator(G, D, cfg, sphere_shards, names, num_samples=16, cache=tmp_path)
    assert again == pytest.approx(results)


def test_evaluate_cli_with_data(checkpoint, sphere_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POF3D_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--data",
        sphere_shards,
        "--metrics",
        "pose,js",
        "--out",
        str(out),
    ]
    assert evaluate.main(argv + ["--num-samples", "12"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert {"pose_error_deg", "pose_error_guess_deg", "js", "js_yaw", "js_pitch"} <= set(record["metrics"])
    assert {"learned_pitch_mean_deg", "true_pitch_std_deg"} <= set(record["metrics"])
    assert record["data"] == sphere_shards and record["mlflow_run_id"] is None
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such shard directory" in capsys.readouterr().err


class _Recorder(torch.nn.Module):
    """Stands in for G in the FID sampling loop: records how it is called, returns its latents as images."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, z, **kwargs):
        self.calls.append(kwargs)
        image = z[:, :3, None, None].expand(-1, 3, 4, 4)
        return {"image": image, "depth": image[:, :1]}


def test_fid_samples_use_constant_backbone_noise_and_no_truncation(tmp_path):
    """Kept different from the official code's random noise: a checkpoint and seed give the same set."""
    from pof3d.metrics.image_metrics import generate
    from pof3d.metrics.samples import EvalRun

    G = _Recorder()
    run = EvalRun(G, load_config("tiny"), None, 20, torch.device("cpu"), 7, tmp_path)
    first, _ = generate(run, {"f": lambda image: image.flatten(1)}, keep=0)
    assert G.calls == [{"noise_mode": "const"}] * 2  # 20 samples in batches of 16; psi stays 1
    again, _ = generate(run, {"f": lambda image: image.flatten(1)}, keep=0)
    np.testing.assert_array_equal(first["f"], again["f"])
