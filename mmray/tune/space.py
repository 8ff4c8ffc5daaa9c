"""Search-space YAML: dotted job keys -> distributions, conditionals, checked against the job schema.

```yaml
metric: val.accuracy
num_samples: 12
search: {name: optuna_tpe}
scheduler: {name: asha, grace_period: 1}
parameters:
  model.fusion.name: {choice: [concat, gated, low_rank_tensor]}
  model.fusion.rank: {int: [2, 16], when: {model.fusion.name: low_rank_tensor}}
  train.optimizer.lr: {loguniform: [1.0e-4, 3.0e-2]}
```
Every parameter is checked against the job schema before anything starts: its lowest and highest
value (or each choice) is applied to the job, with its ``when`` conditions, and validated.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from mmray.config.errors import ConfigError, UserError
from mmray.config.loader import apply_overrides, format_errors, read_yaml, validate_job
from mmray.config.schema import METRICS
from mmray.registry import StrictModel
from mmray.tune import defaults
from mmray.tune.algorithms import SCHEDULERS, SEARCHERS

Scalar = Union[bool, int, float, str, None]


_FIELD = {"loguniform": "loguniform", "uniform": "uniform", "int": "int_", "choice": "choice", "value": "value"}


class ParamSpec(StrictModel):
    """One parameter: exactly one of ``loguniform``, ``uniform``, ``int``, ``choice``, ``value``."""

    loguniform: Optional[tuple[float, float]] = None
    uniform: Optional[tuple[float, float]] = None
    int_: Optional[tuple[int, int]] = Field(None, alias="int")
    choice: Optional[list[Any]] = Field(None, min_length=1)
    value: Any = None
    log: bool = Field(False, description="with int: sample on a log scale")
    when: dict[str, Union[Scalar, list[Scalar]]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fixed_value(cls, raw: Any) -> Any:
        # a bare value (`train.epochs: 4`) is a fixed parameter
        return raw if isinstance(raw, dict) else {"value": raw}

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpec":
        kinds = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, _FIELD[k]) is not None]
        if len(kinds) + (self.value is not None) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice or a fixed value")
        for k in ("loguniform", "uniform", "int"):
            bounds = getattr(self, _FIELD[k])
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{k}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive, got {list(self.loguniform)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice", "value") if getattr(self, _FIELD[k]) is not None)

    def probe_values(self) -> list[Any]:
        """Values that together exercise the schema's limits: both bounds, or every choice."""
        if self.choice is not None:
            return list(self.choice)
        if self.value is not None:
            return [self.value]
        bounds = self.loguniform or self.uniform or self.int_
        return list(bounds)

    def admits(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        if self.value is not None:
            return value == self.value
        lo, hi = self.loguniform or self.uniform or self.int_
        return isinstance(value, (int, float)) and lo <= value <= hi

    def distribution(self):
        """The Optuna distribution this parameter is drawn from (None for a fixed value)."""
        import optuna.distributions as d

        if self.loguniform is not None:
            return d.FloatDistribution(*self.loguniform, log=True)
        if self.uniform is not None:
            return d.FloatDistribution(*self.uniform)
        if self.int_ is not None:
            return d.IntDistribution(*self.int_, log=self.log)
        if self.choice is not None:
            return d.CategoricalDistribution(self.choice)
        return None

    def suggest(self, trial, name: str) -> Any:
        """Draw from an Optuna trial (define-by-run)."""
        if self.loguniform is not None:
            return trial.suggest_float(name, *self.loguniform, log=True)
        if self.uniform is not None:
            return trial.suggest_float(name, *self.uniform)
        if self.int_ is not None:
            return trial.suggest_int(name, *self.int_, log=self.log)
        if self.choice is not None:
            return trial.suggest_categorical(name, self.choice)
        return self.value


def _registered(registry):
    def check(name: str) -> str:
        try:
            registry.entry(name)
        except KeyError as e:  # UnknownComponentError: its message lists the valid names
            raise ValueError(str(e)) from None
        return name
    return check


class SearchConfig(StrictModel):
    name: str = Field("optuna_tpe", description="a registered searcher (`mmray ls`)")
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0, description="optuna_tpe: random trials before TPE models the space")

    _name = field_validator("name")(lambda v: _registered(SEARCHERS)(v))

    @model_validator(mode="before")
    @classmethod
    def _algorithm_alias(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "algorithm" in raw and "name" not in raw:
            raw = {**raw, "name": raw["algorithm"]}
            del raw["algorithm"]
        return raw


class SchedulerConfig(StrictModel):
    name: str = Field("asha", description="a registered scheduler (`mmray ls`)")
    grace_period: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        1, description="epochs every trial runs before it can be stopped; auto = max(2, epochs // 4) of the "
                       "longest trial, so a slow starter is not judged before its curve shows anything")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep the top 1/reduction_factor at each rung")

    _name = field_validator("name")(lambda v: _registered(SCHEDULERS)(v))


