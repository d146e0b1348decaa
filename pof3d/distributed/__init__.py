"""Ray Train wiring of the training loop: planning on the driver, launching, the per-worker loop."""

from pof3d.distributed.driver import RunSummary, prepare, run_training, train
from pof3d.distributed.plan import RunPlan, TrainRequest

__all__ = ["RunPlan", "RunSummary", "TrainRequest", "prepare", "run_training", "train"]
