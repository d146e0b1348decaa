"""What the losses feed D: the mirror coin and its modes, the blur schedule, the resized real image."""

from __future__ import annotations

import math
import random

import pytest
import torch
from loss_setup import loss_cfg as _cfg

from pof3d.layers import gaussian_blur, resize
from pof3d.loss import PoF3DLoss


def test_mirror_coin_and_modes(nets) -> None:
    G, D = nets
    pose = torch.tensor([[1.2, 1.4], [2.0, 1.7]])
    loss = PoF3DLoss(G, D, _cfg("loss.symmetry_mode=left_right"))
    random.seed(0)
    for _ in range(10):
        torch.testing.assert_close(loss.mirror(pose), torch.stack((math.pi - pose[:, 0], pose[:, 1]), 1))
    seen = set()
    loss = PoF3DLoss(G, D, _cfg("loss.symmetry_mode=flip_both"))
    for _ in range(40):
        m = loss.mirror(pose)
        seen.add("lr" if torch.allclose(m[:, 1], pose[:, 1]) else "ud")
        if torch.allclose(m[:, 1], pose[:, 1]):
            torch.testing.assert_close(m[:, 0], math.pi - pose[:, 0])
        else:
            torch.testing.assert_close(m, torch.stack((pose[:, 0], math.pi - pose[:, 1]), 1))
    assert seen == {"lr", "ud"}
    loss = PoF3DLoss(G, D, _cfg("loss.symmetry_mode=flip_both_cars"))
    lr = [m for m in (loss.mirror(pose) for _ in range(40)) if torch.allclose(m[:, 1], pose[:, 1])]
    assert lr and torch.allclose(lr[0][:, 0], 2 * math.pi - pose[:, 0])


def test_blur_fades_linearly(nets) -> None:
    G, D = nets
    loss = PoF3DLoss(G, D, _cfg("loss.blur_fade_kimg=2", "loss.blur_init_sigma=4", "train.batch=32"))
    assert loss.blur_sigma(0) == 4.0
    assert loss.blur_sigma(1000) == pytest.approx(2.0)
    assert loss.blur_sigma(2000) == 0.0 and loss.blur_sigma(5000) == 0.0
    assert PoF3DLoss(G, D, _cfg("loss.blur_fade_kimg=0")).blur_sigma(0) == 0.0


def test_blur_fade_length_scales_with_the_batch(nets) -> None:
    """``blur_fade_kimg`` counts at batch 32, as the official code's option: the fade lasts as many steps
    (unless ``blur_fade_scales_with_batch`` is off, as the tiny preset sets it)."""
    G, D = nets
    # The fade length itself (effective_blur_fade_kimg) is tested in test_config.py; here the loss reads it.
    on = "loss.blur_fade_scales_with_batch=true"
    small = PoF3DLoss(G, D, _cfg(on, "loss.blur_fade_kimg=2", "loss.blur_init_sigma=4", "train.batch=8"))
    assert small.blur_sigma(250) == pytest.approx(2.0)  # half of 2 kimg * 8 / 32 = 500 images
    assert small.blur_sigma(500) == 0.0


def test_a_blur_below_one_third_sigma_is_off(nets, real) -> None:
    """The official code's radius floor(3 sigma) is 0 below sigma = 1/3: no blur, so no second D pass."""
    G, D = nets
    loss = PoF3DLoss(G, D, _cfg())
    assert not loss.blurs_twice(0.33) and loss.blurs_twice(0.34)
    image, pose = loss.score_input(real, resize(real, 32), 0.33)
    assert image is real and pose is None


def test_reals_raw_image_is_a_plain_bilinear_resize(nets, real) -> None:
    """As the official code's filtered_resizing computes (its antialias flag is commented out), then blurred;
    ``loss.real_raw_antialias`` gives the antialiased resize."""
    G, D = nets
    bilinear = torch.nn.functional.interpolate(real, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(PoF3DLoss(G, D, _cfg()).real_raw(real, 0.0), bilinear, rtol=0, atol=0)
    torch.testing.assert_close(PoF3DLoss(G, D, _cfg()).real_raw(real, 1.0), gaussian_blur(bilinear, 1.0))
    smooth = PoF3DLoss(G, D, _cfg("loss.real_raw_antialias=true")).real_raw(real, 0.0)
    torch.testing.assert_close(smooth, resize(real, 32, antialias=True), rtol=0, atol=0)
    assert float((smooth - bilinear).abs().max()) > 0.1
