"""StyleGAN2 building blocks in plain PyTorch (no custom CUDA ops).

Equalised learning rate: weights are stored at unit scale and multiplied by ``gain / sqrt(fan_in)`` at
run time, so Adam's per-parameter steps are the same size for every layer; ``lr_mult`` scales a layer's
effective learning rate (the mapping network uses 0.01).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)
LRELU_SLOPE = 0.2


def output_gain(activation: str, gain: float = 1.0) -> float:
    """The factor a layer's output is scaled by: the caller's ``gain`` times the activation's own (StyleGAN2
    scales leaky ReLU by ``LRELU_GAIN`` to keep unit variance).

    Leaky ReLU is positively homogeneous, ``g lrelu(y) = lrelu(g y)`` for ``g > 0``, so the layers fold this
    factor into their weight and bias (tensors of a few thousand values) instead of scaling the
    activations: one pass fewer over each layer's output forward and one backward.
    """
    if gain <= 0:
        raise ValueError(f"a layer's gain must be positive (it is folded into leaky ReLU), got {gain}")
    return gain * (LRELU_GAIN if activation == "lrelu" else 1.0)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation once :func:`output_gain` is folded into the layer: leaky ReLU without its gain."""
    return F.leaky_relu(x, LRELU_SLOPE) if activation == "lrelu" else x


class FullyConnected(nn.Module):
    """Equalised-learning-rate linear layer with optional leaky-ReLU."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation: str = "linear",
        lr_mult: float = 1.0,
        bias_init: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"activation must be linear or lrelu, got {activation!r}")
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mult)) if bias else None
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = output_gain(self.activation)
        w = self.weight * (self.weight_gain * g)
        b = self.bias * (self.bias_gain * g) if self.bias is not None else None
        return activate(F.linear(x, w, b), self.activation)


def _blur_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    k = k[:, None] * k[None, :]
    return k / k.sum()


class _DepthwiseFilter(torch.autograd.Function):
    """The same fixed 2-D filter on every channel, with a backward pass that is itself differentiable.

    A plain grouped ``conv2d`` gives the right values, but its double backward (which R1 needs: the
    penalty's gradient goes back through D's first backward pass) is computed one channel group at a
    time: one small convolution per channel. On a GPU that is thousands of kernel launches per R1 step
    (0.56 s of the 0.58 s R1 phase at ``anchor``, 12 s at ``ffhq512``). Here the backward pass is a
    ``conv_transpose2d`` recorded as an ordinary op, so the second derivative is one grouped ``conv2d``.
    The filter is a constant: it gets no gradient. It computes in the dtype of ``x`` even under autocast:
    the backward pass convolves the output's gradient with the saved kernel, so both must share a dtype
    (under autocast the input may be float32 while a convolution would compute in bfloat16), and a fixed
    low-pass filter gains nothing from reduced precision.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, kernel: torch.Tensor, padding: tuple[int, int], stride: int
    ) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        ctx.padding, ctx.stride, ctx.size = padding, stride, x.shape[-2:]
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.conv2d(x, kernel, stride=stride, padding=padding, groups=x.shape[1])
        return F.conv2d(x, kernel, stride=stride, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (kernel,) = ctx.saved_tensors
        # A strided filter drops the input's last rows and columns when they reach no output; the
        # transposed convolution gives them back (as zeros) through output_padding.
        out_size = [
            (g - 1) * ctx.stride - 2 * p + k
            for g, p, k in zip(grad.shape[-2:], ctx.padding, kernel.shape[-2:], strict=True)
        ]
        extra = [n - o for n, o in zip(ctx.size, out_size, strict=True)]
        return (
            F.conv_transpose2d(
                grad,
                kernel,
                stride=ctx.stride,
                padding=ctx.padding,
                output_padding=extra,
                groups=grad.shape[1],
            ),
            None,
            None,
            None,
        )


def depthwise_filter(
    x: torch.Tensor, kernel: torch.Tensor, padding: tuple[int, int] = (0, 0), stride: int = 1
) -> torch.Tensor:
    """Correlate each channel of ``x`` [N, C, H, W] with the constant 2-D ``kernel``; ``padding`` zeros
    (rows, columns) on both sides, every ``stride``-th output kept."""
    c = x.shape[1]
    weight = kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, *kernel.shape)
    return _DepthwiseFilter.apply(x, weight, padding, stride)


