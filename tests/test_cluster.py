"""The cluster configs are checked, not just written: their schema and structure (token authentication on
every node, the dashboard kept private, one prebuilt image, nothing installed at job start), and every
command that cluster/ and its README run goes through pof3d's real command-line parser and planner.

The object-store commands run against the session's S3 server: the configs' bucket name is rewritten to
a fresh bucket there. The ``ray job submit`` of ``cluster/runtime_env.yaml`` against a local
``ray start --head`` is tests/test_train_job.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

import pof3d.studies.cli
import pof3d.train

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SBATCH = CLUSTER / "slurm" / "pof3d.sbatch"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
GPUS_IN_PAPER_SETTING = 8
CONFIG_BUCKET = "pof3d-bucket"  # the placeholder bucket every config and the README use


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


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
        assert isinstance(_load(path), dict), path


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
    rayjob = _load(KUBERAY / "rayjob.yaml")
    return {
        "raycluster.yaml": _load(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob.yaml": rayjob["spec"]["rayClusterSpec"],
    }


def _pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return templates


def test_one_prebuilt_image_everywhere() -> None:
    aws = _load(CLUSTER / "aws-gpu.yaml")
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
    aws = _load(CLUSTER / "aws-gpu.yaml")
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
    submitted = _load(CLUSTER / "runtime_env.yaml")
    rayjob = yaml.safe_load(_load(KUBERAY / "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for where, env in (("runtime_env.yaml", submitted), ("rayjob.yaml runtimeEnvYAML", rayjob)):
        assert not {"pip", "uv", "conda", "py_modules"} & set(env), f"{where}: {env}"
    assert "working_dir" not in rayjob  # the RayJob runs the image's pof3d
    assert submitted["env_vars"].items() <= rayjob["env_vars"].items()  # the same job environment


def test_aws_config_validates_against_the_schema_shipped_with_ray() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(CLUSTER / "aws-gpu.yaml")
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check after filling defaults (what `ray up` does)


def test_aws_config_secures_every_node_and_keeps_nothing_on_node_disks() -> None:
    config = _load(CLUSTER / "aws-gpu.yaml")
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
    assert sum(n["resources"]["GPU"] * n["max_workers"] for n in gpu_nodes) == GPUS_IN_PAPER_SETTING
    for node in gpu_nodes:
        assert node["min_workers"] == 0  # scale from zero: the job waits for the autoscaler
        assert "--gpus all" in node["docker"]["worker_run_options"]
        assert "IamInstanceProfile" in node["node_config"]  # the bucket is reached by the node's role
    for node in nodes.values():
        # A Deep Learning AMI (Docker + NVIDIA driver + container toolkit), not a stock OS image.
        assert "/aws/service/deeplearning/ami/" in node["node_config"]["ImageId"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


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
    account = _load(KUBERAY / "serviceaccount.yaml")
    assert (account["kind"], account["apiVersion"]) == ("ServiceAccount", "v1")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    gpus = 0
    for group, template in _pod_templates(spec).items():
        where = f"{source} {group}"
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where
        _check_shm(template, where)
        (container,) = template["spec"]["containers"]
        env = _env(container)
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
    cluster = _load(KUBERAY / "raycluster.yaml")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])
    job = _load(KUBERAY / "rayjob.yaml")["spec"]
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
    assert re.search(r"^trap requeue USR1$", text, re.M) and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "export RAY_AUTH_MODE=token" in text
    head_start = next(line for line in text.splitlines() if "ray start --head" in line)
    assert "--dashboard-host=127.0.0.1" in head_start and "--block" in text and '-w "$head_node"' in text


# ---------------------------------------------------------------------------------------------
# Every project command that cluster/ and its README run, as argument lists


PROGRAMS = {("-m", "pof3d.train"): "pof3d.train", ("sweeps/ablation.py",): "sweeps/ablation.py"}
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", "<", ">>", "2>"}


def _command_at(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """(program, arguments) for each ``python[3] -m pof3d.train …`` / ``python sweeps/ablation.py …``."""
    found = []
    for i, token in enumerate(tokens):
        if token not in ("python", "python3"):
            continue
        for prefix, program in PROGRAMS.items():
            if tuple(tokens[i + 1 : i + 1 + len(prefix)]) == prefix:
                rest = tokens[i + 1 + len(prefix) :]
                end = next((j for j, t in enumerate(rest) if t in SHELL_OPERATORS), len(rest))
                found.append((program, rest[:end]))
    return found


def _shell_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _readme_commands() -> list[tuple[str, list[str]]]:
    text = (CLUSTER / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            found += _command_at(_shell_tokens(line))
    return found


def _yaml_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _yaml_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _yaml_strings(v)]
    return []


def _sbatch_command(env: dict[str, str]) -> list[str]:
    """The training command exactly as the batch script builds it: its settings run in bash."""
    text = SBATCH.read_text()
    settings = text.split("# ---- end of settings ----")[0]
    script = f'{settings}\nprintf "%s\\0" "${{TRAIN[@]}}"\n'
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.split("\0")[:-1]


def _commands(slurm_env: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(source, program, arguments) of every project command that cluster/ runs."""
    found = [("cluster/README.md", p, a) for p, a in _readme_commands()]
    for path in YAMLS:
        for string in _yaml_strings(_load(path)):
            source = path.relative_to(ROOT).as_posix()
            found += [(source, p, a) for p, a in _command_at(_shell_tokens(string))]
    train = _sbatch_command(slurm_env)
    found += [("cluster/slurm/pof3d.sbatch", p, a) for p, a in _command_at(train)]
    return found


