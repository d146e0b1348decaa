"""Config: presets, lossless JSON, dotted overrides with clear errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest

from pof3d.batch_scaling import effective_blur_fade_kimg, effective_ema_kimg
from pof3d.config import Config, apply_overrides
from pof3d.ema import training_ema_beta
from pof3d.errors import ConfigError
from pof3d.presets import PRESETS, load_config, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    cfg = preset(name)
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert again.preset == name


# The official code's paper scripts (ffhq.sh, cat.sh, shapenet_cars.sh) and the `--cfg` branches of its
# train_geod.py / train.py that they select, written out: (resolution, gamma, dis_cam_weight,
# pose_gd_weight, flip_type, samples per ray, ray_start, ray_end, box_warp, radius, pivot, h_mean).
SCRIPTS = {
    "ffhq256": (256, 1.0, 2.0, 1.0, "flip_both", 48, 2.25, 3.3, 1.0, 2.7, (0.0, 0.0, 0.2), math.pi / 2),
    "cats256": (256, 5.0, 10.0, 10.0, "flip_both", 48, 2.25, 3.3, 1.0, 2.7, (0.0, 0.0, 0.0), math.pi / 2),
    "cars128": (128, 0.3, 2.0, 2.0, "flip_both_shapenet", 64, 0.1, 2.6, 1.6, 1.7, (0.0, 0.0, 0.0), math.pi),
}
FLIP_TYPES = {"flip_both": "flip_both", "flip_both_shapenet": "flip_both_cars"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_paper_presets_match_the_reference_scripts(name: str) -> None:
    res, gamma, dis_cam, pose_gd, flip, samples, start, end, box, radius, pivot, h_mean = SCRIPTS[name]
    cfg = preset(name)
    m, loss, optim, train = cfg.model, cfg.loss, cfg.optim, cfg.train
    assert m.image_resolution == cfg.data.resolution == res and m.neural_resolution == 64
    assert (loss.r1_gamma, loss.dis_cam_weight, loss.pose_gd_weight) == (gamma, dis_cam, pose_gd)
    assert loss.symmetry_mode == FLIP_TYPES[flip] and loss.symmetry_weight == 1.0  # flip_to_disd_weight
    assert m.depth_samples == m.importance_samples == samples
    assert (m.ray_start, m.ray_end, m.box_warp, m.camera_radius, m.pivot) == (start, end, box, radius, pivot)
    assert m.yaw_center == pytest.approx(h_mean) and m.pitch_center == pytest.approx(math.pi / 2)
    # Cars clamp h to [0, 2pi] and v to [0, 3.1415926] with a hard clamp; faces and cats do not clamp.
    assert m.pose_clamp == (name == "cars128") and not m.pose_clamp_straight_through
    assert m.white_background == (name == "cars128")
    # Defaults of train_geod.py / train.py that the scripts keep.
    assert (train.batch, optim.g_lr, optim.d_lr) == (32, 0.0025, 0.002)
    assert optim.pose_lr == pytest.approx(0.0025 * 0.01)  # --lr_multiplier_pose 0.01
    assert (m.mapping_layers, m.mapping_lr_mult, m.z_dim, m.w_dim) == (2, 0.01, 512, 512)
    assert (m.channel_base, m.channel_max, m.disc_channel_base, m.disc_channel_max) == (
        32768,
        512,
        32768,
        512,
    )
    assert (m.num_fp16_res, m.backbone_num_fp16_res) == (4, 0)  # d/sr_num_fp16_res 4, g_num_fp16_res 0
    assert (m.triplane_quirk, m.sr_noise_mode, m.pose_init_scale) == (True, "none", 1.0)  # --wrong True
    assert (loss.blur_init_sigma, loss.blur_fade_kimg, loss.r1_interval) == (10.0, 200.0, 16)
    assert (loss.density_reg_weight, loss.density_reg_interval, loss.density_reg_sigma) == (0.25, 4, 0.004)
    assert (optim.ema_kimg, optim.ema_rampup, m.mbstd_group) == (10.0, 0.05, 4)
    assert optim.ema_scales_with_batch and loss.blur_fade_scales_with_batch  # batch * 10 / 32, * 200 / 32
    assert not loss.real_raw_antialias  # filtered_resizing is plain bilinear
    assert m.focal == pytest.approx(4.26, abs=0.01) if name != "cars128" else m.focal == 1.025390625


def test_ffhq512_is_ffhq256_at_512_px() -> None:
    """The 512 px variant differs only in resolution and its 8x super-resolution widths (EG3D's 8XDC)."""
    a, b = preset("ffhq256"), preset("ffhq512")
    assert (b.model.image_resolution, b.data.resolution, b.model.sr_channels) == (512, 512, 256)
    b.model.image_resolution = b.data.resolution = 256
    b.model.sr_channels, b.preset = a.model.sr_channels, a.preset
    assert a == b
    assert Config().preset == "ffhq256" and Config().model == a.model


def test_blur_fade_follows_the_reference_rule() -> None:
    """The official code fades D's blur over batch * 200 / 32 kimg; tiny keeps a fixed 5 kimg."""
    assert effective_blur_fade_kimg(preset("ffhq256")) == 200.0
    assert effective_blur_fade_kimg(load_config("ffhq256", ["train.batch=8"])) == 50.0
    assert effective_blur_fade_kimg(load_config("cars128", ["train.batch=64"])) == 400.0
    assert effective_blur_fade_kimg(preset("anchor")) == 25.0  # batch 4
    tiny = preset("tiny")
    assert tiny.train.batch == 8 and effective_blur_fade_kimg(tiny) == 5.0
    assert effective_blur_fade_kimg(load_config("tiny", ["train.batch=32"])) == 5.0
    fixed = load_config("ffhq256", ["train.batch=8", "loss.blur_fade_scales_with_batch=false"])
    assert effective_blur_fade_kimg(fixed) == 200.0
    assert effective_blur_fade_kimg(load_config("ffhq256", ["loss.blur_fade_kimg=0"])) == 0.0


def test_ema_half_life_follows_the_reference_rule() -> None:
    """The official code's EMA half-life is batch * 10 / 32 kimg (as many steps at any batch); tiny: 0.5."""
    assert effective_ema_kimg(preset("ffhq256")) == 10.0
    assert effective_ema_kimg(load_config("ffhq256", ["train.batch=8"])) == 2.5
    assert effective_ema_kimg(load_config("cats256", ["train.batch=64"])) == 20.0
    assert effective_ema_kimg(preset("anchor")) == 1.25  # batch 4
    tiny = preset("tiny")
    assert tiny.train.batch == 8 and effective_ema_kimg(tiny) == 0.5
    assert effective_ema_kimg(load_config("tiny", ["train.batch=32"])) == 0.5
    fixed = load_config("ffhq256", ["train.batch=8", "optim.ema_scales_with_batch=false"])
    assert effective_ema_kimg(fixed) == 10.0
    # The trainer's decay per step: half-life 2.5 kimg at batch 8 once the ramp-up (0.05 x images) is past.
    cfg = load_config("ffhq256", ["train.batch=8"])
    assert training_ema_beta(cfg, 8, 10**6) == pytest.approx(0.5 ** (8 / 2500))
    assert training_ema_beta(cfg, 8, 16_000) == pytest.approx(0.5 ** (8 / 800))  # ramp-up: 0.05 x 16000
    assert training_ema_beta(cfg, 8, 0) == 0.0


def test_anchor_preset_is_the_fixed_benchmark_size() -> None:
    m = preset("anchor").model
    assert (m.image_resolution, m.neural_resolution, m.triplane_resolution, m.triplane_channels) == (
        128,
        64,
        256,
        32,
    )
    assert (m.channel_base, m.channel_max, m.mapping_layers, m.z_dim, m.w_dim) == (8192, 128, 2, 512, 512)
    assert (m.decoder_hidden, m.depth_samples, m.importance_samples) == (64, 24, 24)
    assert preset("anchor").train.batch == 4 and m.num_fp16_res == 0 and m.pose_aware_d


# The anchor_faces fields that come from anchor (the network size); every other field is ffhq256's.
ANCHOR_SIZE = (
    "image_resolution",
    "neural_resolution",
    "triplane_resolution",
    "triplane_channels",
    "channel_base",
    "channel_max",
    "disc_channel_base",
    "disc_channel_max",
    "cmap_dim",
    "mapping_layers",
    "z_dim",
    "w_dim",
    "decoder_hidden",
    "depth_samples",
    "importance_samples",
    "num_fp16_res",
)


def test_anchor_faces_is_the_anchor_network_with_the_ffhq_settings() -> None:
    faces, anchor, ffhq = preset("anchor_faces"), preset("anchor"), preset("ffhq256")
    for name, value in dataclasses.asdict(faces.model).items():
        source = anchor if name in ANCHOR_SIZE else ffhq
        assert value == getattr(source.model, name), name
    assert (faces.loss, faces.optim, faces.train) == (ffhq.loss, ffhq.optim, ffhq.train)
    assert faces.train.batch == 32 and effective_blur_fade_kimg(faces) == 200.0
    assert (faces.data.resolution, faces.data.synthetic_poses, faces.data.synthetic_n) == (
        128,
        "faces",
        20000,
    )


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny", ["loss.symmetry_weight=0", "model.pose_aware_d=false", "model.pivot=0,0,0.1", "train.batch=4"]
    )
    assert cfg.loss.symmetry_weight == 0.0 and isinstance(cfg.loss.symmetry_weight, float)
    assert cfg.model.pose_aware_d is False
    assert cfg.model.pivot == (0.0, 0.0, 0.1)
    assert cfg.train.batch == 4


