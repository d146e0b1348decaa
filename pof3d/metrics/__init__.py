"""Evaluation metrics of PoF3D: FID/KID, pose error, pose JS divergence, depth error, reprojection error.

The maths lives in one module per metric and works on tensors/arrays and callables;
:func:`evaluate_generator` glues them to a generator, a discriminator and a shard set.
"""

from pof3d.metrics.suite import GROUPS, default_metrics, evaluate_generator, resolve_metrics

__all__ = ["GROUPS", "default_metrics", "evaluate_generator", "resolve_metrics"]
