"""Search spaces for ``--mode search``: parsed from a small YAML/JSON file or ``--param`` flags.

Everything is checked against the config schema before a single trial starts: the parameter must be a
real ``section.field``, bounds must be ordered (and positive on a log scale), and every value a trial
could get must be accepted by :func:`pof3d.config.apply_overrides`. Conditional parameters (``when``)
are only sampled when an earlier categorical parameter has the given value, otherwise they take their
``otherwise`` value (or the preset's), which Optuna expresses with a define-by-run space.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pof3d.config import SECTIONS, Config, apply_overrides
from pof3d.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    when: dict[str, Any] = field(default_factory=dict)
    otherwise: Any = None

    def sample(self, trial: Any) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high))
        return trial.suggest_float(self.path, self.low, self.high, log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    """Ordered parameters plus the objective(s); callable as Optuna's define-by-run space."""

    params: tuple[Param, ...]
    metrics: tuple[str, ...] = ("eval/js",)
    modes: tuple[str, ...] = ("min",)
    points: tuple[dict[str, Any], ...] = ()  # configurations tried first (e.g. the paper's values)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for param in self.params:
            if all(chosen.get(k) == v for k, v in param.when.items()):
                chosen[param.path] = param.sample(trial)
            elif param.otherwise is not None:
                fixed[param.path] = param.otherwise
        return fixed or None

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


def _where(source: str, path: str) -> str:
    return f"{source}: parameter {path!r}"


