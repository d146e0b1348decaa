"""The folder pof3d keeps what it can make again: the built-in synthetic sets, the FID network and real
statistics, an empty MLflow store to copy. ``$POF3D_CACHE``, by default ``~/.cache/pof3d``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "POF3D_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pof3d").expanduser().resolve()
