"""Load a job YAML, apply ``--set key=value`` overrides, validate into a :class:`JobConfig`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from mmray.config.errors import ConfigError, UserError
from mmray.config.schema import MODALITIES, JobConfig
from mmray.models.encoders import ENCODERS
from mmray.models.fusion import FUSIONS
from mmray.registry import UnknownComponentError


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.optimizer.lr=3e-4'`` -> ``('train.optimizer.lr', 0.0003)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.optimizer.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; users mean a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key='a.b.c'``, creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"{'.'.join(parts[: i + 1])}: is {child!r}, cannot set {key} inside it"])
        node = child
    leaf = parts[-1]
    # Switching a component to another name drops the old component's own keys.
    if leaf == "name" and isinstance(node.get("name"), str) and node["name"] != value:
        node.clear()
    node[leaf] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the raw job tree with each ``KEY=VALUE`` (or ``(key, value)``) set at its dotted key."""
    tree = copy.deepcopy(dict(raw))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_dotted(tree, key, value)
    return tree


def _dotted(loc: tuple, raw: Any) -> str:
    """Turn a pydantic error location into the user's dotted key, dropping discriminated-union tags."""
    tags = set(ENCODERS.names()) | set(FUSIONS.names())
    parts: list[str] = []
    node = raw
    for i, part in enumerate(loc):
        is_tag = i > 0 and loc[i - 1] in ("fusion", *MODALITIES) and part in tags
        if is_tag and not (isinstance(node, dict) and part in node):
            continue
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


def _kind_at(key: str) -> str:
    if key.startswith("model.encoders."):
        return f"{key.split('.')[2]} encoder"
    if key.startswith("model.fusion"):
        return "fusion"
    return "component"


# Keys that moved: a job file still using the old one is told where it went.
MOVED_KEYS = {"scaling.max_failures": "train.max_failures"}


def format_errors(err: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        key = _dotted(tuple(e["loc"]), raw)
        ctx = e.get("ctx") or {}
        if e["type"] == "union_tag_invalid":
            choices = ", ".join(t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(","))
            problems.append(f"{key}.name: {ctx.get('tag')!r} is not a {_kind_at(key)}; choose one of {choices}")
        elif e["type"] == "union_tag_not_found":
            problems.append(f"{key}.name: missing; every {_kind_at(key)} section names its component")
        elif e["type"] == "extra_forbidden" and key in MOVED_KEYS:
            problems.append(f"{key}: moved to {MOVED_KEYS[key]}; set {MOVED_KEYS[key]}: {e['input']!r} instead")
        elif e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key (value {e['input']!r}); check the spelling against `mmray render-config`")
        elif e["type"] == "missing":
            problems.append(f"{key}: required")
        elif e["type"] == "literal_error":
            problems.append(f"{key}: {e['input']!r} is not valid; choose one of {ctx.get('expected', '')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if msg.startswith(f"{key}:"):
                problems.append(msg)
            elif msg.startswith(repr(e["input"])):
                problems.append(f"{key}: {msg}")
            else:
                problems.append(f"{key}: {e['input']!r}: {msg}" if key else msg)
    return problems


def validate_job(raw: Mapping[str, Any], source: str | None = None) -> JobConfig:
    """Validate a raw job mapping, collecting every problem into one :class:`ConfigError`."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, raw), source) from None
    except UnknownComponentError as e:
        raise ConfigError([str(e)], source) from None


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read ``path``, apply ``--set`` overrides and validate. Raises :class:`ConfigError` or :class:`UserError`."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_job(raw, str(path))


def to_yaml(config: JobConfig) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def from_yaml_text(text: str, source: str | None = None) -> JobConfig:
    """A validated :class:`JobConfig` from YAML text (a checkpoint's or export's ``config.yaml``)."""
    return validate_job(yaml.safe_load(text), source)
