"""The poster's ablation rows as named config overrides on top of a preset.

A variant is data, not code paths: each one is a list of ``section.field=value`` strings fed to
:func:`pof3d.config.apply_overrides`, so a trial of a variant runs exactly the training of
``python -m pof3d.train --set ...`` with the same overrides. The pose-learning-rate rows scale the
preset's pose learner rate (2.5e-5 in the paper presets) instead of hard-coding the poster's numbers,
so they stay meaningful for presets with another base rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pof3d.config import Config
from pof3d.console import listing
from pof3d.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """One ablation row: the poster's label for it and the overrides that make it from a config."""

    description: str
    overrides: Callable[[Config], list[str]]


def _full(cfg: Config) -> list[str]:
    return []


def _no_symmetry(cfg: Config) -> list[str]:
    return ["loss.symmetry_weight=0"]


def _no_pose_aware_d(cfg: Config) -> list[str]:
    # Without a pose head there is no pose prediction to train D on, nor one to pull the pose learner to.
    return ["model.pose_aware_d=false", "loss.dis_cam_weight=0", "loss.pose_gd_weight=0"]


def _pose_lr(scale: float) -> Callable[[Config], list[str]]:
    def overrides(cfg: Config) -> list[str]:
        return [f"optim.pose_lr={cfg.optim.pose_lr * scale!r}"]

    return overrides


VARIANTS: dict[str, Variant] = {
    "full": Variant("Ours (full model)", _full),
    "no_symmetry": Variant("w/o symmetry loss", _no_symmetry),
    "no_pose_aware_d": Variant("w/o pose-aware D", _no_pose_aware_d),
    "pose_lr_x10": Variant("pose lr x10 (2.5e-4 at the paper's rate)", _pose_lr(10.0)),
    "pose_lr_x0.1": Variant("pose lr x0.1 (2.5e-6 at the paper's rate)", _pose_lr(0.1)),
}


def variants_help() -> str:
    """The variants with the poster's label of each, for the study command's ``--help``."""
    return listing("ablation variants", {name: v.description for name, v in VARIANTS.items()})


def parse_variants(text: str | list[str]) -> list[str]:
    """Comma-separated (or listed) variant names, validated, order kept, duplicates refused."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ConfigError(f"--variants: expected at least one of {', '.join(VARIANTS)}, got {text!r}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(
            f"--variants: unknown variant {unknown[0]!r}; expected some of {', '.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--variants: {text!r} names a variant twice")
    return names


def variant_overrides(name: str, cfg: Config) -> list[str]:
    """The ``--set`` strings that turn ``cfg`` (the preset plus user overrides) into variant ``name``."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name].overrides(cfg)