class SpaceConfig(StrictModel):
    metric: Literal[tuple(METRICS)] = "val.accuracy"  # type: ignore[valid-type]
    mode: Optional[Literal["max", "min"]] = Field(None, description="default: the metric's natural direction")
    num_samples: Optional[int] = Field(8, ge=1, description="trials to run; null = as many as time_budget_s allows")
    time_budget_s: Optional[float] = Field(None, gt=0, description="wall-clock seconds for the whole sweep: no "
                                           "trial starts after it, running ones are stopped (`--time-budget`)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="default: from the cluster's CPUs/GPUs")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (from its checkpoint)")
    baseline: bool = Field(False, description="the first trial is the job's own value of every drawn parameter "
                                              "(the control): never stopped early, compared with the winner")
    finalists: int = Field(0, ge=0, description="the top trials trained again with other seeds before the winner "
                                                "is named (the best mean wins); 0 = off (`--finalists K`)")
    finalist_seeds: int = Field(2, ge=1, description="re-runs per finalist, each with another train.seed")
    finalists_cv: int = Field(0, ge=0, description="score the finalists by K-fold cross-validation over train+val "
                                                   "instead of re-runs with other seeds (the best mean over the "
                                                   "folds wins); 0 = off (`--finalists-cv K`, K >= 2)")
    ensemble: int = Field(0, ge=0, description="the top K trials' probabilities averaged as an ensemble export, "
                                               "against the single winner; best/ is the better on validation; "
                                               "0 or 1 = off (`--ensemble K`)")
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parameters: dict[str, ParamSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _bounded(self) -> "SpaceConfig":
        if self.num_samples is None and self.time_budget_s is None:
            raise ValueError("num_samples: null needs a time budget (time_budget_s, `--time-budget`)")
        problem = cv_problem(self.finalists_cv, self.finalists, "finalists_cv", "finalists")
        if problem:
            raise ValueError(problem)
        return self

    @property
    def resolved_mode(self) -> str:
        return self.mode or METRICS[self.metric]

    def ordered_parameters(self) -> list[tuple[str, ParamSpec]]:
        """Parameters with every ``when`` key before the parameters that depend on it."""
        done: list[str] = []
        pending = dict(self.parameters)
        while pending:
            ready = [k for k, p in pending.items() if all(c in done for c in p.when)]
            # a component's name first: setting it resets that component's other keys
            ready.sort(key=lambda k: not k.endswith(".name"))
            if not ready:
                raise ConfigError([f"parameters: circular `when` conditions among {sorted(pending)}"])
            for k in ready:
                done.append(k)
                del pending[k]
        return [(k, self.parameters[k]) for k in done]

    def active(self, key: str, values: dict[str, Any]) -> bool:
        """Whether ``key``'s ``when`` conditions hold for the values drawn so far."""
        for cond_key, wanted in self.parameters[key].when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if cond_key not in values or values[cond_key] not in allowed:
                return False
        return True

    def baseline_point(self, job_raw: dict[str, Any]) -> dict[str, Any]:
        """The job's own value of every drawn parameter active for those values (fixed values excluded: they
        apply to every trial). Raises :class:`ConfigError` when a value is one this space never draws."""
        job = validate_job(job_raw).model_dump(mode="json")
        values: dict[str, Any] = {}
        problems = []
        for key, spec in self.ordered_parameters():
            if spec.value is not None:
                values[key] = spec.value
                continue
            if not self.active(key, values):
                continue
            node: Any = job
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if not spec.admits(node):
                drawn = spec.choice if spec.choice is not None else list(spec.probe_values())
                problems.append(f"parameters.{key}: baseline: the job's value {node!r} is never drawn by this "
                                f"parameter ({spec.kind} {drawn}); widen it or drop `baseline: true`")
            values[key] = node
        if problems:
            raise ConfigError(problems)
        return {k: v for k, v in values.items() if self.parameters[k].value is None}

    def sample(self, trial) -> dict[str, Any]:
        """Define-by-run: draw only the active parameters of this trial; returns ``{dotted key: value}``."""
        values: dict[str, Any] = {}
        for key, spec in self.ordered_parameters():
            if self.active(key, values):
                values[key] = spec.suggest(trial, key)
        return values


def cv_problem(folds: int, finalists: int, flag: str, finalists_flag: str) -> str | None:
    """What is wrong with cross-validating ``finalists`` finalists on ``folds`` folds (0 = no cross-validation), or
    None. ``flag``/``finalists_flag``: how the user gave the two (``--finalists-cv`` or ``finalists_cv``)."""
    if folds == 0:
        return None
    if folds < 2:
        return (f"{flag}: k-fold cross-validation needs at least 2 folds, got {folds} (0 = off: the finalists are "
                f"re-checked with other seeds)")
    if finalists < 2:
        return (f"{flag}: there are no finalists to cross-validate: {finalists_flag} is {finalists}; give "
                f"{finalists_flag} 2 or more (the top trials to score), or leave out {flag}")
    return None


def _parse(raw: dict[str, Any], source: str | None) -> SpaceConfig:
    try:
        return SpaceConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, raw), source) from None