def test_overrides_do_not_mutate_the_input() -> None:
    base = preset("tiny")
    apply_overrides(base, ["loss.r1_gamma=7"])
    assert base.loss.r1_gamma == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.nope=1", "unknown field loss.nope; valid fields of loss: r1_gamma"),
        ("nope.x=1", "unknown config section 'nope'"),
        ("train.batch=four", "train.batch: expected an integer, got 'four'"),
        ("train.batch=2.5", "train.batch: expected an integer"),
        ("model.pose_aware_d=maybe", "model.pose_aware_d: expected a boolean"),
        ("loss.r1_gamma=nan", "loss.r1_gamma: expected a finite number"),
        ("model.pivot=1,2", "model.pivot: expected 3 comma-separated values"),
        ("loss.symmetry_weight", "expected SECTION.FIELD=VALUE"),
        ("model.neural_resolution=48", "model.image_resolution=64 must be 1, 2, 4 or 8 times"),
        ("loss.symmetry_mode=diagonal", "loss.symmetry_mode='diagonal'"),
        ("train.workers=16", "makes 8 micro-batch(es), fewer than the 16 worker(s) the run may have"),
        ("train.batch_gpu=9", "train.batch_gpu=9 is larger than train.batch=8"),
        ("train.batch_gpu=-1", "train.batch_gpu=-1: expected 0"),
        ("train.eval_samples=1", "train.eval_samples=1: expected at least 2"),
        ("train.cpu_threads=-1", "train.cpu_threads=-1: expected 0"),
        ("data.decode_tasks=-1", "data.decode_tasks=-1: expected 0 (no cap) or a task count"),
    ],
)
def test_bad_overrides_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", [override])
    assert message in str(info.value)


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="expected one of tiny, anchor, ffhq256, cats256, cars128, ffhq512"):
        preset("ffhq1024")


