"""Environment variables set for a block of tests and restored afterwards (os.environ is process-wide:
Ray started inside the block inherits them, and later tests must not)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scoped_env(values: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*values, *unset)}
    os.environ.update(values)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def isolated_run_env(root: Path) -> contextlib.AbstractContextManager[None]:
    """Synthetic-set cache and default run root under ``root``; no MLflow URI from the caller's shell."""
    return scoped_env(
        {"POF3D_CACHE": str(root / "cache"), "POF3D_STORAGE": str(root / "runs")},
        unset=("MLFLOW_TRACKING_URI",),
    )
