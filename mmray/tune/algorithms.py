"""Searchers and schedulers by name: the registries a space's ``search.name`` / ``scheduler.name`` pick from."""
from __future__ import annotations

from typing import Any

from mmray.registry import ComponentConfig, Registry

SEARCHERS: Registry = Registry("searcher")
SCHEDULERS: Registry = Registry("scheduler")


class _Named(ComponentConfig):
    pass


def _sampler(kind: str, search) -> Any:
    import optuna

    if kind == "optuna_tpe":
        return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    return optuna.samplers.CmaEsSampler(seed=search.seed, n_startup_trials=search.n_startup_trials,
                                        warn_independent_sampling=False)


@SEARCHERS.register("optuna_tpe", config=_Named)
def tpe(search) -> Any:
    """Optuna's Tree-structured Parzen Estimator (the default): models good vs bad regions, handles conditionals."""
    return _sampler("optuna_tpe", search)


@SEARCHERS.register("random", config=_Named)
def random_search(search) -> Any:
    """Uniform random sampling: the baseline every searcher must beat."""
    return _sampler("random", search)


@SEARCHERS.register("cmaes", config=_Named)
def cmaes(search) -> Any:
    """Optuna's CMA-ES for continuous parameters (categorical ones fall back to random)."""
    return _sampler("cmaes", search)


@SCHEDULERS.register("asha", config=_Named)
def asha(sched, *, metric: str, mode: str, max_t: int, baseline: dict[str, Any] | None = None) -> Any:
    """Asynchronous successive halving: stops the worse trials at each rung of epochs."""
    from mmray.tune.schedulers import ASHAKeepingBaseline  # imports Ray Tune: only when a sweep builds its scheduler

    return ASHAKeepingBaseline(
        time_attr="epoch", metric=metric, mode=mode, max_t=max_t, grace_period=min(sched.grace_period, max_t),
        reduction_factor=sched.reduction_factor, baseline=baseline)


@SCHEDULERS.register("median", config=_Named)
def median(sched, *, metric: str, mode: str, max_t: int, baseline: dict[str, Any] | None = None) -> Any:
    """Median stopping: stops a trial whose best result is below the median of the others' at the same epoch."""
    from mmray.tune.schedulers import MedianKeepingBaseline  # imports Ray Tune: only when a sweep builds its scheduler

    return MedianKeepingBaseline(time_attr="epoch", metric=metric, mode=mode, grace_period=sched.grace_period,
                                 baseline=baseline)


@SCHEDULERS.register("none", config=_Named)
def no_early_stopping(sched, *, metric: str, mode: str, max_t: int, baseline: dict[str, Any] | None = None) -> Any:
    """Every trial runs all its epochs (train.early_stopping still applies inside a trial)."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()
