"""The tri-plane decoder: the renderer's plane-sum call (CPU kernel, or grid_sample as on a GPU) against
the textbook per-plane sampling and mean, its output shapes and ranges, and its symmetry in the planes."""

from __future__ import annotations

import torch

from pof3d.triplane import RGB_AFFINE, TriplaneDecoder, sample_plane_sum, sample_triplanes


def test_fast_paths_match_plain_sampling_and_mean():
    """Per-plane samples through the decoder and the renderer's plane-sum call: the textbook values."""
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 6, 16, 16, requires_grad=True)
    points = (torch.rand(2, 40, 3) * 1.2 - 0.6).requires_grad_(True)
    dec = TriplaneDecoder(6, 8, 5)

    def plain() -> dict[str, torch.Tensor]:
        x, y, z = points.unbind(-1)
        grids = [torch.stack(pair, -1) * 2.0 for pair in ((x, y), (x, z), (z, y))]
        feats = [
            torch.nn.functional.grid_sample(planes[:, k], grids[k][:, None], align_corners=False)[:, :, 0]
            for k in range(3)
        ]
        h = torch.nn.functional.softplus(dec.hidden(torch.stack(feats, 1).mean(1).transpose(1, 2)))
        out = dec.out(h)
        return {"sigma": out[..., :1], "rgb": torch.sigmoid(out[..., 1:]) * 1.002 - 0.001}

    def renderers_call(kernel: bool = True) -> dict[str, torch.Tensor]:
        sigma, features = dec.decode(sample_plane_sum(planes, points, 1.0, kernel=kernel))
        return {"sigma": sigma.unsqueeze(-1), "rgb": features * 1.002 - 0.001}

    results = []
    # The renderer's call with the CPU kernel, and with grid_sample as on a GPU (a transposed sum).
    calls = (renderers_call, lambda: renderers_call(kernel=False))
    for fn in (plain, lambda: dec(sample_triplanes(planes, points, 1.0)), *calls):
        out = fn()
        grads = torch.autograd.grad(out["sigma"].sum() + out["rgb"].square().sum(), (planes, points))
        results.append((out["sigma"], out["rgb"], *grads))
    for other in results[1:]:
        for expected, got in zip(results[0], other, strict=True):
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_decoder_shapes_and_ranges():
    dec = TriplaneDecoder(16, 32, 12)
    out = dec(torch.randn(2, 3, 50, 16) * 10)
    assert out["rgb"].shape == (2, 50, 12) and out["sigma"].shape == (2, 50, 1)
    assert out["rgb"].min() >= -1e-3 and out["rgb"].max() <= 1 + 1e-3
    assert out["sigma"].dtype == torch.float32
    sigma, plain = dec.decode(torch.randn(2, 50, 16) * 10)  # the renderer's call: plane sum, a row per point
    assert sigma.shape == (2, 50) and plain.shape == (2, 50, 12)
    assert plain.min() >= 0 and plain.max() <= 1  # the widening is left to compositing
    assert RGB_AFFINE == (1.002, -0.001)


def test_decoder_averages_planes():
    dec = TriplaneDecoder(4, 8, 3)
    a = torch.randn(1, 3, 7, 4)
    shuffled = a[:, [2, 0, 1]]
    mean = a.mean(dim=1, keepdim=True).expand_as(a)
    for other in (shuffled, mean):
        assert torch.allclose(dec(a)["sigma"], dec(other)["sigma"], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Rays
