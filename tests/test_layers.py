"""The fixed per-channel filters (StyleGAN2's resampling filter, D's Gaussian blur, resize) and the
resampling convolutions built on them: values, derivatives and cost."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from pof3d.layers import (
    Conv2dLayer,
    ModulatedConv2d,
    blur_radius,
    blur_taps,
    gaussian_blur,
    resample_filter,
    resize,
    upsample2d,
)

FILTER = torch.tensor([1.0, 3.0, 3.0, 1.0])


def _upfirdn2d(
    x: torch.Tensor, up: int = 1, down: int = 1, pad: int | tuple[int, int] = 0, gain: float = 1.0
) -> torch.Tensor:
    """The official code's upfirdn2d for the [1,3,3,1] filter, from its definition: insert up - 1 zeros
    after every pixel, pad with zeros (``pad`` on both sides, or (before, after)), correlate each channel
    with the normalised filter times gain, keep every down-th pixel. Written out step by step, with
    nothing shared with pof3d.layers."""
    before, after = (pad, pad) if isinstance(pad, int) else pad
    n, c, h, w = x.shape
    if up > 1:
        stuffed = x.new_zeros(n, c, h * up, w * up)
        stuffed[:, :, ::up, ::up] = x
        x = stuffed
    x = F.pad(x, (before, after, before, after))
    f = FILTER.to(x.dtype)
    f = (f[:, None] * f[None, :]) / f.sum() ** 2 * gain
    x = F.conv2d(x, f.expand(c, 1, 4, 4), groups=c)
    return x[:, :, ::down, ::down]


def _grouped_filter(x: torch.Tensor) -> torch.Tensor:
    """The textbook form of the filter: a grouped convolution with one filter per channel."""
    return _upfirdn2d(x, pad=2)


@pytest.mark.parametrize(("height", "width"), [(9, 11), (8, 8)])
def test_the_resampling_filter_is_upfirdn2d_with_zero_padding(height: int, width: int) -> None:
    x = torch.randn(3, 5, height, width, generator=torch.Generator().manual_seed(0))
    for padding, stride in ((2, 1), (1, 1), (1, 2)):
        out = resample_filter(x, padding, stride)
        torch.testing.assert_close(out, _upfirdn2d(x, down=stride, pad=padding), rtol=0, atol=1e-6)
    # Pixels outside the image are zero: a constant image keeps its value inside and darkens at the edge
    # (the corner of padding 1 sees 3 x 3 of the 4 x 4 taps: (7 / 8)^2).
    out = resample_filter(torch.full((1, 2, 6, 6), 0.7), padding=1)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], torch.full((1, 2, 3, 3), 0.7))
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(0.7 * (7 / 8) ** 2))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_image_skip_upsampling_is_upfirdn2d_upsample2d(layout) -> None:
    """G's image skip: upfirdn2d.upsample2d (zero after each pixel, padding 2 before and 1 after, the
    filter times 4), border pixels included; inside the image it is a bilinear 2x resize."""
    x = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    out = upsample2d(x)
    assert out.shape == (2, 5, 14, 18)
    torch.testing.assert_close(out, _upfirdn2d(x, up=2, pad=(2, 1), gain=4.0), rtol=0, atol=1e-6)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[..., 0, :], bilinear[..., 0, :])  # the border sees the zeros outside


def test_filters_have_exact_first_and_second_derivatives() -> None:
    """R1 differentiates D's backward pass: both derivatives must be those of the linear filter, also
    where a strided filter leaves the input's last row and column out (7 columns here)."""
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64, requires_grad=True)
    for fn in (
        lambda t: resample_filter(t, 2),
        lambda t: resample_filter(t, 1, stride=2),
        lambda t: gaussian_blur(t, 1.3),
    ):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_downsampling_convolutions_are_the_official_conv2d_resample() -> None:
    """D's 3x3 down conv: filter with 2 zeros of padding, then the conv with stride 2 and no padding; its
    1x1 skip: filter with 1 of padding keeping every other pixel, then the 1x1 conv (conv2d_resample)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    down = Conv2dLayer(4, 6, 3, activation="linear", down=True)
    skip = Conv2dLayer(4, 6, 1, activation="linear", down=True, bias=False)
    with torch.no_grad():
        down.bias.normal_()
        want = F.conv2d(_upfirdn2d(x, pad=2), down.weight * down.weight_gain, down.bias, stride=2)
        torch.testing.assert_close(down(x), want, rtol=1e-5, atol=1e-5)
        want = F.conv2d(_upfirdn2d(x, down=2, pad=1), skip.weight * skip.weight_gain)
        torch.testing.assert_close(skip(x), want, rtol=1e-5, atol=1e-5)
        assert down(x).shape == skip(x).shape == (2, 6, 8, 8)


def test_upsampling_modulated_conv_is_the_official_conv2d_resample() -> None:
    """Zero-stuffing, the filter (gain 4) with zero padding, then the 3x3 conv, all computed as a
    transposed conv followed by the filter: the same values at every pixel, the border too."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 5, 3, 8, up=True, demodulate=False, activation="linear")
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        conv.bias.normal_()
        styles = conv.affine(w) * conv.weight_gain  # without demodulation the gain is the styles'
        # conv2d_resample's generic order: zero-stuff and filter, padded by 1 + (4 + 2 - 1) // 2 = 3 before
        # and 1 + (4 - 2) // 2 = 2 after, then the conv with no padding.
        up = _upfirdn2d(x * styles[:, :, None, None], up=2, pad=(3, 2), gain=4.0)
        want = F.conv2d(up, conv.weight, padding=0) + conv.bias[None, :, None, None]
        got = conv(x, w)
        assert got.shape == want.shape == (2, 5, 16, 16)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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
    """A grouped conv's double backward runs one convolution per channel; the filter's must not."""
    blur = functools.partial(resample_filter, padding=2)
    assert _convolutions_in_r1_step(4, blur) == _convolutions_in_r1_step(64, blur) <= 8
    # The textbook form really does loop, which is what made R1 slow on GPUs.
    assert _convolutions_in_r1_step(64, _grouped_filter) > 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_filter_on_cuda_matches_cpu() -> None:
    x = torch.randn(2, 8, 16, 16)
    for padding, stride in ((2, 1), (1, 2)):
        got = resample_filter(x.cuda(), padding, stride).cpu()
        torch.testing.assert_close(got, resample_filter(x, padding, stride), atol=1e-5, rtol=0)


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
