"""Load a job YAML, apply ``--set key=value`` overrides, validate into a :class:`JobConfig`."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from mmray.config.errors import ConfigError, UserError
from mmray.config.schema import MODALITIES, JobConfig
from mmray.models.encoders import ENCODERS
from mmray.models.fusion import FUSIONS
from mmray.registry import UnknownComponentError

log = logging.getLogger(__name__)


def parse_yaml(text: str | bytes, source: str) -> Any:
    """YAML text (or the raw bytes of a file) -> Python objects; never constructs Python objects.

    Raises:
        UserError: naming ``source``: the bytes are not UTF-8 text (a binary file), or not valid YAML
            (a ``!!python/...`` tag included: ``safe_load`` refuses it).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    if text is None or "\x00" in text:
        raise UserError(f"{source}: not a YAML text file (it holds binary, non-UTF-8 bytes)")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    data = parse_yaml(p.read_bytes(), str(path))
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


def component_choices(parts: list[str]) -> dict[str, set[str]] | None:
    """For the dotted path of a component section (``model.fusion``, ``model.encoders.text``,
    ``train.optimizer``, ...): each component name it may choose -> that component's keys; else None.

    A component section is one whose ``name`` is a choice (a ``Literal``); the job's own ``name`` is not.
    """
    from typing import Literal, Union, get_args, get_origin

    from pydantic import BaseModel

    model: Any = JobConfig
    annotation: Any = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    if annotation is None:
        return None
    members = get_args(annotation) if get_origin(annotation) is Union else (annotation,)
    choices: dict[str, set[str]] = {}
    for cls in members:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or "name" not in cls.model_fields:
            return None
        name_type = cls.model_fields["name"].annotation
        if get_origin(name_type) is not Literal:
            return None
        for choice in get_args(name_type):
            choices[choice] = set(cls.model_fields)
    return choices


def _default_name(parts: list[str]) -> str | None:
    """The component a section means when it names none (the schema's default for it)."""
    from pydantic import BaseModel

    model: Any = JobConfig
    field = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = field.annotation
    default = field.get_default(call_default_factory=True) if field is not None else None
    return getattr(default, "name", None)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> list[str]:
    """Set ``tree[a][b][c] = value`` for ``key='a.b.c'``, creating mappings on the way.

    Setting a component's ``name`` (``model.fusion.name``, ``train.optimizer.name``: a registry or
    ``Literal`` choice) to another component keeps the keys both components have (``lr``,
    ``hidden_dim``) and drops those only the old one has. Nothing else is ever dropped: the job's
    own ``name`` is an ordinary key.

    Returns:
        the dotted keys dropped (for a warning), usually none.
    """
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
    dropped: list[str] = []
    if leaf == "name" and len(parts) > 1:
        choices = component_choices(parts[:-1])
        old = node.get("name", _default_name(parts[:-1]) if choices else None)
        if choices and isinstance(old, str) and old != value and old in choices and value in choices:
            lost = [k for k in node if k != "name" and k in choices[old] and k not in choices[value]]
            for k in lost:
                del node[k]
            dropped = [f"{'.'.join(parts[:-1])}.{k}" for k in lost]
    node[leaf] = value
    return dropped


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]], *,
                    warn: bool = False) -> dict[str, Any]:
    """``raw`` with each ``KEY=VALUE`` (or ``(key, value)``) set; ``raw`` itself is not changed.

    With ``warn``, a key dropped by switching a component (see :func:`set_dotted`) is logged as a warning
    naming it, so a user's ``--set`` never loses a value silently.
    """
    tree = copy.deepcopy(dict(raw))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        for lost in set_dotted(tree, key, value):
            if warn:
                log.warning(f"mmray: warning: {key}={value}: {lost} is not a key of {value!r}; "
                            f"its value was dropped")
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
        elif e["type"] == "finite_number":
            problems.append(f"{key}: {e['input']!r} is not a finite number; finite numbers only (no inf or nan)")
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
    raw = apply_overrides(read_yaml(path), overrides, warn=True)
    return validate_job(raw, str(path))


def to_yaml(config: JobConfig) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def from_yaml_text(text: str | bytes, source: str | None = None) -> JobConfig:
    """Validate a job config given as YAML text. Raises :class:`UserError` naming ``source``."""
    raw = parse_yaml(text, source or "job config")
    if not isinstance(raw, dict):
        raise UserError(f"{source or 'job config'}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate_job(raw, source)
