"""Registries of named components (encoders, fusions, searchers, schedulers).

YAML refers to components by short name (``concat``, ``mel_cnn``); each name maps to a builder
and a typed config class that sits next to the component. The config schema is assembled from
the registries, so a new component is selectable and validated as soon as it is registered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, floats are finite (no inf or nan: a learning
    rate, weight or ratio of inf/nan only trains a NaN model) and validated configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class ComponentConfig(StrictModel):
    """Base of a registered component's config. Subclasses declare ``name: Literal["<name>"]``."""

    name: str


class UnknownComponentError(KeyError):
    """Raised when a name is not in a registry; the message lists the valid names."""

    def __init__(self, kind: str, name: str, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, choices
        super().__init__(f"{name!r} is not a {kind}; choose one of {', '.join(choices)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: Callable[..., T]
    config: type[ComponentConfig]
    modality: str | None = None
    summary: str = ""


@dataclass
class Registry(Generic[T]):
    """A name -> (builder, config class) table for one kind of component."""

    kind: str
    _entries: dict[str, Entry[T]] = field(default_factory=dict)

    def register(self, name: str, *, config: type[ComponentConfig], modality: str | None = None):
        """Decorator registering ``builder(config, **kwargs)`` under ``name``."""

        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, builder, config, modality, doc[0] if doc else "")
            return builder

        return deco

    def names(self, modality: str | None = None) -> list[str]:
        return sorted(n for n, e in self._entries.items() if modality is None or e.modality == modality)

    def entries(self, modality: str | None = None) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(modality)]

    def entry(self, name: str, modality: str | None = None) -> Entry[T]:
        e = self._entries.get(name)
        if e is None or (modality is not None and e.modality != modality):
            kind = f"{modality} {self.kind}" if modality else self.kind
            raise UnknownComponentError(kind, name, self.names(modality))
        return e

    def config_types(self, modality: str | None = None) -> tuple[type[ComponentConfig], ...]:
        return tuple(e.config for e in self.entries(modality))

    def build(self, config: ComponentConfig, **kwargs: Any) -> T:
        return self.entry(config.name).builder(config, **kwargs)