def _check_path(path: str, source: str) -> None:
    parts = path.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"{_where(source, path)} is not a config field; expected SECTION.FIELD with SECTION one of "
            f"{', '.join(SECTIONS)} (e.g. optim.pose_lr)"
        )
    section = getattr(Config(), parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if parts[1] not in names:
        raise ConfigError(
            f"{_where(source, path)} is unknown; valid fields of {parts[0]}: {', '.join(names)}"
        )


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: expected a number, got {value!r}") from exc


def parse_param(path: str, spec: Any, source: str, base: Config) -> Param:
    """Validate one parameter spec (a mapping) against the config schema and ``base``."""
    _check_path(path, source)
    where = _where(source, path)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type', got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "values", "when", "otherwise"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected type, low, high, values, when, otherwise"
        )
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(KINDS)}")
    low = high = None
    values: tuple[Any, ...] = ()
    if kind == "choice":
        raw = spec.get("values")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: 'choice' needs a non-empty list 'values', got {raw!r}")
        values = tuple(raw)
        candidates = list(values)
    else:
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: type {kind!r} needs 'low' and 'high'")
        low, high = _number(spec["low"], f"{where} low"), _number(spec["high"], f"{where} high")
        if low > high:
            raise ConfigError(f"{where}: low={low:g} is greater than high={high:g}; expected low <= high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got low={low:g}")
        if kind == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: type 'int' needs integer bounds, got low={low:g}, high={high:g}")
        candidates = [int(low), int(high)] if kind == "int" else [low, high]
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: 'when' must map an earlier choice parameter to a value, got {when!r}")
    otherwise = spec.get("otherwise")
    if otherwise is not None:
        candidates.append(otherwise)
    for value in candidates:
        try:
            apply_overrides(base, [f"{path}={_render(value)}"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: value {value!r} is not valid for the config: {exc}") from exc
    return Param(path, kind, low, high, values, dict(when), otherwise)


def _render(value: Any) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else repr(value)
        if isinstance(value, float)
        else str(value)
    )


def parse_flag(text: str) -> tuple[str, dict[str, Any]]:
    """``--param optim.g_lr=loguniform:1e-4:1e-2`` or ``--param model.pose_aware_d=choice:true,false``."""
    if "=" not in text:
        raise ConfigError(f"--param {text!r}: expected PATH=KIND:LOW:HIGH or PATH=choice:A,B,...")
    path, rest = text.split("=", 1)
    kind, _, args = rest.partition(":")
    if kind == "choice":
        values = [yaml.safe_load(v) for v in args.split(",") if v.strip()]
        return path.strip(), {"type": kind, "values": values}
    bounds = args.split(":")
    if len(bounds) != 2:
        raise ConfigError(f"--param {text!r}: expected {kind}:LOW:HIGH")
    return path.strip(), {"type": kind, "low": bounds[0], "high": bounds[1]}


def _as_tuple(value: Any, what: str, source: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{source}: '{what}' must be a name or a list of names, got {value!r}")
    return tuple(items)


def build_space(
    raw: dict[str, Any],
    base: Config,
    source: str,
    metrics: list[str] | None = None,
    modes: list[str] | None = None,
) -> SearchSpace:
    """Turn a parsed file (``params``, ``metric``, ``mode``) plus flag overrides into a checked space."""
    unknown = set(raw) - {"params", "metric", "mode", "points"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; expected params, metric, mode, points"
        )
    specs = raw.get("params") or {}
    if not isinstance(specs, dict) or not specs:
        raise ConfigError(f"{source}: 'params' must be a non-empty mapping of SECTION.FIELD to a spec")
    params: list[Param] = []
    for path, spec in specs.items():
        param = parse_param(str(path), spec, source, base)
        for cond_path, cond_value in param.when.items():
            earlier = next((p for p in params if p.path == cond_path), None)
            if earlier is None or earlier.kind != "choice":
                raise ConfigError(
                    f"{_where(source, param.path)}: 'when' refers to {cond_path!r}, which must be a 'choice' "
                    "parameter listed before it"
                )
            if cond_value not in earlier.values:
                raise ConfigError(
                    f"{_where(source, param.path)}: 'when' value {cond_value!r} is not among {cond_path}'s "
                    f"values {list(earlier.values)}"
                )
        params.append(param)
    metric_t = tuple(metrics) if metrics else _as_tuple(raw.get("metric", "eval/js"), "metric", source)
    mode_t = tuple(modes) if modes else _as_tuple(raw.get("mode", "min"), "mode", source)
    if len(mode_t) == 1 and len(metric_t) > 1:
        mode_t = mode_t * len(metric_t)
    if len(mode_t) != len(metric_t):
        raise ConfigError(f"{source}: {len(metric_t)} metric(s) {list(metric_t)} but {len(mode_t)} mode(s)")
    bad = [m for m in mode_t if m not in ("min", "max")]
    if bad:
        raise ConfigError(f"{source}: mode {bad[0]!r} is not 'min' or 'max'")
    points = _check_points(raw.get("points") or [], params, base, source)
    return SearchSpace(tuple(params), metric_t, mode_t, points)


def _check_points(raw: Any, params: list[Param], base: Config, source: str) -> tuple[dict[str, Any], ...]:
    """Start points must only name searched parameters, with values the config accepts."""
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise ConfigError(f"{source}: 'points' must be a list of mappings of parameter to value, got {raw!r}")
    names = {p.path for p in params}
    for point in raw:
        extra = set(point) - names
        if extra:
            raise ConfigError(
                f"{source}: point {point} names {sorted(extra)}, which are not searched; expected some of "
                f"{sorted(names)}"
            )
        try:
            apply_overrides(base, [f"{k}={_render(v)}" for k, v in point.items()])
        except ConfigError as exc:
            raise ConfigError(f"{source}: point {point} is not a valid config: {exc}") from exc
    return tuple(dict(p) for p in raw)


def load_space(
    path: str | Path | None,
    base: Config,
    flags: list[str] | None = None,
    metrics: list[str] | None = None,
    modes: list[str] | None = None,
) -> SearchSpace:
    """Read a YAML/JSON space file (if any), add ``--param`` flags (they win), validate everything."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "--param"
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"search space file {file} does not exist")
        text = file.read_text()
        try:
            raw = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"search space file {file} is not valid {file.suffix[1:].upper()}: {exc}"
            ) from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"search space file {file}: expected a mapping with 'params', got {type(raw).__name__}"
            )
    params = dict(raw.get("params") or {})
    for flag in flags or []:
        name, spec = parse_flag(flag)
        params[name] = spec
    return build_space({**raw, "params": params}, base, source, metrics, modes)
