"""MLflow tracking of training runs and studies.

- :mod:`~pof3d.tracking.run`: :class:`Tracker`, one run seen from one process (params, metrics,
  figures, the final model), every call handed to
- :mod:`~pof3d.tracking.sender`, which sends in the background and keeps calls while the server is away;
- :mod:`~pof3d.tracking.backfill`: ``metrics.jsonl`` fills in the ticks MLflow lacks;
- :mod:`~pof3d.tracking.system_metrics`: each node's CPU, memory, disk, network and GPU;
- :mod:`~pof3d.tracking.logged_model`: the generator as an MLflow model (``model_code.py`` is the file
  MLflow stores with it and runs to load it);
- :mod:`~pof3d.tracking.store`: the store's client, health check and experiments, and how to open it;
- :mod:`~pof3d.tracking.ui`: what the UI shows besides the figures: links to the training view, who ran
  what, where the figures are.
"""

from pof3d.tracking.run import Tracker
from pof3d.tracking.store import client_for, default_tracking_uri, experiment_id, run_name, ui_command

__all__ = ["Tracker", "client_for", "default_tracking_uri", "experiment_id", "run_name", "ui_command"]