def _slurm_env(storage: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "POF3D_STORAGE": storage,
            "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}  # fmt: skip


def _exact_flags(parser, args: list[str], where: str) -> None:
    """argparse accepts unambiguous prefixes (--run for --run-dir): configs must spell flags in full."""
    for token in args:
        flag = token.split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in parser._option_string_actions, f"{where}: {flag} is not a flag of the command"


def test_every_command_parses_with_the_real_command_lines() -> None:
    commands = _commands(_slurm_env("/shared/pof3d-runs"))
    sources = {(source, program) for source, program, _ in commands}
    assert {
        ("cluster/kuberay/rayjob.yaml", "pof3d.train"),
        ("cluster/slurm/pof3d.sbatch", "pof3d.train"),
        ("cluster/README.md", "pof3d.train"),
        ("cluster/README.md", "sweeps/ablation.py"),
    } <= sources
    for source, program, args in commands:
        where = f"{source}: {program} {shlex.join(args)}"
        if program == "pof3d.train":
            parser = pof3d.train.build_parser()
            parsed = parser.parse_args(args)
            pof3d.train.request_from_args(parsed)
            # Cluster jobs are restarted unattended: each one continues its run instead of refusing it.
            assert parsed.resume == "auto", where
        else:
            parser = pof3d.studies.cli.build_parser()  # sweeps/ablation.py runs this command
            parsed = parser.parse_args(args)
            pof3d.studies.cli.request_from_args(parsed)  # checks the variant names
            assert parsed.storage.startswith("s3://"), f"{where}: a study on a node-local path"
        _exact_flags(parser, args, where)


def test_sbatch_command_uses_the_shared_storage_and_the_allocation() -> None:
    args = _sbatch_command(_slurm_env("/shared/pof3d-runs"))
    parsed = pof3d.train.build_parser().parse_args(args[3:])
    assert args[:3] == ["python", "-m", "pof3d.train"]
    assert parsed.workers == 8 and parsed.gpus_per_worker == 1  # 2 nodes x 4 GPUs, one worker per GPU
    assert str(parsed.run_dir) == "/shared/pof3d-runs/ffhq256-a" and parsed.resume == "auto"


def test_command_check_catches_a_wrong_or_abbreviated_flag() -> None:
    """The checks above are only worth something if a typo would fail them."""
    parser = pof3d.train.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-per-worker", "1"])
    with pytest.raises(AssertionError):
        _exact_flags(parser, ["--run", "s3://b/r"], "abbreviated")


def _to_test_bucket(value: str, bucket: str) -> str:
    return value.replace(f"s3://{CONFIG_BUCKET}/", f"s3://{bucket}/")


def _find(doc: Any, predicate) -> list[Any]:
    """Values of the keys of a JSON document, at any depth, whose name satisfies ``predicate``."""
    if isinstance(doc, dict):
        own = [v for k, v in doc.items() if predicate(k)]
        return own + [x for v in doc.values() for x in _find(v, predicate)]
    if isinstance(doc, list):
        return [x for v in doc for x in _find(v, predicate)]
    return []


def test_every_training_command_plans_against_its_storage(s3_bucket, tmp_path, monkeypatch, capsys) -> None:
    """Each config's training command through the real planner (``--print-config``: resolve the preset,
    the run directory and the resume point, validate, print, exit before data or Ray), with the
    environment the config sets and its bucket on the session's S3 server."""
    shared = tmp_path / "shared"
    commands = _commands(_slurm_env(str(shared)))
    env_storage = {
        "cluster/kuberay/rayjob.yaml": _env(_load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
                                            ["headGroupSpec"]["template"]["spec"]["containers"][0]),
    }  # fmt: skip
    planned = 0
    for source, program, args in commands:
        if program != "pof3d.train":
            continue
        config_env = env_storage.get(source, {"POF3D_STORAGE": f"s3://{CONFIG_BUCKET}/runs"})
        if source.endswith(".sbatch"):
            config_env = {"POF3D_STORAGE": str(shared)}
        for name, value in config_env.items():
            monkeypatch.setenv(name, _to_test_bucket(value, s3_bucket))
        argv = [_to_test_bucket(a, s3_bucket) for a in args]
        expected_run_dir = argv[argv.index("--run-dir") + 1]
        capsys.readouterr()
        code = pof3d.train.main([*argv, "--print-config"])
        out, err = capsys.readouterr()
        where = f"{source}: {shlex.join(argv)}"
        assert code == 0, f"{where}\n{err[-3000:]}"
        printed = json.loads(out)
        run_dirs = [str(v) for v in _find(printed, lambda k: k == "run_dir")]
        assert expected_run_dir in run_dirs, f"{where}: run dir {run_dirs}"
        resume = _find(printed, lambda k: "resume" in k)
        assert resume, f"{where}: no resume point in {printed}"
        # The storage is empty, so --resume auto resolves to a fresh start, never to a checkpoint.
        assert not any("checkpoint" in str(v) for v in resume), f"{where}: resume {resume}"
        planned += 1
    assert planned >= 4  # the RayJob, the SLURM script and the README's AWS and KubeRay submissions
