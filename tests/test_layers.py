"""The fixed per-channel filters (blur, Gaussian blur): values, first and second derivatives, and cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from pof3d.layers import _blur_kernel, blur, downsample2d, gaussian_blur


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


def test_gaussian_blur_matches_a_dense_separable_kernel() -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, radius = 1.0, 3
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    dense = (k[:, None] * k[None, :]).expand(3, 1, 2 * radius + 1, 2 * radius + 1)
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    torch.testing.assert_close(gaussian_blur(x, sigma), F.conv2d(padded, dense, groups=3), atol=1e-5, rtol=0)
    assert gaussian_blur(x, 0.0) is x


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
