"""Every project command that cluster/ and its README run goes through pof3d's real command-line parser
and planner, as argument lists taken from the files themselves.

The object-store commands run against the session's S3 server: the configs' bucket name is rewritten to
a fresh bucket there. The ``ray job submit`` of ``cluster/runtime_env.yaml`` against a local
``ray start --head`` is tests/test_train_job.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from typing import Any

import pytest
from cluster_files import CLUSTER, CONFIG_BUCKET, KUBERAY, ROOT, SBATCH, YAMLS, container_env, load_yaml

import pof3d.studies.cli
import pof3d.train

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
        for string in _yaml_strings(load_yaml(path)):
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
    rayjob_head = load_yaml(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    env_storage = {"cluster/kuberay/rayjob.yaml": container_env(rayjob_head["spec"]["containers"][0])}
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
