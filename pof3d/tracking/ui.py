"""What the MLflow UI shows of a run besides its figures: links that open the training view, who ran
what (source, user, description), and where the samples and pose plots are.

MLflow 3.17's UI opens every experiment in its GenAI view (traces, judges, prompts; a logged model is
listed as an "agent version") unless the page's URL says ``workflowType=machine_learning``, or the user
switched the sidebar to *Model training* in that browser before. The ``mlflow.experimentKind`` tag no
longer decides it (the UI reads it only where the workflow switch is off, and 3.17 ships with it on), so
every link printed here carries the query.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRAINING_VIEW_QUERY = "workflowType=machine_learning"  # the UI's query for its model-training view
LOCAL_UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default
# Image series keys: everything before the last "/" is the chart view's section, and sections are sorted
# by name (capitals before lower case), so the figures open the chart view instead of closing it.
FIGURES_SECTION = "Figures"
FIGURES_ARTIFACT_DIR = "samples"  # the same files as the run directory's samples/, on the run's page

SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
USER = "mlflow.user"
NOTE = "mlflow.note.content"  # the run's description (markdown) on its Overview tab
PARENT_RUN = "mlflow.parentRunId"
# What a study's trial takes from its parent run: a trial's process is a Ray worker, whose own command
# line says nothing about who started what.
INHERITED = (SOURCE_NAME, SOURCE_TYPE, USER, "mlflow.source.git.commit", "mlflow.source.git.repoURL")


def figure_key(name: str) -> str:
    """The image series of figure ``name`` ("samples", "poses")."""
    return f"{FIGURES_SECTION}/{name}"


def ui_base(tracking_uri: str) -> str:
    """Where the UI of ``tracking_uri`` is: the server itself, or ``mlflow ui``'s default address."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI_URL


def run_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of run ``run_id`` (or of the experiment's runs), in the training view."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{ui_base(tracking_uri)}/{page}?{TRAINING_VIEW_QUERY}"


# -- who ran what -----------------------------------------------------------------------------------


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as typed: ``python -m pof3d.train --preset tiny``, ``python
    sweeps/ablation.py``, or an installed script by its name (``pof3d-train --kimg 1``)."""
    args = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    if args and Path(args[0]).name.startswith("python"):
        args[0] = "python"
        if len(args) > 1 and Path(args[1]).parent == Path(sys.executable).parent:
            args = [Path(args[1]).name, *args[2:]]  # a console script, run by its shebang
    return shlex.join(args)


def command_name(argv: list[str] | None = None) -> str:
    """The command without its options: ``python -m pof3d.train``, ``python sweeps/ablation.py``."""
    args = shlex.split(command_line(argv))
    words = 3 if len(args) >= 3 and args[1] == "-m" else 2 if args and args[0] == "python" else 1
    return shlex.join(args[:words])


def source_tags(description: str | None = None) -> dict[str, str]:
    """MLflow's standard tags of a run started by this process: its source (the command), the user,
    the git commit where the code is a checkout, and ``description`` as the run's description."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()  # the user and git commit; its source would be the script's path
    tags.update({SOURCE_NAME: command_name(), SOURCE_TYPE: "LOCAL"})
    if description:
        tags[NOTE] = description
    return tags


def run_description(params: Mapping[str, Any], command: str) -> str:
    """The description of a training run: what started it, where its files are and where to look."""
    where = params.get("run.run_dir")
    lines = [
        f"pof3d training run (preset `{params.get('preset', '?')}`, {params.get('train.kimg', '?')} kimg, "
        f"seed {params.get('train.seed', '?')}), started by `{command}`.",
        "",
        *(
            [f"- Run directory: `{where}` (config.json, metrics.jsonl, checkpoints/, samples/)."]
            if where
            else []
        ),
        f"- Sample grids and pose plots: the **{FIGURES_SECTION}** section at the top of the experiment's "
        "*Chart view* (one image per snapshot; its step slider walks through training; the card's "
        "*Show run parameters* switch hides the parameters above the image), and as files under "
        f"*Artifacts* → `{FIGURES_ARTIFACT_DIR}/`.",
        "- Every tick's figures: *Model metrics* (step = images seen); nodes' CPU, memory and GPU: "
        "*System metrics*.",
        "- The trained generator: *Logged models* → `generator` (`mlflow.pyfunc.load_model`).",
    ]
    return "\n".join(lines)


def study_description(study: str, command: str) -> str:
    """The description of a study's parent run."""
    return (
        f"pof3d study `{study}`, started by `{command}`: one child run per trial (expand this run in the "
        "experiment's run list, or select the children and *Compare*); the results table is "
        "`results_table.json` under *Artifacts*."
    )


def inherited_tags(client: Any, tags: Mapping[str, str]) -> dict[str, str]:
    """For a child run (``mlflow.parentRunId`` in ``tags``): its parent's source and user."""
    from mlflow.exceptions import MlflowException

    parent = tags.get(PARENT_RUN)
    if not parent:
        return {}
    try:
        parent_tags = client.get_run(parent).data.tags
    except MlflowException:  # a parent that is gone: the trial still gets its own run
        return {}
    return {key: parent_tags[key] for key in INHERITED if key in parent_tags}
