"""The CPU tri-plane sampling kernel against torch's grid_sample, its build cache and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pof3d import plane_kernel
from pof3d.triplane import channels_last, sample_plane_sum, sample_triplanes

pytestmark = pytest.mark.skipif(not plane_kernel.available(), reason="no C++ compiler on this machine")


def _reference(planes: torch.Tensor, points: torch.Tensor, quirk: bool) -> torch.Tensor:
    """grid_sample per plane, summed over planes, a row of channels per point ``[B, N, C]``."""
    return sample_triplanes(planes, points, 1.0, quirk).sum(dim=1)


# Channel counts: 8 and 24 take the kernel's general loops, 16, 32 and 64 its compiled-in widths; the
# 128 x 96 planes of 32 channels (1.5 MB each) are large enough for it to prefetch rows ahead.
@pytest.mark.parametrize(
    ("quirk", "channels", "height", "width"),
    [
        (True, 8, 16, 12),
        (False, 8, 16, 12),
        (False, 16, 16, 12),
        (True, 24, 8, 8),
        (False, 32, 128, 96),
        (True, 64, 8, 12),
    ],
)
def test_values_and_both_gradients_match_grid_sample(
    quirk: bool, channels: int, height: int, width: int
) -> None:
    torch.manual_seed(0)
    planes = channels_last(torch.randn(2, 3, channels, height, width)).requires_grad_(True)  # non-square too
    # A third of the points lie outside the box: zero padding gives them no value and no gradient there.
    points = (torch.rand(2, 600, 3) * 1.5 - 0.75).requires_grad_(True)
    weights = torch.randn(2, 600, channels)
    results = []
    for sample in (_reference, lambda p, x, q: sample_plane_sum(p, x, 1.0, q)):
        out = sample(planes, points, quirk)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (planes, points))))
    (ref, ref_planes, ref_points), (got, got_planes, got_points) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_planes, ref_planes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_points, ref_points, rtol=1e-4, atol=1e-4)
    assert ref_points.abs().max() > 1  # the point gradients are not trivially small


def test_a_channels_last_backbone_image_is_sampled_in_place_with_the_same_values_and_gradients() -> None:
    """A view of the backbone's channels-last [B, 3C, H, W] image, whose three planes interleave per
    texel (what the density regulariser samples): the kernel reads it without a copy, its gradient keeps
    that layout (the backbone gets a channels-last gradient), and every figure equals grid_sample's."""
    torch.manual_seed(1)
    image = torch.randn(2, 3 * 8, 16, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    planes = image.view(2, 3, 8, 16, 12)
    assert plane_kernel.dense_channels_innermost(planes.permute(0, 1, 3, 4, 2))
    copies = []
    original = torch.Tensor.contiguous
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or original(t, *a, **k)
        )
        plane_kernel.plane_sum(planes.permute(0, 1, 3, 4, 2), torch.zeros(2, 5, 3, 2))
    assert (2, 3, 16, 12, 8) not in copies, copies  # the planes were not copied
    points = (torch.rand(2, 500, 3) * 1.5 - 0.75).requires_grad_(True)
    weights = torch.randn(2, 500, 8)
    got = sample_plane_sum(planes, points, 1.0, True)
    got_image, got_points = torch.autograd.grad((got * weights).sum(), (image, points))
    assert got_image.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(image.view(2, 3, 8, 16, 12), points, True)
    ref_image, ref_points = torch.autograd.grad((ref * weights).sum(), (image, points))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_image, ref_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_points, ref_points, rtol=1e-4, atol=1e-4)
    # Planes with gaps (every other channel, or a cropped plane) are copied first, with the same values.
    grid = torch.rand(1, 20, 3, 2) * 2 - 1
    for gapped in (torch.randn(1, 3, 8, 8, 16)[..., ::2], torch.randn(1, 3, 9, 8, 8)[:, :, 1:]):
        assert not plane_kernel.dense_channels_innermost(gapped)
        torch.testing.assert_close(
            plane_kernel.plane_sum(gapped, grid), plane_kernel.plane_sum(gapped.contiguous(), grid)
        )


def test_the_kernel_runs_and_each_gradient_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = plane_kernel._PlaneSum.apply
    monkeypatch.setattr(plane_kernel._PlaneSum, "apply", lambda *a: calls.append(1) or original(*a))
    planes = channels_last(torch.randn(1, 3, 4, 8, 8)).requires_grad_(True)
    points = torch.rand(1, 50, 3) - 0.5  # no gradient wanted: the density regulariser's points
    (grad,) = torch.autograd.grad(sample_plane_sum(planes, points, 1.0).sum(), (planes,))
    assert calls and grad.abs().sum() > 0
    # Doubles are not the kernel's: grid_sample takes them, with the same values.
    double = sample_plane_sum(planes.double(), points.double(), 1.0)
    torch.testing.assert_close(double.float(), _reference(planes, points, False), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"planes must be \[B, 3, H, W, C\]"):
        plane_kernel.plane_sum(torch.zeros(1, 2, 4, 4, 3), torch.zeros(1, 5, 2, 2))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


PROBE = """
    import logging, torch
    logging.basicConfig(level=logging.WARNING)
    from pof3d import plane_kernel
    from pof3d.triplane import sample_plane_sum, sample_triplanes
    planes, points = torch.randn(1, 3, 4, 8, 8), torch.rand(1, 20, 3) - 0.5
    expected = sample_triplanes(planes, points, 1.0).sum(1)
    assert torch.allclose(sample_plane_sum(planes, points, 1.0), expected, atol=1e-6)
    print("available", plane_kernel.available())
"""


def test_the_library_is_built_once_and_reused(tmp_path) -> None:
    first = _run(PROBE, POF3D_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "available True" in first.stdout
    (library,) = tmp_path.glob("plane_sampler-*.so")
    built = library.stat().st_mtime_ns
    second = _run(PROBE, POF3D_KERNEL_CACHE=str(tmp_path))
    assert "available True" in second.stdout, second.stderr
    assert library.stat().st_mtime_ns == built  # loaded from the cache, not compiled again
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial files left behind


def test_without_a_compiler_sampling_falls_back_with_one_warning(tmp_path) -> None:
    broken = _run(PROBE, POF3D_KERNEL_CACHE=str(tmp_path), CXX="/bin/false")
    assert broken.returncode == 0, broken.stderr
    assert "available False" in broken.stdout
    assert broken.stderr.count("tri-plane sampling kernel is not available") == 1
    switched_off = _run(PROBE, POF3D_PLANE_KERNEL="0")
    assert "available False" in switched_off.stdout and "POF3D_PLANE_KERNEL=0" in switched_off.stderr
