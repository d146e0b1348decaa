"""FID/KID maths with a stand-in network, the random-feature stand-in, the Inception lookup and checksum,
the real-feature cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pof3d.cache import CACHE_ENV
from pof3d.metrics import fid as fidlib

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stand_in_features() -> fidlib.FeatureFn:
    """A small fixed random conv net: enough to tell image sets apart."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    ).eval()
    return lambda images: net(images)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-1, 1, 16)
    ramp = base[None, None, :, None] * base[None, None, None, :]
    return (ramp * torch.rand(n, 3, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, 16, 16, generator=g)).clamp(
        -1, 1
    )


def test_fid_and_kid_zero_on_identical_sets_and_grow_with_noise():
    feature_fn = _stand_in_features()
    real = _images(400, seed=1)
    batches = lambda x: [x[i : i + 100] for i in range(0, len(x), 100)]  # noqa: E731
    f_real = fidlib.compute_features(feature_fn, batches(real))
    assert f_real.shape == (400, 128)
    assert fidlib.fid_from_features(f_real, f_real) == pytest.approx(0.0, abs=1e-6)
    assert abs(fidlib.kid_from_features(f_real, f_real, num_subsets=10)) < 1e-4
    fids, kids = [], []
    g = torch.Generator().manual_seed(2)
    for sigma in (0.05, 0.2, 0.5):
        noisy = (real + sigma * torch.randn(real.shape, generator=g)).clamp(-1, 1)
        f_fake = fidlib.compute_features(feature_fn, batches(noisy))
        fids.append(fidlib.fid_from_features(f_real, f_fake))
        kids.append(fidlib.kid_from_features(f_real, f_fake, num_subsets=10))
    assert 0 < fids[0] < fids[1] < fids[2]
    assert kids[0] < kids[1] < kids[2] and kids[2] > 0


def test_random_feature_network_is_fixed_and_separates_distributions():
    from pof3d.metrics.random_features import RandomConvFeatures, random_feature_fn

    a, b = RandomConvFeatures(), RandomConvFeatures()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(RandomConvFeatures(seed=1).convs[0].weight, a.convs[0].weight)
    feature_fn = random_feature_fn()
    real = _images(300, seed=1)
    f_real = fidlib.compute_features(feature_fn, [real[:150], real[150:]])
    assert f_real.shape == (300, 768)
    same = fidlib.compute_features(feature_fn, [_images(300, seed=3)])
    g = torch.Generator().manual_seed(2)
    shifted = fidlib.compute_features(
        feature_fn, [(real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1)]
    )
    # A second draw of the same distribution is much closer than a visibly noisier one.
    assert fidlib.fid_from_features(f_real, same) * 3 < fidlib.fid_from_features(f_real, shifted)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = 5.0 + sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in ((1, 4), (4, 1), (9, 1)))
    assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)


def test_missing_inception_error_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fidlib.INCEPTION_ENV, raising=False)
    with pytest.raises(fidlib.WeightsError) as info:
        fidlib.find_inception()
    message = str(info.value)
    assert "inception-2015-12-05.pt" in message
    assert "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4" in message
    assert str(tmp_path / "cache" / "inception-2015-12-05.pt") in message
    assert fidlib.INCEPTION_URL in message and "POF3D_INCEPTION" in message


def test_inception_checksum_is_verified(tmp_path, monkeypatch):
    bad = tmp_path / "inception-2015-12-05.pt"
    bad.write_bytes(b"not the network")
    monkeypatch.setenv(fidlib.INCEPTION_ENV, str(bad))
    with pytest.raises(fidlib.WeightsError, match=fidlib.sha256_file(bad)) as info:
        fidlib.load_inception()
    assert fidlib.INCEPTION_SHA256 in str(info.value) and str(bad) in str(info.value)


def test_real_features_are_cached(tmp_path):
    calls = []

    def feature_fn(x):
        calls.append(len(x))
        return x.flatten(1)[:, :5]

    images = lambda: [torch.randn(4, 3, 4, 4)]  # noqa: E731
    first = fidlib.cached_features(feature_fn, images, "abc", tmp_path)
    second = fidlib.cached_features(feature_fn, images, "abc", tmp_path)
    assert calls == [4] and np.array_equal(first, second)
    fidlib.cached_features(feature_fn, images, "other", tmp_path)
    assert calls == [4, 4]
