"""The public names of ``mmray`` are the same object on every access, whatever was imported before.

``mmray.train`` used to be the ``train`` function on first access and the subpackage after anything
imported ``mmray.train.loop``; a fresh interpreter per check makes the import order the test's own.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import types

import pytest

import mmray

SUBPACKAGES = ("cli", "config", "data", "export", "jobs", "models", "train", "tune")
PUBLIC = {"fit": ("mmray.train.api", "train"), "tune_job": ("mmray.tune.api", "tune_job"),
          "load_model": ("mmray.export.loader", "load_model"), "evaluate": ("mmray.export.evaluate", "evaluate")}

_PROBE = """
import json, sys
import mmray
seen = {}
def look(stage):
    for name in ("fit", "tune_job", "load_model", "evaluate", "train", "tune", "export"):
        value = getattr(mmray, name)
        seen.setdefault(name, []).append(f"{type(value).__name__}:{getattr(value, '__module__', None) or value.__name__}:"
                                         f"{getattr(value, '__qualname__', value.__name__)}")
look("first")
import mmray.train.loop, mmray.train.api, mmray.tune.api, mmray.tune.sweep, mmray.export.loader, mmray.export.evaluate
look("after submodules")
print(json.dumps(seen))
"""


def test_public_names_are_the_same_on_every_access_before_and_after_importing_submodules():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    for name, values in seen.items():
        assert len(set(values)) == 1, f"mmray.{name} changed between accesses: {values}"
    assert seen["fit"][0] == "function:mmray.train.api:train"
    assert seen["tune_job"][0] == "function:mmray.tune.api:tune_job"
    assert seen["load_model"][0] == "function:mmray.export.loader:load_model"
    assert seen["train"][0].startswith("module:mmray.train")
    assert seen["tune"][0].startswith("module:mmray.tune")


def test_importing_mmray_and_its_public_names_imports_no_ray():
    code = ("import sys, mmray; mmray.JobConfig; mmray.fit; mmray.tune_job; mmray.load_model; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_functions_resolve_to_their_module_and_have_docstrings(name):
    module, attribute = PUBLIC[name]
    value = getattr(mmray, name)
    assert value is getattr(importlib.import_module(module), attribute)
    assert value.__doc__ and len(value.__doc__.strip()) > 40


_SUBPACKAGE_PROBE = """
import importlib, json, pkgutil, sys
packages = {p: importlib.import_module("mmray." + p) for p in sys.argv[1:]}
def look():
    return {f"{p}.{n}": repr(getattr(pkg, n)) for p, pkg in packages.items() for n in pkg.__all__}
first = look()
for pkg in packages.values():
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
print(json.dumps([first, look()]))
"""


def test_each_subpackage_exports_the_same_objects_before_and_after_importing_its_submodules():
    out = subprocess.run([sys.executable, "-c", _SUBPACKAGE_PROBE, *SUBPACKAGES], capture_output=True, text=True,
                         check=True).stdout
    first, after = json.loads(out.strip().splitlines()[-1])
    changed = {k: (first[k], after[k]) for k in first if first[k] != after[k]}
    assert not changed, f"exported names that changed once submodules were imported: {changed}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_declares_all_and_no_lazy_name_shadows_a_submodule(package):
    pkg = importlib.import_module(f"mmray.{package}")
    assert isinstance(getattr(pkg, "__all__", None), list), f"mmray.{package} has no __all__"
    lazy = set(getattr(pkg, "_EXPORTS", {}))
    submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert not lazy & submodules, f"mmray.{package} lazily exports {sorted(lazy & submodules)}, its submodules' names"
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert not isinstance(value, types.ModuleType), f"mmray.{package}.{name} is a module"
        if callable(value) and not isinstance(value, type):
            assert value.__doc__, f"mmray.{package}.{name} has no docstring"


def test_top_level_names_do_not_shadow_subpackages():
    assert not set(mmray.__all__) & set(SUBPACKAGES)
    assert isinstance(mmray.train, types.ModuleType) and isinstance(mmray.tune, types.ModuleType)
