"""A new local MLflow store starts as a copy of an empty store made once by MLflow (pof3d.tracking.store):
the same schema as one MLflow builds, a working store, its Default experiment pointed at its own folder."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from pof3d.cache import CACHE_ENV
from pof3d.tracking import client_for, default_tracking_uri, experiment_id


def _schema(db: Path) -> tuple[dict[str, list[str]], list[tuple[str]]]:
    """Each table's and index's definition as a sorted list of its lines, and the schema version. Sorted:
    two stores MLflow builds itself list a table's constraints in different orders."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        tables = {name: sorted(line.strip().rstrip(",") for line in sql.splitlines()) for name, sql in rows}
        version = list(con.execute("SELECT version_num FROM alembic_version"))
    return tables, version


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def test_a_new_store_is_a_copy_of_the_empty_store_with_the_schema_mlflow_builds(tmp_path, cache) -> None:
    first = tmp_path / "run-a" / "mlflow.db"
    client_for(default_tracking_uri(first.parent))
    template = cache / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    assert template.exists() and first.exists()
    # A store MLflow builds itself, migrations and all, has the same tables and schema version.
    built = tmp_path / "built.db"
    SqlAlchemyStore(f"sqlite:///{built}", (tmp_path / "artifacts").as_uri()).engine.dispose()
    assert _schema(first) == _schema(built)
    # Later stores copy the template in milliseconds rather than migrating for seconds.
    started = time.monotonic()
    second = client_for(default_tracking_uri(tmp_path / "run-b"))
    assert time.monotonic() - started < 1.0
    # The copy is a working store: an experiment, a run with a metric, read back.
    uri = default_tracking_uri(tmp_path / "run-b")
    exp = experiment_id(second, "pof3d", uri)
    run = second.create_run(exp)
    second.log_metric(run.info.run_id, "loss", 0.5, step=3)
    assert [(m.value, m.step) for m in second.get_metric_history(run.info.run_id, "loss")] == [(0.5, 3)]
    assert second.get_experiment(exp).artifact_location == (tmp_path / "run-b" / "mlartifacts").as_uri()


def test_the_default_experiment_points_at_its_own_store_not_at_the_template(tmp_path, cache) -> None:
    client_for(default_tracking_uri(tmp_path / "one"))
    before = int(time.time() * 1000)
    client = client_for(default_tracking_uri(tmp_path / "two"))
    (default,) = client.search_experiments()
    assert default.name == "Default"
    assert default.artifact_location == (tmp_path / "two" / "mlartifacts" / "0").as_uri()
    assert default.creation_time >= before
    assert not list((tmp_path / "two").glob(".*partial"))  # no half-made copy left behind


def test_an_existing_store_is_left_as_it_is(tmp_path, cache) -> None:
    uri = default_tracking_uri(tmp_path / "run")
    client = client_for(uri)
    run = client.create_run(experiment_id(client, "pof3d", uri))
    db = tmp_path / "run" / "mlflow.db"
    modified = db.stat().st_mtime_ns
    again = client_for(uri)
    assert db.stat().st_mtime_ns == modified
    assert again.get_run(run.info.run_id).info.run_id == run.info.run_id


def test_without_a_usable_cache_mlflow_builds_the_store_itself(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    uri = default_tracking_uri(tmp_path / "run")
    client = client_for(uri)
    exp = experiment_id(client, "pof3d", uri)
    assert client.get_experiment(exp).name == "pof3d"
    assert _schema(tmp_path / "run" / "mlflow.db")[1] == _schema_version_mlflow_builds(tmp_path)


def _schema_version_mlflow_builds(tmp_path: Path) -> list[tuple[str]]:
    built = tmp_path / "reference.db"
    SqlAlchemyStore(f"sqlite:///{built}", (tmp_path / "artifacts").as_uri()).engine.dispose()
    return _schema(built)[1]
