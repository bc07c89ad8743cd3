"""Tuning plans: what `isubg tune run` tries, as data.

A plan is a YAML file (the shipped ones live in `presets/plans/`, a user's is given with `--plan-file`):

    name: lr                      # the study name starts with it
    description: the guide's learning-rate grid
    kind: grid                    # grid | staged | one-at-a-time | search
    points:                       # grid: the configurations, each a mapping of parameters
      - {lr: 2.8e-4, xvlm_lr: 5.0e-5}
    params: [lr, dropout]         # one-at-a-time / search: parameters, by guide name or dotted path;
    params: {lr: {low: 1e-4, high: 5e-4, log: true}, activation: [relu, swish]}   # ... or with ranges
    values: 3                     # one-at-a-time: values tried per parameter across its range
    steps:                        # staged: groups searched in order, earlier steps' best values fixed
      - {name: optimisation, params: [lr, xvlm_lr, batch_size, epochs]}
    trials: 12                    # search: trials in the study; staged: trials per step

A parameter without a range is searched over the guide's advice range (docs/hyperparameters.md); a bool or a
one-of parameter over its choices. `expand` turns a plan into the study's slots: one per trial, each with
fixed values (grid, one-at-a-time) or a search space for the sampler (search, staged).

This module imports neither Optuna nor torch: `Dimension.suggest` asks any object with Optuna's `suggest_*`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from isubg.config import ConfigError, RunConfig, format_value, get_value, param_specs
from isubg.presets import preset_dir
from isubg.resolve import canonical_key
from isubg.yamlio import YamlError, load_yaml_file

__all__ = [
    "Dimension",
    "Plan",
    "Slot",
    "dimension",
    "expand",
    "list_plans",
    "load_plan",
    "parse_param",
]

Kind = Literal["grid", "staged", "one-at-a-time", "search"]
RangeSpec = Mapping[str, Any] | Sequence[Any] | None  # {low, high, log} | [choices] | None (advice)


# --------------------------------------------------------------------------------------------------
# One searchable parameter


@dataclass(frozen=True)
class Dimension:
    """One parameter's search space: a numeric range (int or float, maybe log-scaled) or a list of choices."""

    path: str
    kind: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(format_value(c) for c in self.choices)
        scale = ", log" if self.log else ""
        return f"{format_value(self.low)} .. {format_value(self.high)}{scale}"

    def spread(self, count: int) -> list[Any]:
        """`count` values evenly across the range (geometrically when log), or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if count == 1:
            points = [self.low]
        elif self.log:
            ratio = (self.high / self.low) ** (1 / (count - 1))
            points = [self.low * ratio**i for i in range(count)]
        else:
            points = [self.low + (self.high - self.low) * i / (count - 1) for i in range(count)]
        if self.kind == "int":
            return list(dict.fromkeys(round(p) for p in points))
        return list(dict.fromkeys(_round_sig(p) for p in points))

    def suggest(self, trial: Any) -> Any:
        """Ask an `optuna.Trial` for this parameter (a slot's fixed value comes back unchanged)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(self.path, float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]


def _round_sig(value: float, digits: int = 3) -> float:
    """2.7999999e-4 -> 2.8e-4: grid values a person would write."""
    if value == 0:
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _base_type(annotation: Any) -> Any:
    """int, float, bool, str or a Literal[...] behind Annotated/Optional wrappers."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _base_type(get_args(annotation)[0])
    if origin is Literal:
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and len(args) < len(get_args(annotation)):
        return _base_type(args[0])
    return annotation


def dimension(key: str, spec: RangeSpec = None, label: str = "plan") -> Dimension:
    """The search space of parameter `key`: `spec` if given, else the guide's advice for it.

    Args:
        key: a dotted path or guide name (`lr`, `model.cfrf.num_hid`).
        spec: None (advice range / choices), a list of choices, or {low, high, log}.

    Raises:
        ConfigError: unknown key, a parameter that cannot be searched (text, lists), no advice range and no
            bounds given, or bounds the schema rejects.
    """
    path = canonical_key(key, label)
    info = param_specs()[path]
    base = _base_type(info.info.annotation)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if not spec:
            raise ConfigError(f"{label}: {path}: an empty list of choices")
        return Dimension(path, "choice", choices=tuple(spec))
    if base is bool:
        return Dimension(path, "choice", choices=(False, True))
    if get_origin(base) is Literal:
        advice = info.advice or {}
        return Dimension(path, "choice", choices=tuple(advice.get("choices") or get_args(base)))
    if base not in (int, float):
        raise ConfigError(f"{label}: {path} ({info.allowed()}) cannot be searched; give a list of values to try")
    advice = info.advice or {}
    spec = dict(spec or {})
    unknown = set(spec) - {"low", "high", "log"}
    if unknown:
        raise ConfigError(f"{label}: {path}: unknown range key(s) {sorted(unknown)}; use low, high, log")
    low, high = spec.get("low", advice.get("min")), spec.get("high", advice.get("max"))
    if low is None or high is None:
        raise ConfigError(
            f"{label}: {path} has no advised range; give one, e.g. --param {info.name}=LOW:HIGH "
            f"or in a plan file {{low: ..., high: ...}}"
        )
    if not low < high:
        raise ConfigError(f"{label}: {path}: the range needs low < high, got {low} .. {high}")
    kind: Literal["int", "float"] = "int" if base is int else "float"
    # Rates and scales spanning a factor of 4 or more are searched geometrically (1e-4 .. 5e-4).
    log = bool(spec.get("log", kind == "float" and low > 0 and high / low >= 4))
    if log and low <= 0:
        raise ConfigError(f"{label}: {path}: a log-scaled range needs low > 0, got {low}")
    return Dimension(path, kind, low=low, high=high, log=log)


def parse_param(text: str) -> tuple[str, RangeSpec]:
    """`--param` syntax -> (key, spec): `lr`, `lr=1e-4:5e-4`, `lr=1e-4:5e-4:log`, `activation=relu,swish`.

    Raises:
        ConfigError: a malformed value.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"--param {text!r}: expected NAME, NAME=LOW:HIGH[:log] or NAME=A,B,...")
    if not sep:
        return key, None
    from isubg.yamlio import parse_yaml_value

    try:
        if ":" in raw:
            parts = raw.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
                raise ConfigError(f"--param {text!r}: a range is LOW:HIGH or LOW:HIGH:log")
            bounds = {"low": parse_yaml_value(parts[0], key), "high": parse_yaml_value(parts[1], key)}
            if len(parts) == 3:
                bounds["log"] = parts[2] == "log"
            return key, bounds
        return key, [parse_yaml_value(v.strip(), key) for v in raw.split(",")]
    except YamlError as exc:
        raise ConfigError(f"--param {text!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The plan file


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    params: list[str] | dict[str, Any] = Field(min_length=1)


class Plan(BaseModel):
    """A validated plan file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    kind: Kind
    points: list[dict[str, Any]] = Field(default_factory=list)
    params: list[str] | dict[str, Any] = Field(default_factory=list)
    values: int = Field(3, ge=2, le=20)
    steps: list[_Step] = Field(default_factory=list)
    trials: int | None = Field(None, ge=1)

    @field_validator("points")
    @classmethod
    def _points_nonempty(cls, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(not p for p in points):
            raise ValueError("a grid point is empty")
        return points

    def check(self) -> Plan:
        """The kind-specific rules (which fields a kind needs) and every parameter name and range."""
        needs = {"grid": "points", "staged": "steps", "one-at-a-time": "params", "search": "params"}[self.kind]
        if not getattr(self, needs):
            hint = " (give them with --param NAME)" if needs == "params" else ""
            raise ConfigError(f"plan '{self.name}': a {self.kind} plan needs '{needs}'{hint}")
        for point in self.points:
            for key in point:
                canonical_key(key, f"plan '{self.name}'")
        for step in self.steps:
            _dimensions(step.params, f"plan '{self.name}', step '{step.name}'")
        if self.kind in ("one-at-a-time", "search"):
            _dimensions(self.params, f"plan '{self.name}'")
        return self


def _dimensions(params: list[str] | Mapping[str, Any], label: str) -> list[Dimension]:
    items = params.items() if isinstance(params, Mapping) else ((p, None) for p in params)
    dims = [dimension(key, spec, label) for key, spec in items]
    paths = [d.path for d in dims]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ConfigError(f"{label}: parameter(s) named twice: {', '.join(twice)}")
    return dims


def plans_dir() -> Path:
    """The folder of the shipped plans."""
    return preset_dir() / "plans"


def list_plans() -> list[str]:
    """Names of the shipped plans."""
    return sorted(p.stem for p in plans_dir().glob("*.yaml"))


def load_plan(ref: str | Path, params: Iterable[str] = ()) -> Plan:
    """A shipped plan by name, or a plan YAML file; `params` (`--param` strings) replace its parameters.

    Raises:
        ConfigError: unknown plan, unreadable/invalid file, or bad parameters.
    """
    path = Path(ref)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = plans_dir() / f"{ref}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown plan '{ref}'; shipped plans: {', '.join(list_plans())}, or give a plan YAML file"
            )
    try:
        data = load_yaml_file(path)  # a mapping, or a YamlError naming the file
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    data.setdefault("name", path.stem)
    given = [parse_param(p) for p in params]
    if given:
        data["params"] = dict(given)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid plan: {problems}") from None
    if given and plan.kind in ("grid", "staged"):
        raise ConfigError(f"--param applies to one-at-a-time and search plans, not to {plan.kind} plan '{plan.name}'")
    return plan.check()


# --------------------------------------------------------------------------------------------------
# Slots: the study's trials before they run


@dataclass
class Slot:
    """One trial to run: fixed values (grid, one-at-a-time) and/or dimensions the sampler fills in."""

    step: int = 0  # staged: index into the plan's steps; runs only after every earlier step's slots
    step_name: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted path -> value
    search: list[Dimension] = field(default_factory=list)


def expand(plan: Plan, base: RunConfig, trials: int | None, pinned: Iterable[str] = ()) -> tuple[list[Slot], list[str]]:
    """The plan's slots for a study on top of `base`, plus notes for the user.

    Args:
        trials: --trials: the number of trials (search), per step (staged), or at most this many of the
            plan's configurations (grid, one-at-a-time); None: the plan's own `trials` (default 10) or all.
        pinned: dotted paths the user fixed on the command line; searched dimensions on them are dropped
            (with a note), grid points that set them are an error.

    Raises:
        ConfigError: a grid point sets a pinned parameter, or nothing is left to search.
    """
    pinned, notes = set(pinned), []
    label = f"plan '{plan.name}'"

    def free(dims: list[Dimension]) -> list[Dimension]:
        kept = [d for d in dims if d.path not in pinned]
        notes.extend(f"{d.path} is fixed on the command line; not searched" for d in dims if d.path in pinned)
        return kept

    if plan.kind == "grid":
        points = [{canonical_key(k, label): v for k, v in p.items()} for p in plan.points]
        clash = sorted({k for p in points for k in p} & pinned)
        if clash:
            raise ConfigError(f"{label} sets {', '.join(clash)} itself; drop it from --set / the flags")
        slots = [Slot(fixed=p) for p in points]
    elif plan.kind == "one-at-a-time":
        slots = _one_at_a_time(free(_dimensions(plan.params, label)), base, plan.values)
    elif plan.kind == "search":
        dims = free(_dimensions(plan.params, label))
        slots = [Slot(search=dims) for _ in range(trials or plan.trials or 10)] if dims else []
    else:
        slots = []
        for i, step in enumerate(plan.steps):
            dims = free(_dimensions(step.params, f"{label}, step '{step.name}'"))
            if not dims:
                raise ConfigError(f"{label}, step '{step.name}': all its parameters are fixed on the command line")
            slots += [Slot(step=i, step_name=step.name, search=dims) for _ in range(trials or plan.trials or 6)]
    if not slots:
        raise ConfigError(f"{label}: nothing left to try once the command line's fixed parameters are removed")
    if plan.kind in ("grid", "one-at-a-time") and trials is not None and trials < len(slots):
        notes.append(f"--trials {trials}: running the first {trials} of the plan's {len(slots)} configurations")
        slots = slots[:trials]
    return slots, notes


def _one_at_a_time(dims: list[Dimension], base: RunConfig, count: int) -> list[Slot]:
    """The base configuration, then each parameter alone at `count` values across its range."""
    slots = [Slot(step_name="base")]
    for dim in dims:
        current = get_value(base, dim.path)
        for value in dim.spread(count):
            if value != current:
                slots.append(Slot(step_name=dim.path, fixed={dim.path: value}))
    return slots
