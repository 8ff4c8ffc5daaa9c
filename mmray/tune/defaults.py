"""The built-in search space (``mmray/tune/default_space.yaml``), fitted to a job: ``mmray tune JOB`` without ``--space``.

The YAML ships inside the package and is read with :mod:`importlib.resources`, so an installed mmray has it
too. :func:`default_space` fits it to the job before it is validated like any space file:

- parameters of modalities the job does not read are dropped;
- an encoder of the job that is not one of the space's variants (``model.encoders.<m>.name`` choices), or a
  frozen one, is kept as is: its parameters are dropped;
- every drawn range and choice is widened to hold the job's own value, so the baseline trial (the job as
  is) can be drawn; a value that cannot be (a non-positive value on a log scale) drops the parameter, and
  every trial keeps the job's own value.
"""
from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import yaml

from mmray.config.loader import validate_job

DEFAULT_SPACE = "default_space.yaml"
SOURCE = "the built-in default space (mmray/tune/default_space.yaml)"


def default_space_raw() -> dict[str, Any]:
    """The shipped default space, as written (not fitted to any job)."""
    text = resources.files("mmray.tune").joinpath(DEFAULT_SPACE).read_text()
    return yaml.safe_load(text)


def _job_value(job: dict[str, Any], key: str) -> Any:
    node: Any = job
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _kept_encoders(raw: dict[str, Any], config) -> set[str]:
    """Modalities whose encoder this space may vary: read by the job, not frozen, one of the variants."""
    kept = set()
    for m in config.data.modalities:
        enc = getattr(config.model.encoders, m)
        names = raw["parameters"].get(f"model.encoders.{m}.name", {}).get("choice")
        if not enc.freeze and (names is None or enc.name in names):
            kept.add(m)
    return kept


def _widen(spec: dict[str, Any], value: Any) -> dict[str, Any] | None:
    """``spec`` widened to draw ``value``, or None when it cannot be (the parameter is then dropped)."""
    if "choice" in spec:
        return spec if value in spec["choice"] else {**spec, "choice": [*spec["choice"], value]}
    kind = next(k for k in ("loguniform", "uniform", "int") if k in spec)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind == "int" and value != int(value):
        return None
    if kind == "loguniform" and value <= 0:
        return None
    lo, hi = spec[kind]
    return {**spec, kind: [min(lo, value), max(hi, value)]}


def fit_to_job(raw: dict[str, Any], job_raw: dict[str, Any]) -> dict[str, Any]:
    """A space document (the default space's layout) fitted to the job; see the module docstring."""
    from mmray.tune.space import SpaceConfig

    raw = copy.deepcopy(raw)
    config = validate_job(job_raw)
    kept = _kept_encoders(raw, config)
    params = {k: v for k, v in raw["parameters"].items()
              if not k.startswith("model.encoders.") or k.split(".")[2] in kept}
    job = config.model_dump(mode="json")
    # widen in dependency order, following the job's own values through the `when` conditions
    order = SpaceConfig.model_validate({**raw, "parameters": params})
    values: dict[str, Any] = {}
    for key, _ in order.ordered_parameters():
        spec = params[key]
        if not all(_holds(values, c, w) for c, w in spec.get("when", {}).items()):
            continue
        value = _job_value(job, key)
        widened = _widen(spec, value)
        if widened is None:
            del params[key]
            continue
        params[key] = widened
        values[key] = value
    # a parameter whose condition was dropped can never be drawn
    params = {k: v for k, v in params.items() if all(c in params for c in v.get("when", {}))}
    raw["parameters"] = params
    return raw


def _holds(values: dict[str, Any], cond: str, wanted: Any) -> bool:
    return cond in values and values[cond] in (wanted if isinstance(wanted, list) else [wanted])


def default_space(job_raw: dict[str, Any]) -> dict[str, Any]:
    """The default space fitted to ``job_raw`` (a raw space document; :func:`mmray.tune.space.load_space`
    validates it against the job like any space file)."""
    return fit_to_job(default_space_raw(), job_raw)
