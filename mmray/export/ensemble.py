"""Ensemble exports: several trained models as one model folder, and weight soups (no Ray).

Layout of an ensemble export (``load_model``, ``evaluate``, ``predict`` and ``export --quantize`` use it like
any other export)::

    OUT/ensemble.json       {"combine": "mean_probabilities", "members": ["members/0", ...], "sources": [...]}
    OUT/members/<i>/        each member: a complete model export (its own weights, config, labels, tokenizer)
    OUT/config.yaml, OUT/labels.json, OUT/tokenizer/   member 0's: how raw inputs are decoded (the same for all)
    OUT/metrics.json, OUT/versions.json

The ensemble's prediction is the mean of its members' class probabilities (each member's logits through a
softmax, then averaged): :class:`EnsembleModel` returns the log of that mean as its logits, so everything that
takes a softmax of a model's logits (predict, evaluate, the loss) sees the averaged probabilities.
Members must read the same inputs the same way (the same ``data`` section, labels and tokenizer): a batch is
decoded once and given to all of them. Their encoders and fusion may differ.

A **weight soup** (:func:`write_soup`) averages the members' weights into one model instead; it needs members
of one architecture and is refused, naming what differs, otherwise.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from mmray import storage as store
from mmray.config import UserError
from mmray.export.codec import read_quantization
from mmray.export.loader import read_config, read_labels
from mmray.export.writer import (
    COMBINE,
    CONFIG_FILE,
    ENSEMBLE_FILE,
    EXPORT_METRICS_FILE,
    LABELS_FILE,
    MEMBERS_DIR,
    TOKENIZER_DIR,
    VERSIONS_FILE,
    WEIGHTS_FILE,
    collect_versions,
    is_ensemble,
    replace_dir,
)


def _same_inputs(first: Path, other: Path) -> str | None:
    """Why ``other`` cannot share ``first``'s decoded batches (None when it can)."""
    a, b = read_config(first), read_config(other)
    da, db = a.data.model_dump(mode="json"), b.data.model_dump(mode="json")
    diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k) and k != "path")
    if diff:
        return f"it reads its inputs differently (data.{diff[0]}: {db.get(diff[0])!r} vs {da.get(diff[0])!r})"
    if read_labels(first) != read_labels(other):
        return "its classes differ"
    ta, tb = first / TOKENIZER_DIR, other / TOKENIZER_DIR
    if ta.is_dir() != tb.is_dir() or (ta.is_dir() and filecmp.dircmp(ta, tb).diff_files):
        return "its text tokenizer differs"
    return None


