"""The trained generator as an MLflow model: latents in, images out.

The model is logged "from code": MLflow stores :mod:`pof3d.tracking.model_code` (two lines that name
:class:`GeneratorModel`) instead of a pickled object, and the weights as a plain state dict read with
``torch.load(weights_only=True)``, so loading it runs no code but this package's and MLflow's.

    model = mlflow.pyfunc.load_model("models:/<model id>")   # or "runs:/<run id>/..." as MLflow lists it
    images = model.predict(z)        # z: float32 [N, z_dim]; images: uint8 [N, H, W, 3]
    images = model.predict(z, params={"truncation_psi": 0.7})
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pof3d
from pof3d.config import Config
from pof3d.plots import to_uint8
from pof3d.tracking.ui import INHERITED

MODEL_NAME = "generator"
WEIGHTS_FILE = "generator.pt"
CONFIG_FILE = "config.json"
_CODE_FILE = Path(__file__).with_name("model_code.py")

try:  # MLflow is a dependency; the base class only matters where MLflow loads the model
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]


class GeneratorModel(PythonModel):
    """``predict(z)``: images of latents ``z [N, z_dim]`` from G_ema at its learned poses."""

    def load_context(self, context: Any) -> None:
        from pof3d.generator import Generator

        cfg = Config.from_json(Path(context.artifacts["config"]).read_text())
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.generator = Generator(cfg.model)
        self.generator.load_state_dict(state)
        self.generator.eval()

    # An ndarray hint is one MLflow infers no schema from and validates nothing against (the signature
    # logged with the model is the schema); without hints MLflow warns at every import of this module.
    @torch.no_grad()
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        psi = float((params or {}).get("truncation_psi", 1.0))
        images = self.generator(z, truncation_psi=psi, noise_mode="const")["image"]
        return to_uint8(images)


def stage_generator(generator: torch.nn.Module, cfg: Config, folder: Path) -> dict[str, str]:
    """Write the weights and config MLflow will log into ``folder``; returns the artifacts mapping.

    Done at once (a CPU copy of the weights), so that the upload, which may wait for the server, works
    on files that training no longer touches.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True) for k, v in generator.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(cfg.to_json())
    return {"weights": str(folder / WEIGHTS_FILE), "config": str(folder / CONFIG_FILE)}


def _signature(cfg: Config) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    size = cfg.model.image_resolution
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.model.z_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        params=ParamSchema([ParamSpec("truncation_psi", "float", 1.0)]),
    )


def log_generator(tracking_uri: str, run_id: str, artifacts: dict[str, str], step: int) -> str:
    """Log the staged generator as the MLflow model ``generator`` of run ``run_id`` at ``step``; returns
    its model URI. MLflow's model logging reads the process-wide tracking URI and experiment, which are
    set here (rank 0 logs nothing else through them)."""
    import mlflow
    from mlflow.models import Model

    cfg = Config.from_json(Path(artifacts["config"]).read_text())
    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    # With no active run MLflow files a model under the default experiment, and with a local store puts
    # its files in ./mlruns of whatever directory the worker runs in: use the run's experiment instead.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    # MLflow would name this process (a Ray worker, "default_worker.py") as the model's source; the
    # run's source is the command that trained it.
    source = {key: value for key, value in run.data.tags.items() if key in INHERITED}
    with warnings.catch_warnings(), _no_artifact_progress_bars():
        # MLflow suggests an input example; validating one would load the model once more on rank 0.
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=int(step),
            python_model=str(_CODE_FILE),
            artifacts=artifacts,
            signature=_signature(cfg),
            # Given, so that MLflow does not load the model in a subprocess to infer them.
            pip_requirements=[f"pof3d=={pof3d.__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            tags={"pof3d.preset": cfg.preset, **source},
        )
    return info.model_uri


@contextlib.contextmanager
def _no_artifact_progress_bars() -> Iterator[None]:
    """MLflow "downloads" each of the model's artifacts into the model's folder, with a progress bar
    each; here that is a copy of two local files, and the bars only clutter the run's console. A user's
    own ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is left alone."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def remove_staged(artifacts: dict[str, str]) -> None:
    shutil.rmtree(Path(artifacts["weights"]).parent, ignore_errors=True)