def resample_filter(x: torch.Tensor, padding: int, stride: int = 1) -> torch.Tensor:
    """StyleGAN2's [1,3,3,1] low-pass filter on each channel, ``padding`` zeros on every side, every
    ``stride``-th output kept: the official code's ``upfirdn2d(x, f, padding, down=stride)`` for this
    filter, whose pixels outside the image are zero. The padding and the stride run inside the
    convolution, so no padded copy of the activations is made, forward or backward."""
    return depthwise_filter(x, _blur_kernel(x.device, x.dtype), (padding, padding), stride)


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling as the official code's ``upfirdn2d.upsample2d`` with the [1,3,3,1] filter: a zero
    after every pixel, 2 zeros of padding before and 1 after, the filter times 4. Computed as one
    stride-2 transposed convolution with that filter, which never forms the zero-stuffed image. Inside
    the image this is bilinear 2x upsampling; at the border the pixels outside count as zero."""
    c = x.shape[1]
    weight = (_blur_kernel(x.device, x.dtype) * 4.0).expand(c, 1, 4, 4)
    return F.conv_transpose2d(x, weight, stride=2, padding=1, groups=c)


def resize(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size x size`` (half-pixel centres).

    Plain bilinear by default, as the official code's ``filtered_resizing`` computes in its ``antialiased``
    mode (the ``antialias=True`` argument is commented out there). ``antialias`` low-passes first when
    shrinking; when enlarging both are the same.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def blur_radius(sigma: float) -> int:
    """Half-width of :func:`gaussian_blur`'s kernel: floor(3 sigma), so no blur at all below sigma = 1/3."""
    return max(int(math.floor(sigma * 3)), 0)