def write_ensemble(out_dir: str | Path, members: Sequence[str | Path], *, metrics: Mapping[str, Any] | None = None,
                   sources: Sequence[Any] | None = None) -> Path:
    """Write the exports ``members`` as one ensemble export at ``out_dir`` (an earlier export there is replaced).

    Args:
        members: model export folders (local); at least two.
        metrics: the ensemble's own measurements for ``metrics.json``.
        sources: what each member is (e.g. its trial id), kept in ``ensemble.json``.

    Raises:
        UserError: fewer than two members, a member that is not an export (or is itself an ensemble), or
            members that read their inputs differently (named).
    """
    members = [Path(m) for m in members]
    if len(members) < 2:
        raise UserError(f"an ensemble needs at least two member exports, got {len(members)}")
    for i, m in enumerate(members):
        if is_ensemble(m):
            raise UserError(f"{m}: is itself an ensemble; give its members instead")
        if not (m / WEIGHTS_FILE).is_file() or not (m / CONFIG_FILE).is_file():
            raise UserError(f"{m}: not a model export (no {WEIGHTS_FILE} / {CONFIG_FILE})")
        why = _same_inputs(members[0], m) if i else None
        if why:
            raise UserError(f"{m}: cannot join an ensemble with {members[0]}: {why}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        names = []
        for i, m in enumerate(members):
            name = f"{MEMBERS_DIR}/{i}"
            shutil.copytree(m, tmp / name, ignore=shutil.ignore_patterns("eval-*.json", "confusion-*.png"))
            names.append(name)
        for f in (CONFIG_FILE, LABELS_FILE):
            shutil.copy2(members[0] / f, tmp / f)
        if (members[0] / TOKENIZER_DIR).is_dir():
            shutil.copytree(members[0] / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        spec = {"combine": COMBINE, "members": names, "sources": list(sources) if sources is not None else None}
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / EXPORT_METRICS_FILE).write_text(json.dumps(dict(metrics or {}), indent=2) + "\n")
        (tmp / VERSIONS_FILE).write_text(json.dumps(collect_versions(), indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _architecture_difference(first: Path, other: Path, a: dict[str, torch.Tensor],
                             b: dict[str, torch.Tensor]) -> str | None:
    ma, mb = read_config(first).model.model_dump(mode="json"), read_config(other).model.model_dump(mode="json")
    for section in ("fusion", "encoders"):
        if ma[section] != mb[section]:
            if section == "fusion":
                keys = sorted((k for k in set(ma["fusion"]) | set(mb["fusion"])
                               if ma["fusion"].get(k) != mb["fusion"].get(k)), key=lambda k: (k != "name", k))
                return f"model.fusion.{keys[0]}: {mb['fusion'].get(keys[0])!r} vs {ma['fusion'].get(keys[0])!r}"
            for m in sorted(set(ma["encoders"]) | set(mb["encoders"])):
                ea, eb = ma["encoders"].get(m) or {}, mb["encoders"].get(m) or {}
                keys = sorted((k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k)), key=lambda k: (k != "name", k))
                if keys:
                    return f"model.encoders.{m}.{keys[0]}: {eb.get(keys[0])!r} vs {ea.get(keys[0])!r}"
    if set(a) != set(b):
        return f"weights {sorted(set(a) ^ set(b))[0]!r} are in one model only"
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        return f"weight {shapes[0]!r} is {tuple(b[shapes[0]].shape)} vs {tuple(a[shapes[0]].shape)}"
    return None


def write_soup(out_dir: str | Path, members: Sequence[str | Path]) -> Path:
    """Average the weights of the exports ``members`` (one architecture) into one export at ``out_dir``.

    Floating-point weights are averaged; integer buffers (batch-norm counters) are member 0's. The folder is
    member 0's export with the averaged ``model.safetensors``.

    Raises:
        UserError: fewer than two members, a compressed or ensemble member, or members whose architectures
            differ (the message names the first setting or weight that differs).
    """
    members = [Path(m) for m in members]
    if len(members) < 2:
        raise UserError(f"a weight soup needs at least two member exports, got {len(members)}")
    states = []
    for m in members:
        if is_ensemble(m) or read_quantization(m) is not None or not (m / WEIGHTS_FILE).is_file():
            raise UserError(f"{m}: a weight soup takes full-precision single-model exports")
        states.append(load_file(str(m / WEIGHTS_FILE), device="cpu"))
    for m, state in zip(members[1:], states[1:]):
        why = _same_inputs(members[0], m) or _architecture_difference(members[0], m, states[0], state)
        if why:
            raise UserError(f"weight soup refused: {m} and {members[0]} have different architectures ({why}); "
                            f"average their predictions instead (an ensemble export)")
    soup = {k: (torch.stack([s[k].float() for s in states]).mean(dim=0).to(v.dtype) if v.is_floating_point()
                else v.clone()) for k, v in states[0].items()}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        shutil.copytree(members[0], tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("eval-*.json", "confusion-*.png", "compare-*.json"))
        store.save_weights(soup, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mmray.soup": str(len(members))})
        (tmp / EXPORT_METRICS_FILE).write_text(json.dumps({"soup_of": [str(m) for m in members]}, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
