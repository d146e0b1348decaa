"""The fixed per-channel filters (blur, D's Gaussian blur, resize): values, derivatives and cost."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from pof3d.layers import _blur_kernel, blur, blur_radius, blur_taps, downsample2d, gaussian_blur, resize


def _grouped_blur(x: torch.Tensor) -> torch.Tensor:
    """The textbook form: reflect padding, then a grouped convolution with one filter per channel."""
    c = x.shape[1]
    kernel = _blur_kernel(x.device, x.dtype).expand(c, 1, 4, 4)
    return F.conv2d(F.pad(x, (2, 1, 2, 1), mode="reflect"), kernel, groups=c)


def test_blur_equals_grouped_convolution_and_keeps_size() -> None:
    x = torch.randn(3, 5, 9, 11, generator=torch.Generator().manual_seed(0))
    out = blur(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _grouped_blur(x), rtol=0, atol=1e-6)
    # A constant image stays constant (the filter sums to one, reflect padding adds no edge).
    torch.testing.assert_close(blur(torch.full((1, 2, 6, 6), 0.7)), torch.full((1, 2, 6, 6), 0.7))


def test_filters_have_exact_first_and_second_derivatives() -> None:
    """R1 differentiates D's backward pass: both derivatives must be those of the linear filter."""
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blur, (x,))
    assert torch.autograd.gradgradcheck(blur, (x,))
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gaussian_blur(t, 1.3), (x,))
    assert torch.autograd.gradgradcheck(downsample2d, (x,))


# The official code's D blur (training/loss_pose.py, run_D) at sigma = 1: radius floor(3 sigma) = 3,
# taps 2^-(t / sigma)^2 = 2^-t^2 for t = -3..3, normalised by their sum 1 + 2 (1/2 + 1/16 + 1/512).
SIGMA1_TAPS = torch.tensor([1 / 512, 1 / 16, 1 / 2, 1, 1 / 2, 1 / 16, 1 / 512]) / 2.12890625


