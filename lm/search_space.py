"""The search config of ``lm.search``: base training config, search space, objective, budget,
sampler and pruner, read from YAML and validated before any work starts.

    base: default.yaml              # a path (relative to this file) or an inline mapping
    search_space:
      train.learning_rate: {type: float, low: 3.0e-4, high: 1.0e-2, log: true}
      train.warmup_iters:  {type: int, low: 0, high: 300, step: 50}
      train.beta2:         {type: categorical, choices: [0.95, 0.99, 0.999]}
    objective: {metric: val_loss, direction: minimize}
    budget: {max_iters: 500, eval_interval: 100}
    sampler: {n_startup_trials: 5, multivariate: true, grid_points: 3}
    pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 100}

Each parameter maps one to one onto Optuna's define-by-run calls (``suggest_float(name,
low, high, log=...)``, ``suggest_int(name, low, high, step=...)``, ``suggest_categorical``).
The same space also drives the plain random and grid samplers below, which need no Optuna.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import random
from dataclasses import dataclass, field

import yaml

from .config import SECTIONS, Config, ConfigError, _check_value, _field_types, apply_overrides, \
    config_from_dict, load_config, validate

PARAM_TYPES = ("float", "int", "categorical")
METRICS = ("val_loss", "best_val_loss")
PRUNERS = {  # type -> the settings it takes (Optuna's argument names)
    "none": (),
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor"),
}
SAMPLER_KEYS = ("n_startup_trials", "multivariate", "grid_points")
BUDGET_KEYS = ("max_iters", "eval_interval", "eval_iters")
TOP_KEYS = ("base", "search_space", "objective", "budget", "sampler", "pruner")


@dataclass
class Param:
    name: str                   # "section.key" of the training config
    type: str                   # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None     # int only
    choices: list | None = None  # categorical only

    def grid(self, points: int) -> list:
        """The values grid search tries: all ints on the step, all choices, ``points`` floats."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        if points == 1 or self.low == self.high:
            return [self.low]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [float(math.exp(a + (b - a) * i / (points - 1))) for i in range(points)]
        return [float(self.low + (self.high - self.low) * i / (points - 1)) for i in range(points)]

    def sample(self, rng: random.Random):
        """One uniform draw (log-uniform for ``log``), for the plain random sampler."""
        if self.type == "categorical":
            return self.choices[rng.randrange(len(self.choices))]
        if self.type == "int":
            step = self.step or 1
            return int(self.low) + step * rng.randrange((int(self.high) - int(self.low)) // step + 1)
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def suggest(self, trial):
        """Ask an Optuna trial (or a trial of our own with the same methods) for this parameter."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass
class SearchConfig:
    base: Config
    params: list[Param]
    metric: str = "val_loss"
    direction: str = "minimize"
    budget: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    source: str = "search config"

    def grid_space(self) -> dict:
        points = int(self.sampler.get("grid_points", 3))
        return {p.name: p.grid(points) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid_space().values())

    def trial_config(self, values: dict, for_trial: bool = True) -> Config:
        """The training config of one trial: base, then the budget, then the sampled values."""
        cfg = copy.deepcopy(self.base)
        for k, v in self.budget.items():
            setattr(cfg.train, k, v)
        for name, v in values.items():
            section, key = name.split(".", 1)
            setattr(getattr(cfg, section), key, _check_value(f"{self.source}: {name}",
                                                             _field_types(SECTIONS[section])[key], v))
        if for_trial:   # a trial is one of many: no bar of its own, no sample text
            cfg.train.progress = False
            cfg.train.sample_tokens = 0
        validate(cfg)
        return cfg

    def to_dict(self) -> dict:
        """A plain description, stored with the study so that every worker checks it runs the same search."""
        return {"base": self.base.to_dict(), "params": [dataclasses.asdict(p) for p in self.params],
                "metric": self.metric, "direction": self.direction, "budget": self.budget,
                "sampler": self.sampler, "pruner": self.pruner}


def _valid_keys() -> list[str]:
    return sorted(f"{s}.{k}" for s, cls in SECTIONS.items() for k in _field_types(cls))


def _resolve_name(name: str, where: str) -> str:
    """``section.key`` or a key unique across sections -> ``section.key``; else a ConfigError."""
    if "." in name:
        section, key = name.split(".", 1)
        if section in SECTIONS and key in _field_types(SECTIONS[section]):
            return name
    else:
        owners = [s for s, cls in SECTIONS.items() if name in _field_types(cls)]
        if len(owners) == 1:
            return f"{owners[0]}.{name}"
        if len(owners) > 1:
            raise ConfigError(f"{where}: '{name}' exists in sections {owners}; write e.g. {owners[0]}.{name}")
    raise ConfigError(f"{where}: unknown parameter '{name}'; valid config keys: {', '.join(_valid_keys())}")


def _number(where: str, v, integer: bool = False):
    if isinstance(v, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    return int(v) if integer else float(v)


def parse_param(name: str, spec, where: str) -> Param:
    full = _resolve_name(name, where)
    here = f"{where}: search_space.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: expected a mapping like {{type: float, low: 0.0, high: 1.0}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{here}: 'type' must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    allowed = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "step", "log"},
               "categorical": {"type", "choices"}}[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{here}: unknown setting(s) {', '.join(extra)} for a {kind} parameter; "
                          f"valid: {', '.join(sorted(allowed))}")
    section, key = full.split(".", 1)
    ftype = _field_types(SECTIONS[section])[key]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{here}: 'choices' must be a non-empty list, got {choices!r}")
        choices = [_check_value(here, ftype, c) for c in choices]
        return Param(full, kind, choices=choices)
    if ftype not in (int, float):
        raise ConfigError(f"{here}: {full} is a {getattr(ftype, '__name__', ftype)} setting; "
                          f"use type: categorical with choices")
    if kind == "float" and ftype is int:
        raise ConfigError(f"{here}: {full} is an integer setting; use type: int")
    for k in ("low", "high"):
        if k not in spec:
            raise ConfigError(f"{here}: '{k}' is missing")
    low, high = _number(f"{here}.low", spec["low"], kind == "int"), _number(f"{here}.high", spec["high"], kind == "int")
    if low > high:
        raise ConfigError(f"{here}: low ({low}) > high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{here}: 'log' must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{here}: log: true needs low > 0, got low = {low}")
    step = None
    if kind == "int":
        step = _number(f"{here}.step", spec.get("step", 1), integer=True)
        if step <= 0:
            raise ConfigError(f"{here}: step must be positive, got {step}")
        if log and step != 1:
            raise ConfigError(f"{here}: log: true works with step 1 only (Optuna's rule), got step {step}")
    return Param(full, kind, low, high, log, step)


def _section(d: dict, key: str, allowed, where: str) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {v!r}")
    extra = sorted(set(v) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{key}.{e}' for e in extra)}; "
                          f"valid keys in '{key}': {', '.join(allowed)}")
    return dict(v)


def search_config_from_dict(d, source: str = "search config", base_dir: str = ".",
                            overrides: list[str] | None = None) -> SearchConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    extra = sorted(set(d) - set(TOP_KEYS))
    if extra:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(extra)}; valid top-level keys: {', '.join(TOP_KEYS)}")
    base = d.get("base")
    if base is None:
        cfg = Config()
    elif isinstance(base, str):
        path = base if os.path.isabs(base) else os.path.join(base_dir, base)
        cfg = load_config(path)
    elif isinstance(base, dict):
        cfg = config_from_dict(base, source=f"{source}: base")
    else:
        raise ConfigError(f"{source}: 'base' must be a path to a training config or a mapping, got {base!r}")
    apply_overrides(cfg, overrides or [])
    space = d.get("search_space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: 'search_space' must be a non-empty mapping of parameter: spec")
    params = [parse_param(str(k), v, source) for k, v in space.items()]
    names = [p.name for p in params]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: parameter(s) {', '.join(dup)} given twice in search_space")

    obj = _section(d, "objective", ("metric", "direction"), source)
    metric, direction = obj.get("metric", "val_loss"), obj.get("direction", "minimize")
    if metric not in METRICS:
        raise ConfigError(f"{source}: objective.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{source}: objective.direction must be minimize or maximize, got {direction!r}")

    budget = _section(d, "budget", BUDGET_KEYS, source)
    for k, v in budget.items():
        budget[k] = _number(f"{source}: budget.{k}", v, integer=True)
        if budget[k] <= 0:
            raise ConfigError(f"{source}: budget.{k} must be positive, got {budget[k]}")
    sampler = _section(d, "sampler", SAMPLER_KEYS, source)
    if "n_startup_trials" in sampler:
        sampler["n_startup_trials"] = _number(f"{source}: sampler.n_startup_trials", sampler["n_startup_trials"], True)
    if "grid_points" in sampler:
        sampler["grid_points"] = _number(f"{source}: sampler.grid_points", sampler["grid_points"], True)
        if sampler["grid_points"] < 1:
            raise ConfigError(f"{source}: sampler.grid_points must be >= 1, got {sampler['grid_points']}")
    if not isinstance(sampler.get("multivariate", False), bool):
        raise ConfigError(f"{source}: sampler.multivariate must be true or false")

    pr = d.get("pruner") or {"type": "median"}
    if not isinstance(pr, dict):
        raise ConfigError(f"{source}: 'pruner' must be a mapping like {{type: median}}, got {pr!r}")
    kind = pr.get("type", "median")
    if kind not in PRUNERS:
        raise ConfigError(f"{source}: pruner.type must be one of {', '.join(PRUNERS)}, got {kind!r}")
    pruner = {"type": kind}
    for k, v in pr.items():
        if k == "type":
            continue
        if k not in PRUNERS[kind]:
            raise ConfigError(f"{source}: unknown setting pruner.{k} for the {kind} pruner; "
                              f"valid: {', '.join(PRUNERS[kind]) or 'none'}")
        pruner[k] = v if v == "auto" else _number(f"{source}: pruner.{k}", v, integer=True)

    sc = SearchConfig(cfg, params, metric, direction, budget, sampler, pruner, source)
    sc.trial_config({p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in params})  # validates
    return sc


def load_search_config(path: str, overrides: list[str] | None = None) -> SearchConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"search config not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return search_config_from_dict(d, source=path, base_dir=os.path.dirname(os.path.abspath(path)),
                                   overrides=overrides)


# --------------------------------------------------------------------------- samplers without Optuna
def random_params(sc: SearchConfig, seed: int, number: int) -> dict:
    """Trial ``number``'s values: a function of (seed, number) only, so a resumed search draws
    the same values a search that never stopped would have drawn."""
    rng = random.Random(f"lm.search/{seed}/{number}")
    return {p.name: p.sample(rng) for p in sc.params}


def grid_order(sc: SearchConfig, seed: int) -> list[dict]:
    """Every point of the grid once, in an order shuffled by ``seed``."""
    space = sc.grid_space()
    points = [dict(zip(space, vals)) for vals in itertools.product(*space.values())]
    random.Random(f"lm.search-grid/{seed}").shuffle(points)
    return points
