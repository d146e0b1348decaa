"""Config: presets, lossless JSON, dotted overrides with clear errors."""

from __future__ import annotations

import json
import logging
import math

import pytest

from pof3d.config import Config, apply_overrides, load_config, preset
from pof3d.errors import ConfigError
from pof3d.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    cfg = preset(name)
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert again.preset == name


def test_paper_presets_match_the_reference_scripts() -> None:
    ffhq, cats, cars = preset("ffhq512"), preset("cats256"), preset("cars128")
    assert (ffhq.loss.r1_gamma, ffhq.loss.dis_cam_weight, ffhq.loss.pose_gd_weight) == (1.0, 2.0, 1.0)
    assert (cats.loss.r1_gamma, cats.loss.dis_cam_weight) == (5.0, 10.0)
    assert (cars.loss.r1_gamma, cars.loss.pose_gd_weight) == (0.3, 2.0)
    assert cars.model.depth_samples == cars.model.importance_samples == 64
    assert ffhq.model.depth_samples == ffhq.model.importance_samples == 48
    assert cars.model.yaw_center == pytest.approx(math.pi) and cars.model.pose_clamp
    assert ffhq.model.pivot == (0.0, 0.0, 0.2) and cats.model.pivot == (0.0, 0.0, 0.0)
    assert ffhq.model.focal == pytest.approx(4.26, abs=0.01)
    # The poster's lr rows are relative to the pose learner's effective rate of 2.5e-5 (0.0025 x 0.01).
    assert ffhq.optim.pose_lr == pytest.approx(ffhq.optim.g_lr * 0.01)
    assert ffhq.train.batch == 32


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
        ("train.workers=3", "train.batch=8 must be divisible by train.workers=3"),
    ],
)
def test_bad_overrides_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", [override])
    assert message in str(info.value)


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="expected one of tiny, anchor, ffhq512, cats256, cars128"):
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
    assert preset("ffhq512").loss.density_reg_region == "cube"  # the reference's U[-1, 1]^3
    assert load_config("tiny", ["loss.density_reg_region=box"]).loss.density_reg_region == "box"
    with pytest.raises(ConfigError, match="density_reg_region='ball': expected cube or box"):
        load_config("tiny", ["loss.density_reg_region=ball"])
