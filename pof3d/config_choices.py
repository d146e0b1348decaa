"""The config fields that take one of a few named values, and their check.

Kept apart from :mod:`pof3d.config` (which calls :func:`check_choices` from its validation) so that the
named values can be imported without the config's dataclasses, e.g. by :mod:`pof3d.precision`.
"""

from __future__ import annotations

from typing import Any

from pof3d.errors import ConfigError

# ``train.precision``; pof3d/precision.py says what each value runs in which dtype.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Dotted field -> its allowed values, in the order error messages list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.pitch_output": ("polar", "eg3d"),
    "loss.symmetry_mode": ("flip_both", "flip_both_cars", "left_right"),
    "model.sr_noise_mode": ("none", "random", "const", "caller"),
    "loss.density_reg_region": ("cube", "box"),
    "data.synthetic_poses": ("faces", "cars"),
    "train.precision": PRECISIONS,
}


def _listed(values: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_choices(cfg: Any) -> None:
    """Raise a ConfigError naming the field and its allowed values when a choice field holds another."""
    for path, allowed in CHOICES.items():
        section, name = path.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r}: expected {_listed(allowed)}")