def check_against_job(space: SpaceConfig, job_raw: dict[str, Any], source: str | None = None) -> None:
    """Every parameter value the space can produce yields a valid job, and every parameter can vary per trial.
    Raises :class:`ConfigError`."""
    problems: list[str] = [
        f"parameters.{key}: trial resources come from the job's scaling section and cannot be swept; set it in the job"
        for key in space.parameters if key.startswith("scaling.")]
    if problems:
        raise ConfigError(problems, source)
    broken: set[str] = set()
    for key, spec in space.parameters.items():
        for cond, wanted in spec.when.items():
            if cond not in space.parameters:
                problems.append(f"parameters.{key}.when.{cond}: not a parameter of this space")
                broken.add(key)
                continue
            for w in wanted if isinstance(wanted, list) else [wanted]:
                if not space.parameters[cond].admits(w):
                    problems.append(f"parameters.{key}.when.{cond}: {w!r} is never drawn by {cond}")
                    broken.add(key)
    if problems:  # unknown condition keys would make the ordering below fail
        if any("not a parameter" in p for p in problems):
            raise ConfigError(problems, source)
    for key, spec in space.ordered_parameters():
        if key in broken:
            continue
        conditions = []
        for cond, wanted in spec.when.items():
            conditions.append((cond, wanted[0] if isinstance(wanted, list) else wanted))
        for candidate in spec.probe_values():
            try:
                validate_job(apply_overrides(job_raw, [*conditions, (key, candidate)]))
            except ConfigError as e:
                for p in e.problems:
                    problems.append(f"parameters.{key}: {candidate!r} -> {p}")
    if not problems and space.baseline:
        try:
            space.baseline_point(job_raw)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index), source)


def load_space(path: str | None, job_raw: dict[str, Any], *, num_samples: int | None = None,
               time_budget: str | float | None = None, finalists: int | None = None,
               ensemble: int | None = None, finalists_cv: int | None = None) -> SpaceConfig:
    """Read, validate and check a space YAML against the (already valid) raw job config.

    ``path`` None: the built-in default space fitted to the job (:mod:`mmray.tune.defaults`).
    ``time_budget`` (``"20m"`` or seconds): the sweep's wall-clock budget; without ``num_samples`` trials are
    launched while it allows, with it whichever ends first. ``finalists``, ``ensemble``, ``finalists_cv``: the
    space's, replaced (a bad one, or cross-validation without finalists, is a :class:`UserError` naming the flag).
    """
    raw = read_yaml(path) if path is not None else default_space(job_raw)
    source = path if path is not None else defaults.SOURCE
    if num_samples is not None:
        if num_samples < 1:
            raise UserError(f"--num-samples: must be at least 1, got {num_samples}")
        raw["num_samples"] = num_samples
    if time_budget is not None:
        raw["time_budget_s"] = parse_duration(time_budget) if isinstance(time_budget, str) else time_budget
        if num_samples is None:
            raw["num_samples"] = None  # as many trials as the budget allows
    if finalists is not None:
        if finalists < 0:
            raise UserError(f"--finalists: must be 0 (off) or more, got {finalists}")
        raw["finalists"] = finalists
    if ensemble is not None:
        if ensemble < 0:
            raise UserError(f"--ensemble: must be 0 (off) or more, got {ensemble}")
        raw["ensemble"] = ensemble
    if finalists_cv is not None:
        if finalists_cv < 0:
            raise UserError(f"--finalists-cv: must be 0 (off) or at least 2 folds, got {finalists_cv}")
        raw["finalists_cv"] = finalists_cv
    if finalists_cv is not None or finalists is not None:  # a flag is involved: a problem names the flags
        given = {k: raw[k] if k in raw else SpaceConfig.model_fields[k].default for k in ("finalists", "finalists_cv")}
        if all(isinstance(v, int) for v in given.values()):  # anything else: the schema's own message below
            problem = cv_problem(given["finalists_cv"], given["finalists"],
                                 "--finalists-cv" if finalists_cv is not None else "finalists_cv",
                                 "--finalists" if finalists is not None else "finalists")
            if problem:
                raise UserError(problem)
    space = _parse(raw, source)
    check_against_job(space, job_raw, source)
    return space


def grid_size(space: SpaceConfig) -> float:
    """How many distinct configurations the space has (inf when any parameter is continuous)."""
    n = 1.0
    for _, spec in space.parameters.items():
        if spec.choice is not None:
            n *= len(spec.choice)
        elif spec.int_ is not None:
            n *= spec.int_[1] - spec.int_[0] + 1
        elif spec.value is None:
            return math.inf
    return n


def default_space(job_raw: dict[str, Any]) -> dict[str, Any]:
    """The built-in default space (:mod:`mmray.tune.defaults`) fitted to ``job_raw``: a raw space document."""
    return defaults.default_space(job_raw, lambda raw: [k for k, _ in SpaceConfig.model_validate(raw).ordered_parameters()])


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, flag: str = "--time-budget") -> float:
    """``"90s"``, ``"5m"``, ``"1.5h"`` (or a bare number of seconds) -> seconds. Raises :class:`UserError`
    naming ``flag`` for anything else, zero or a negative duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
        if m is None:
            raise UserError(f"{flag}: expected a duration such as 90s, 5m or 1.5h (s, m or h), got {text!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{flag}: must be longer than 0 seconds, got {text!r}")
    return seconds
