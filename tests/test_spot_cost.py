"""benchmarks/spot_cost.py: the cost model of cluster/README.md's table, on cases worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from spot_cost import elastic, fixed, parse_args, rows  # noqa: E402


def test_without_reclaims_every_setup_is_its_hours_times_its_price() -> None:
    a = parse_args(["--reclaim-every-h", "1000"])
    rate = a.kimg / a.hours
    (name, _, _, on_demand, cost), (_, _, _, spot, spot_cost), *_ = rows(a)
    assert on_demand.wall_h == pytest.approx(115) and cost == pytest.approx(115 * 55.04)
    assert spot.reclaims == 0 and spot_cost == pytest.approx(115 * 23.65, rel=1e-3)
    both = elastic(a.kimg, rate, 40, a)  # both nodes all along: 1.8 times as fast, both billed
    assert both.reclaims == 0 and both.wall_h == pytest.approx(115 / 1.8, rel=1e-3)
    assert both.on_demand_h == pytest.approx(both.spot_h, rel=1e-3)


def test_a_reclaim_costs_what_the_model_says() -> None:
    # One reclaim in a 15 h run: half of a 217 kimg-per-hour snapshot interval redone, a restart, a wait.
    a = parse_args(["--hours", "15", "--kimg", "3000", "--reclaim-every-h", "10"])
    rate = a.kimg / a.hours
    run = fixed(a.kimg, rate, 200, a, spot=True)
    redone_h = 100 / rate
    assert run.reclaims == 1
    assert run.spot_h == pytest.approx(15 + redone_h + 2 / 60, abs=0.01)
    assert run.wall_h == pytest.approx(run.spot_h + 0.5, abs=0.01)
    # Elastic, reclaimed after 5 h (1,800 kimg at 1.8 x 200 per hour): the shrink redoes 100 kimg and
    # restarts (2 min); one node trains the 30 min until the new spot node joins (100 kimg); the grow
    # restarts (2 min) from its own checkpoint, redoing nothing; the last 1,200 kimg at 360 per hour.
    a = parse_args(["--hours", "15", "--kimg", "3000", "--reclaim-every-h", "5"])
    pair = elastic(a.kimg, rate, 200, a)
    assert pair.reclaims == 1
    assert pair.wall_h == pytest.approx(5 + 2 / 60 + 0.5 + 2 / 60 + 1200 / 360, abs=0.01)
    assert pair.on_demand_h == pair.wall_h
    assert pair.spot_h == pytest.approx(5 + 2 / 60 + 1200 / 360, abs=0.01)