def test_flat_params_cover_every_field() -> None:
    flat = preset("tiny").flat()
    assert flat["loss.symmetry_weight"] == 1.0
    assert flat["optim.pose_lr"] == 2.5e-5
    assert flat["preset"] == "tiny"
    assert len(flat) > 60


def test_a_removed_field_in_a_saved_config_is_ignored_with_a_warning(caplog) -> None:
    """Runs saved before ``loss.share_passes`` was removed still load; asking for it now is an error."""
    data = json.loads(preset("tiny").to_json())
    data["loss"]["share_passes"] = False
    with caplog.at_level(logging.WARNING, logger="pof3d.config"):
        cfg = Config.from_json(json.dumps(data))
    assert cfg == preset("tiny")
    assert "loss.share_passes=False" in caplog.text and "removed" in caplog.text
    with pytest.raises(ConfigError, match="loss.share_passes was removed: the shared passes"):
        load_config("tiny", ["loss.share_passes=false"])
    # Any other unknown field in a saved config is still refused.
    data["loss"]["sharepasses"] = True
    with pytest.raises(ConfigError, match="unknown field loss.sharepasses"):
        Config.from_json(json.dumps(data))


def test_density_region_is_cube_or_box() -> None:
    assert preset("ffhq512").loss.density_reg_region == "cube"  # the official code's U[-1, 1]^3
    assert load_config("tiny", ["loss.density_reg_region=box"]).loss.density_reg_region == "box"
    with pytest.raises(ConfigError, match="density_reg_region='ball': expected cube or box"):
        load_config("tiny", ["loss.density_reg_region=ball"])
