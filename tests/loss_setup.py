"""The tiny networks, real batch and config of the loss tests (test_losses.py, test_loss_inputs.py): a pytest
plugin of tests/conftest.py, so the ``nets`` and ``real`` fixtures are defined once."""

from __future__ import annotations

import pytest
import torch

from pof3d.config import Config
from pof3d.discriminator import Discriminator
from pof3d.generator import Generator
from pof3d.presets import load_config

B = 4


def loss_cfg(*overrides: str) -> Config:
    return load_config("tiny", ["loss.blur_init_sigma=1.0", *overrides])


def tiny_nets() -> tuple[Generator, Discriminator]:
    """G in eval mode (no depth jitter), D, from a fixed seed."""
    torch.manual_seed(0)
    cfg = loss_cfg()
    return Generator(cfg.model).eval(), Discriminator(cfg.model)


def real_batch() -> torch.Tensor:
    return torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def nets() -> tuple[Generator, Discriminator]:
    return tiny_nets()


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return real_batch()