def test_gaussian_blur_is_the_reference_kernel() -> None:
    x = torch.zeros(1, 1, 11, 11)
    x[0, 0, 5, 5] = 1.0
    expected = torch.zeros(11, 11)
    expected[2:9, 2:9] = SIGMA1_TAPS[:, None] * SIGMA1_TAPS[None, :]
    torch.testing.assert_close(gaussian_blur(x, 1.0)[0, 0], expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(blur_taps(1.0), SIGMA1_TAPS, atol=1e-8, rtol=0)
    # Radius floor(3 sigma): sigma 2.5 has 7 (ceil would give 8); below sigma 1/3 there is no blur at all.
    assert [blur_radius(s) for s in (0.0, 0.33, 0.34, 1.0, 2.5, 10.0)] == [0, 0, 1, 3, 7, 30]
    assert len(blur_taps(2.5)) == 15
    assert gaussian_blur(x, 0.0) is x and gaussian_blur(x, 0.33) is x
    side = 2 ** -((1 / 0.34) ** 2)
    torch.testing.assert_close(blur_taps(0.34), torch.tensor([side, 1.0, side]) / (1 + 2 * side))


def test_gaussian_blur_pads_with_zeros() -> None:
    """Pixels outside the image are zero (as upfirdn2d.filter2d): a constant image darkens near the edge."""
    out = gaussian_blur(torch.ones(1, 2, 8, 8), 1.0)[0, 0]
    inside = (1 + 1 / 2 + 1 / 16 + 1 / 512) / 2.12890625  # the taps that fall inside at an edge pixel
    torch.testing.assert_close(out[0, 0], torch.tensor(inside**2))
    torch.testing.assert_close(out[0, 4], torch.tensor(inside))
    torch.testing.assert_close(out[3:5, 3:5], torch.ones(2, 2))
    # The radius may exceed the image (sigma 10 on a 4 px image): the size is kept.
    assert gaussian_blur(torch.ones(1, 1, 4, 4), 10.0).shape == (1, 1, 4, 4)


def test_gaussian_blur_standard_deviation_is_085_sigma() -> None:
    """2^-(t / sigma)^2 is a Gaussian of standard deviation sigma / sqrt(2 ln 2), not sigma."""
    taps, t = blur_taps(10.0).double(), torch.arange(-30, 31, dtype=torch.float64)
    std = float((taps * t**2).sum().sqrt())
    assert std == pytest.approx(10 / math.sqrt(2 * math.log(2)), rel=0.01)


def test_resize_is_plain_bilinear_unless_antialiased() -> None:
    """Shrinking 8 -> 2 px: plain bilinear reads pixels 1 and 2 of each 4 (half-pixel centres at 1.5 and
    5.5) and misses the spike at pixel 3, as the official filtered_resizing does; antialiased sees it."""
    x = torch.tensor([0.0, 2.0, 4.0, 9.0, 0.0, 0.0, 6.0, 0.0]).expand(1, 1, 8, 8)
    torch.testing.assert_close(resize(x, 2), torch.tensor([3.0, 3.0]).expand(1, 1, 2, 2))
    # Antialiased: a triangle 4 px wide each side, weights 1 - |d| / 4 over the pixels inside the image.
    left = (2 * 0.875 + 4 * 0.875 + 9 * 0.625) / 3.5
    right = (4 * 0.125 + 9 * 0.375 + 6 * 0.875) / 3.5
    torch.testing.assert_close(resize(x, 2, antialias=True), torch.tensor([left, right]).expand(1, 1, 2, 2))
    # Enlarging: both are the same interpolation.
    y = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(resize(y, 32), resize(y, 32, antialias=True), atol=1e-6, rtol=0)
    assert resize(y, 8) is y


def _convolutions_in_r1_step(channels: int, fn) -> int:
    """Number of convolution calls in one R1-style step (gradient penalty, then its backward)."""
    x = torch.randn(2, channels, 16, 16, requires_grad=True)
    w = torch.randn(channels, channels, 3, 3, requires_grad=True)
    with profile() as prof:
        out = F.conv2d(fn(x), w, padding=1)
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grad.square().sum().backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_second_derivative_does_not_loop_over_channels() -> None:
    """A grouped conv's double backward runs one convolution per channel; the blur's must not."""
    assert _convolutions_in_r1_step(4, blur) == _convolutions_in_r1_step(64, blur) <= 8
    # The textbook form really does loop, which is what made R1 slow on GPUs.
    assert _convolutions_in_r1_step(64, _grouped_blur) > 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blur_on_cuda_matches_cpu() -> None:
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(blur(x.cuda()).cpu(), blur(x), atol=1e-5, rtol=0)


def test_1x1_convolutions_run_as_a_matrix_product_on_cpu() -> None:
    """Same values and gradients as F.conv2d (on contiguous inputs, where oneDNN computes them right),
    and no crash on the shape where torch 2.13's oneDNN 1x1 backward-weights kernel writes out of
    bounds (3 channels-last images of 8 channels at 32 px, stride 2); that runs in a subprocess."""
    import subprocess
    import sys
    import textwrap

    import torch.nn.functional as F

    from pof3d.layers import conv2d

    for n, c, o, hw, stride in [(4, 8, 16, 16, 2), (2, 6, 8, 8, 1), (5, 16, 32, 8, 2)]:
        x = torch.randn(n, c, hw, hw, requires_grad=True)
        w = torch.randn(o, c, 1, 1, requires_grad=True)
        b = torch.randn(o, requires_grad=True)
        ours = conv2d(x, w, b, stride=stride)
        theirs = F.conv2d(x, w, b, stride=stride)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(ours)
        got = torch.autograd.grad(ours, (x, w, b), grad)
        want = torch.autograd.grad(theirs, (x, w, b), grad)
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    script = textwrap.dedent(
        """
        import torch
        from pof3d.layers import conv2d
        x = torch.randn(3, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(16, 8, 1, 1, requires_grad=True)
        for _ in range(5):
            conv2d(x, w, stride=2).sum().backward()
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]