def blur_taps(sigma: float) -> torch.Tensor:
    """The normalised 1-D kernel of :func:`gaussian_blur` (float32, ``2 * blur_radius + 1`` taps).

    Tap t is 2^-(t / sigma)^2, as in the official code's D input blur: a Gaussian whose standard deviation is
    sigma / sqrt(2 ln 2) (about 0.85 sigma), cut at 3 sigma.
    """
    radius = blur_radius(sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp2(-((t / sigma) ** 2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D's input blur: the separable kernel :func:`blur_taps` with zero padding (same size output).

    The official code's blur (``upfirdn2d.filter2d``, whose pixels outside the image are zero). A sigma
    below 1/3 (radius 0) returns the input itself.
    """
    radius = blur_radius(sigma)
    if radius == 0:
        return x
    k = blur_taps(sigma)
    x = depthwise_filter(x, k.view(1, -1), padding=(0, radius))
    return depthwise_filter(x, k.view(-1, 1), padding=(radius, 0))


class Conv2dLayer(nn.Module):
    """Equalised-learning-rate convolution with optional 2x downsampling and leaky-ReLU.

    Downsampling is the official code's ``conv2d_resample``: the [1,3,3,1] filter with ``k // 2 + 1``
    zeros of padding, then the ``k x k`` convolution with stride 2 and no padding; a 1x1 convolution
    runs after the filter, which then keeps every other output itself.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        activation: str = "lrelu",
        down: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.activation, self.down = activation, down
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        stride, padding = 1, self.padding
        if self.down and self.weight.shape[-1] == 1:
            x = resample_filter(x, padding=1, stride=2)
        elif self.down:
            x = resample_filter(x, padding=self.padding + 1)
            stride, padding = 2, 0
        g = output_gain(self.activation, gain)
        w = self.weight * (self.weight_gain * g)
        b = (self.bias * g).to(x.dtype) if self.bias is not None else None
        x = conv2d(x, w.to(x.dtype), b, stride=stride, padding=padding)
        return activate(x, self.activation)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (StyleGAN2), computed as scale -> conv -> demodulate.

    Scaling the input channels by the style and the output channels by the demodulation coefficient
    is equivalent to convolving with a per-sample modulated weight, but runs as one ordinary batched
    convolution, which is faster than grouped convolutions on CPU and fuses well on GPU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        *,
        demodulate: bool = True,
        up: bool = False,
        activation: str = "lrelu",
        use_noise: bool = False,
        resolution: int = 0,
    ) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.demodulate, self.up, self.activation = demodulate, up, activation
        self.padding = kernel_size // 2
        # The filter's padding after the transposed conv (conv2d_resample's px0 - (k - 1), px1 - (k - 2)).
        self.up_padding = kernel_size // 2 + 3 - kernel_size
        if up and self.up_padding < 0:
            raise ValueError(f"an upsampling modulated conv takes kernel sizes 1, 3 or 5, got {kernel_size}")
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.use_noise = use_noise
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        styles = self.affine(w) * (1.0 if self.demodulate else self.weight_gain)
        weight = self.weight * self.weight_gain if self.demodulate else self.weight
        x = x * styles.to(x.dtype)[:, :, None, None]
        if self.up:
            # The official code's conv2d_resample: conv(upsample(x)) computed as the [1,3,3,1] filter
            # (gain 4) after a stride-2 transposed conv, since the bilinear 2x upsample is a zero-stuffing
            # followed by that filter and the filter commutes with the conv, which then runs on the
            # low-resolution input (4x fewer multiply-adds). The transposed conv keeps its whole output
            # (2H + k - 2 rows), the filter pads it with zeros to 2H.
            x = F.conv_transpose2d(x, weight.transpose(0, 1).flip(2, 3).to(x.dtype), stride=2)
            x = resample_filter(x, padding=self.up_padding)
        else:
            x = conv2d(x, weight.to(x.dtype), padding=self.padding)
        act_gain = output_gain(self.activation)
        scale = (4.0 if self.up else 1.0) * act_gain  # zero-stuffing keeps 1 pixel in 4
        bias = (self.bias * act_gain).to(x.dtype)[None, :, None, None]
        if self.demodulate:
            # d_j = 1 / sqrt(sum_i,k (s_i w_jik)^2): computed from the styles, not the activations.
            dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
            # Scale and bias in one pass; the noise below is added after the bias, which is the same sum.
            x = torch.addcmul(bias, x, (dcoefs * scale).to(x.dtype)[:, :, None, None])
        else:
            x = x * scale + bias if scale != 1.0 else x + bias
        if self.use_noise and noise_mode != "none":
            if noise_mode == "const":
                noise = self.noise_const.to(x.dtype)
            else:
                noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            x = x + noise * (self.noise_strength * act_gain).to(x.dtype)
        return activate(x, self.activation)


def conv2d(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """``F.conv2d``, except that a 1x1 convolution on CPU runs as a matrix product over channels.

    Why: the AVX-512 1x1 backward-weights kernel of oneDNN in torch 2.13's CPU build writes out of
    bounds for some shapes, e.g. 3 channels-last images of 8 channels at 32 px, stride 2 (a segmentation
    fault, or silently corrupted gradients and heap); micro-batches of odd sizes hit it in D's skip
    connections. A 1x1 convolution is a matrix product anyway (tests/test_layers.py).
    """
    if x.device.type == "cpu" and w.shape[-2:] == (1, 1) and padding == 0:
        if stride > 1:
            x = x[:, :, ::stride, ::stride]
        out = torch.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
        return out + b.view(1, -1, 1, 1) if b is not None else out
    return F.conv2d(x, w, b, stride=stride, padding=padding)


class MinibatchStd(nn.Module):
    """Appends the per-group feature standard deviation as an extra channel (StyleGAN2)."""

    def __init__(self, group_size: int = 4, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            g = 1
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat((x, y), dim=1)
