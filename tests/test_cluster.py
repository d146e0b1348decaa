"""The cluster configs are checked, not just written: their schema and structure (token authentication on
every node, the dashboard kept private, one prebuilt image, nothing installed at job start). The commands
they run are checked in test_cluster_commands.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_files import CLUSTER, KUBERAY, ROOT, SBATCH, YAMLS, container_env, load_yaml
from packaging.requirements import Requirement

GPUS_IN_PAPER_SETTING = 8


def _requirements() -> dict[str, Requirement]:
    lines = (CLUSTER / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def _pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"cluster/requirements.txt: {req} is not an exact pin"
    return spec.version


def _ray_version() -> str:
    return _pinned(_requirements()["ray"])


def test_every_cluster_yaml_parses() -> None:
    assert {p.relative_to(CLUSTER).as_posix() for p in YAMLS} >= {
        "aws-gpu.yaml",
        "runtime_env.yaml",
        "kuberay/serviceaccount.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
    }
    for path in YAMLS:
        assert isinstance(load_yaml(path), dict), path


# ---------------------------------------------------------------------------------------------
# The prebuilt image: Ray's image for the pinned Ray, the pinned dependencies, the project


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_image_pins_every_dependency_within_pyproject_and_builds_on_the_same_ray() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _requirements()
    for dep in map(Requirement, project["dependencies"]):
        assert dep.name.lower() in pins, f"cluster/requirements.txt does not pin {dep.name}"
        version = _pinned(pins[dep.name.lower()])
        assert dep.specifier.contains(version), f"{dep.name}=={version} is outside pyproject's {dep}"
        assert pins[dep.name.lower()].extras >= dep.extras, f"{dep.name}: extras {dep.extras} missing"
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", _dockerfile(), re.M)
    assert base, "cluster/Dockerfile does not build on rayproject/ray"
    tag = base.group(1)
    # <ray>-py311-cu130: the pinned Ray, the Python the project targets, a named CUDA (not the old "-gpu").
    assert re.fullmatch(rf"{re.escape(_ray_version())}-py311-cu\d+", tag), tag
    assert f"ray.__version__ == '{_ray_version()}'" in _dockerfile()


def test_image_copies_what_exists_and_the_build_context_lets_it_through() -> None:
    copied = [
        src
        for line in _dockerfile().splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
        if not src.startswith("--")
    ]
    assert {"pof3d", "sweeps", "pyproject.toml", "cluster/requirements.txt"} <= set(copied)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for src in copied:
        assert (ROOT / src).exists(), f"cluster/Dockerfile copies {src}, which does not exist"
        assert src in allowed, f"Dockerfile.dockerignore keeps {src} out of the build context"


# ---------------------------------------------------------------------------------------------
# The images, tokens, dashboards and installs of every config


def _kuberay_cluster_specs() -> dict[str, dict[str, Any]]:
    rayjob = load_yaml(KUBERAY / "rayjob.yaml")
    return {
        "raycluster.yaml": load_yaml(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob.yaml": rayjob["spec"]["rayClusterSpec"],
    }


def _pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return templates


def test_one_prebuilt_image_everywhere() -> None:
    aws = load_yaml(CLUSTER / "aws-gpu.yaml")
    images = {("aws-gpu.yaml", "docker"): aws["docker"]["image"]}
    for node_type, node in aws["available_node_types"].items():
        assert "worker_image" not in node.get("docker", {}), node_type
    for source, spec in _kuberay_cluster_specs().items():
        for group, template in _pod_templates(spec).items():
            for container in template["spec"]["containers"]:
                images[(source, group)] = container["image"]
        assert spec["rayVersion"] == _ray_version(), source
    assert len(set(images.values())) == 1, images
    image = next(iter(images.values()))
    assert not image.startswith("rayproject/"), "configs must run the image built from cluster/Dockerfile"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image.endswith(f"/pof3d:{version}"), image


def test_no_config_installs_packages_at_start() -> None:
    aws = load_yaml(CLUSTER / "aws-gpu.yaml")
    commands = [
        c
        for key in (
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "initialization_commands",
        )
        for c in aws.get(key, [])
    ]
    assert not any(re.search(r"\b(pip|uv|conda)\b", c) for c in commands), commands
    submitted = load_yaml(CLUSTER / "runtime_env.yaml")
    rayjob = yaml.safe_load(load_yaml(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for where, env in (("runtime_env.yaml", submitted), ("rayjob.yaml runtimeEnvYAML", rayjob)):
        assert not {"pip", "uv", "conda", "py_modules"} & set(env), f"{where}: {env}"
    assert "working_dir" not in rayjob  # the RayJob runs the image's pof3d
    assert submitted["env_vars"].items() <= rayjob["env_vars"].items()  # the same job environment


def test_aws_config_validates_against_the_schema_shipped_with_ray() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load_yaml(CLUSTER / "aws-gpu.yaml")
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check after filling defaults (what `ray up` does)


def test_aws_workers_watch_for_a_spot_interruption_notice() -> None:
    """Ray's launcher does nothing with AWS's two-minute notice; each worker runs the watcher that drains
    its node as a preemption (tests/test_spot_notice.py), in the background, after its Ray started."""
    import importlib.util

    commands = load_yaml(CLUSTER / "aws-gpu.yaml")["worker_start_ray_commands"]
    (watcher,) = [i for i, c in enumerate(commands) if "-m pof3d.distributed.spot_notice" in c]
    starts = [i for i, c in enumerate(commands) if c.startswith("ray start")]
    assert starts and watcher > max(starts) and commands[watcher].rstrip().endswith("&")
    assert importlib.util.find_spec("pof3d.distributed.spot_notice") is not None


def test_aws_config_secures_every_node_and_keeps_nothing_on_node_disks() -> None:
    config = load_yaml(CLUSTER / "aws-gpu.yaml")
    run_options = " ".join(config["docker"]["run_options"])
    # Every node's container, hence every Ray process on it, runs with the token.
    assert "--env RAY_AUTH_MODE=token" in run_options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", run_options).group(1)
    assert config["file_mounts"][token_path] == "~/.ray/auth_token"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert re.search(r"POF3D_STORAGE=s3://", run_options) and "MLFLOW_TRACKING_URI=" in run_options
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_nodes = [n for n in nodes.values() if n["resources"].get("GPU", 0)]
    # The paper's 8 GPUs on demand; a spot node of the same kind beside them for elastic runs.
    spot = [
        n for n in gpu_nodes if n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    on_demand = [n for n in gpu_nodes if n not in spot]
    assert sum(n["resources"]["GPU"] * n["max_workers"] for n in on_demand) == GPUS_IN_PAPER_SETTING
    assert spot and config["max_workers"] == sum(n["max_workers"] for n in gpu_nodes)
    for node in gpu_nodes:
        assert node["min_workers"] == 0  # scale from zero: the job waits for the autoscaler
        assert "--gpus all" in node["docker"]["worker_run_options"]
        assert "IamInstanceProfile" in node["node_config"]  # the bucket is reached by the node's role
    for node in nodes.values():
        # A Deep Learning AMI (Docker + NVIDIA driver + container toolkit), not a stock OS image.
        assert "/aws/service/deeplearning/ami/" in node["node_config"]["ImageId"]


def _check_shm(template: dict[str, Any], where: str) -> None:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    mounts = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]
    shm = [m for m in mounts if m["mountPath"] == "/dev/shm"]
    assert shm, f"{where}: no /dev/shm volume for the object store"
    assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where


@pytest.mark.parametrize("source", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_has_token_auth_storage_identity_and_the_paper_size(source: str) -> None:
    spec = _kuberay_cluster_specs()[source]
    # KubeRay >= 1.5.1 generates the token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container.
    assert spec["authOptions"]["mode"] == "token", source
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{source}: head Service exposed"
    account = load_yaml(KUBERAY / "serviceaccount.yaml")
    assert (account["kind"], account["apiVersion"]) == ("ServiceAccount", "v1")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    gpus = 0
    for group, template in _pod_templates(spec).items():
        where = f"{source} {group}"
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where
        _check_shm(template, where)
        (container,) = template["spec"]["containers"]
        env = container_env(container)
        assert env["POF3D_STORAGE"].startswith("s3://") and env["MLFLOW_TRACKING_URI"].startswith("http")
        assert "RAY_AUTH_MODE" not in env or env["RAY_AUTH_MODE"] == "token", where
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], source
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        gpus += int(limits["nvidia.com/gpu"]) * group["maxReplicas"]
    assert gpus == GPUS_IN_PAPER_SETTING, source


def test_kuberay_long_lived_cluster_scales_from_zero_and_the_job_retries_into_the_same_run() -> None:
    cluster = load_yaml(KUBERAY / "raycluster.yaml")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])
    job = load_yaml(KUBERAY / "rayjob.yaml")["spec"]
    assert job["backoffLimit"] >= 1 and job["shutdownAfterJobFinishes"] is True
    assert "--resume auto" in job["entrypoint"]  # a retry continues instead of starting over
    # The stated KubeRay version covers both features used: authOptions (1.5.1) and backoffLimit (1.2).
    for path in (KUBERAY / "rayjob.yaml", KUBERAY / "raycluster.yaml", CLUSTER / "README.md"):
        assert "KubeRay >= 1.5.1" in path.read_text().replace("≥", ">="), path


def test_sbatch_script_is_valid_bash_and_requeue_friendly() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    directives = dict(
        (line.split("=", 1) + [""])[:2] for line in text.splitlines() if line.startswith("#SBATCH ")
    )
    assert "#SBATCH --requeue" in directives and directives["#SBATCH --signal"].startswith("B:USR1@")
    assert directives["#SBATCH --open-mode"] == "append"
    assert re.search(r"^trap warned USR1$", text, re.M) and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "export RAY_AUTH_MODE=token" in text
    head_start = next(line for line in text.replace("\\\n", " ").splitlines() if " --head " in line)
    assert "--dashboard-host=127.0.0.1" in head_start and "--block" in text and '-w "$node"' in text
