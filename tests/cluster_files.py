"""Where the cluster configs are, and small readers of them (test_cluster.py, test_cluster_commands.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SBATCH = CLUSTER / "slurm" / "pof3d.sbatch"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
CONFIG_BUCKET = "pof3d-bucket"  # the placeholder bucket every config and the README use


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A Kubernetes container's environment as a dict (valueFrom entries as "")."""
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}
