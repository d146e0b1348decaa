"""The cost table of cluster/README.md (*Cost on paper*): a paper-size run on on-demand, spot and elastic
capacity, from stated assumptions (no measurement; every figure below is an input you can change).

    python benchmarks/spot_cost.py [--hours 115] [--reclaim-every-h 10] [--speedup 1.8] [--restart-min 2]

A run is ``--kimg`` of work that one 8-GPU node trains in ``--hours``. A spot node is taken back after
every ``--reclaim-every-h`` hours of use, and a new one trains ``--replace-min`` later (not billed). Every
restart of the worker group costs ``--restart-min`` of billed, untrained time. A restart from a
checkpoint redoes on average half a snapshot interval (``train.snapshot_kimg``), except a grow of an
elastic run: the group checkpoints before it stops (pof3d/distributed/group_watch.py), so it redoes
nothing. An elastic pair (one on-demand node, one spot node, ``--workers 8-16``) trains ``--speedup``
times as fast while both nodes are up.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

STEP_H = 1 / 600  # the simulation's time step: 6 s


@dataclass
class Outcome:
    reclaims: int
    wall_h: float
    on_demand_h: float  # billed node-hours
    spot_h: float


def fixed(kimg: float, rate: float, snapshot_kimg: float, a: argparse.Namespace, spot: bool) -> Outcome:
    """One node, ``--workers 8``: on demand it just trains; on spot it stops at each reclaim."""
    if not spot:
        return Outcome(0, kimg / rate, kimg / rate, 0.0)
    done, wall, billed, used, reclaims = 0.0, 0.0, 0.0, 0.0, 0
    while done < kimg:
        step = min(STEP_H, (kimg - done) / rate)
        done, wall, billed, used = done + rate * step, wall + step, billed + step, used + step
        if used >= a.reclaim_every_h and done < kimg:
            reclaims, used = reclaims + 1, 0.0
            done -= snapshot_kimg / 2  # back to the last snapshot, on average half an interval
            wall += a.replace_min / 60 + a.restart_min / 60
            billed += a.restart_min / 60
    return Outcome(reclaims, wall, 0.0, billed)


def elastic(kimg: float, rate: float, snapshot_kimg: float, a: argparse.Namespace) -> Outcome:
    """An on-demand node and a spot node, ``--workers 8-16``: the run never stops."""
    done, wall, spot_h, used, reclaims = 0.0, 0.0, 0.0, 0.0, 0
    spot_back_at: float | None = None  # wall time the replacement spot node joins
    while done < kimg:
        both = spot_back_at is None
        speed = rate * (a.speedup if both else 1.0)
        step = min(STEP_H, (kimg - done) / speed)
        done, wall = done + speed * step, wall + step
        if both:
            spot_h, used = spot_h + step, used + step
            if used >= a.reclaim_every_h and done < kimg:  # the shrink: no notice assumed
                reclaims, used = reclaims + 1, 0.0
                done -= snapshot_kimg / 2
                wall += a.restart_min / 60
                spot_back_at = wall + a.replace_min / 60
        elif wall >= spot_back_at:  # the grow: a checkpoint first, nothing redone
            wall += a.restart_min / 60
            spot_h += a.restart_min / 60
            spot_back_at = None
    return Outcome(reclaims, wall, wall, spot_h)


def rows(a: argparse.Namespace) -> list[tuple[str, str, str, Outcome, float]]:
    rate = a.kimg / a.hours
    od, spot = a.on_demand_price, a.spot_price
    out = []
    for name, command, price, outcome in (
        ("on demand, one node", "--workers 8", f"{od:.2f}", fixed(a.kimg, rate, 200, a, spot=False)),
        ("spot, one node", "--workers 8", f"{spot:.2f}", fixed(a.kimg, rate, 200, a, spot=True)),
        (
            "spot, snapshots every 40 kimg",
            "--workers 8 --set train.snapshot_kimg=40",
            f"{spot:.2f}",
            fixed(a.kimg, rate, 40, a, spot=True),
        ),
        (
            "on demand + spot, elastic",
            "--workers 8-16 --set train.snapshot_kimg=40",
            f"{od:.2f} + {spot:.2f}",
            elastic(a.kimg, rate, 40, a),
        ),
    ):
        cost = outcome.on_demand_h * od + outcome.spot_h * spot
        out.append((name, command, price, outcome, cost))
    return out


def table(a: argparse.Namespace) -> str:
    lines = [
        "| setup | command | $/h | reclaims | wall clock | billed node-hours | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, command, price, o, cost in rows(a):
        billed = " + ".join(f"{h:.0f}" for h in (o.on_demand_h, o.spot_h) if h > 0)
        reclaims = str(o.reclaims) if o.reclaims or o.spot_h else "–"
        cells = [name, f"`{command}`", price, reclaims, f"{o.wall_h:.0f} h", billed, f"**${cost:,.0f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kimg", type=float, default=25000.0, help="the run's length (ffhq256: 25,000)")
    p.add_argument("--hours", type=float, default=115.0, help="hours of one 8-GPU node for the whole run")
    p.add_argument("--on-demand-price", type=float, default=55.04, help="$/h, p5.48xlarge on demand")
    p.add_argument("--spot-price", type=float, default=23.65, help="$/h, p5.48xlarge on spot (assumed)")
    p.add_argument("--reclaim-every-h", type=float, default=10.0, help="hours of spot use per reclaim")
    p.add_argument("--replace-min", type=float, default=30.0, help="minutes until a new spot node trains")
    p.add_argument("--restart-min", type=float, default=2.0, help="minutes per worker-group restart")
    p.add_argument("--speedup", type=float, default=1.8, help="16 workers' speed over 8")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    print(table(args))
