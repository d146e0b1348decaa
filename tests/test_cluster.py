"""Cluster configs are checked, not just written: schema, KubeRay structure, and every command they
(and cluster/README.md) run exists in the project's real command lines.

The ``ray job submit`` of ``cluster/runtime_env.yaml`` against a local ``ray start --head`` is
tests/test_train_job.py (one slow head start for the suite, not two).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
KUBERAY = CLUSTER / "kuberay"
GPUS_IN_PAPER_SETTING = 8


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_every_cluster_yaml_parses() -> None:
    assert {p.relative_to(CLUSTER).as_posix() for p in YAMLS} >= {
        "aws-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
    }
    for path in YAMLS:
        assert isinstance(_load(path), dict), path


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_aws_config_validates_against_the_schema_shipped_with_ray() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(CLUSTER / "aws-gpu.yaml")
    jsonschema.validate(config, schema)
    # Ray's own check after filling provider defaults (what `ray up` does first).
    validate_config(prepare_config(config))


def test_aws_config_is_sized_for_the_paper_and_installs_the_project() -> None:
    config = _load(CLUSTER / "aws-gpu.yaml")
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = sum(n["resources"].get("GPU", 0) * n.get("max_workers", 0) for n in nodes.values())
    assert gpus == GPUS_IN_PAPER_SETTING
    assert any(n.get("min_workers", 0) < n.get("max_workers", 0) for n in nodes.values())  # autoscaling
    assert config["file_mounts"] == {"/home/ray/pof3d": "."}
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "/home/ray/pof3d" in setup and "torch==" in setup
    run_options = " ".join(config["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in run_options and "POF3D_STORAGE=s3://" in run_options
    assert config["docker"]["image"].startswith("rayproject/ray:") and "gpu" in config["docker"]["image"]


# ---------------------------------------------------------------------------------------------
# KubeRay: the fields the RayCluster / RayJob CRDs (ray.io/v1) require


def _check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    return containers


def _check_shm(template: dict[str, Any], where: str) -> None:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    mounts = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]
    shm = [m for m in mounts if m["mountPath"] == "/dev/shm"]
    assert shm, f"{where}: no /dev/shm volume for the object store"
    assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where


def _check_cluster_spec(spec: dict[str, Any], where: str) -> int:
    """Structural check of a RayCluster spec; returns the GPUs at maximum size."""
    assert str(spec["rayVersion"]).startswith("2."), where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    head_containers = _check_pod_template(head["template"], f"{where} head")
    _check_shm(head["template"], f"{where} head")
    env = {e["name"]: e.get("value", "") for e in head_containers[0].get("env", [])}
    assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), f"{where}: no MLflow server reference"
    gpus = 0
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        name = f"{where} worker group {group.get('groupName')}"
        assert group["groupName"] and isinstance(group["rayStartParams"], dict), name
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        containers = _check_pod_template(group["template"], name)
        _check_shm(group["template"], name)
        limits = containers[0]["resources"]["limits"]
        requests = containers[0]["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}: no GPU limit"
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], name
        gpus += int(limits["nvidia.com/gpu"]) * group["maxReplicas"]
    return gpus


def test_kuberay_raycluster_has_the_required_fields() -> None:
    doc = _load(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    assert _check_cluster_spec(doc["spec"], "raycluster.yaml") == GPUS_IN_PAPER_SETTING


def test_kuberay_rayjob_has_the_required_fields() -> None:
    doc = _load(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m pof3d.train ")
    assert "--preset ffhq256" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    # The job-submission runtime_env's settings hold in the RayJob too (the same training, submitted).
    submitted = _load(CLUSTER / "runtime_env.yaml")
    assert submitted["env_vars"].items() <= runtime_env["env_vars"].items()
    assert any(p.startswith("torch") for p in runtime_env["pip"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml") == GPUS_IN_PAPER_SETTING


# ---------------------------------------------------------------------------------------------
# Every command the configs and the cluster README run exists in the real command lines

COMMAND = re.compile(r"python3? (?:-m (pof3d(?:\.\w+)+)|(sweeps/\w+\.py))((?:[^\n`|&;#]|\\\n)*)")


def _texts() -> dict[str, str]:
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in YAMLS}
    readme = CLUSTER / "README.md"
    if readme.exists():
        texts["cluster/README.md"] = readme.read_text()
    return texts


def _commands() -> list[tuple[str, str, list[str]]]:
    """(source, program, argument tokens) of every project command found in the configs."""
    found = []
    for source, text in _texts().items():
        # Folded YAML scalars and shell line continuations become one line.
        flat = re.sub(r"\\\n\s*", " ", text)
        if source.endswith(".yaml"):
            flat = _flatten_yaml_strings(yaml.safe_load(text))
        for match in COMMAND.finditer(flat):
            program = match.group(1) or match.group(2)
            found.append((source, program, shlex.split(match.group(3).replace("\\\n", " "))))
    return found


def _flatten_yaml_strings(node: Any) -> str:
    if isinstance(node, str):
        return node + "\n"
    if isinstance(node, dict):
        return "".join(_flatten_yaml_strings(v) for v in node.values())
    if isinstance(node, list):
        return "".join(_flatten_yaml_strings(v) for v in node)
    return ""


@functools.cache
def _help(program: str, subcommand: str | None) -> str:
    argv = [sys.executable, "-m", program] if program.startswith("pof3d") else [sys.executable, program]
    argv += [subcommand, "--help"] if subcommand else ["--help"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}"
    return result.stdout


def test_every_command_in_the_configs_exists_with_its_flags() -> None:
    commands = _commands()
    assert any(src == "cluster/kuberay/rayjob.yaml" and prog == "pof3d.train" for src, prog, _ in commands)
    for source, program, args in commands:
        top = _help(program, None)
        subcommand = args[0] if args and not args[0].startswith("-") and f" {args[0]}" in top else None
        text = _help(program, subcommand) if subcommand else top
        valid = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
        for token in args:
            flag = token.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in valid, f"{source}: `{program}` has no flag {flag}; it has {sorted(valid)}"


@pytest.mark.parametrize("program", ["pof3d.train"])
def test_command_check_catches_a_wrong_flag(program: str) -> None:
    """The check above is only worth something if a typo would fail it."""
    valid = set(re.findall(r"(--[a-z][a-z0-9-]*)", _help(program, None)))
    assert "--preset" in valid and "--gpu-per-worker" not in valid
