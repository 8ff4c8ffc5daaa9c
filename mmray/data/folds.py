"""K-fold cross-validation folds over train+val: each row of the two splits in exactly one of K folds, stratified
by the main task's label and seeded. No Ray; the test split is never read.

A row is named by its split and its position in that split (the order of the dataset's shards and row groups,
which is also the order of the decoded-input cache's parts), so a fold is a row subset of train+val that any
reader of the dataset's row groups can select (:func:`mmray.data.decoded.fold_readers`).

Stratified the usual way (scikit-learn's ``StratifiedKFold`` gives folds of the same shape): the rows of each
class are shuffled with the seed and dealt to the folds in turn, one dealing running on from class to class, so
every fold holds each class's rows to within one and the folds' sizes differ by at most one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow.parquet as pq

from mmray.config.errors import UserError
from mmray.data.dataset_dir import DatasetInfo, resolve_fs

SPLITS = ("train", "val")  # what the folds cover; "test" is never a fold's


@dataclass(frozen=True)
class Folds:
    """``assignment[split][i]``: the fold (0..k-1) of row ``i`` of ``split`` (``train`` and ``val``)."""

    k: int
    seed: int
    assignment: Mapping[str, np.ndarray]

    def rows(self, fold: int, *, held_out: bool) -> dict[str, np.ndarray]:
        """Split -> the sorted row positions of fold ``fold`` (``held_out``) or of every other fold (its training
        rows)."""
        if not 0 <= fold < self.k:
            raise ValueError(f"fold {fold} of {self.k}")
        return {s: np.flatnonzero((a == fold) == held_out) for s, a in self.assignment.items()}

    def sizes(self) -> list[int]:
        """Rows per fold."""
        counts = np.zeros(self.k, dtype=np.int64)
        for a in self.assignment.values():
            counts += np.bincount(a, minlength=self.k)
        return counts.tolist()

    def to_json(self) -> dict:
        return {"k": self.k, "seed": self.seed, "assignment": {s: a.tolist() for s, a in self.assignment.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> "Folds":
        return cls(int(doc["k"]), int(doc["seed"]),
                   {s: np.asarray(a, dtype=np.int16) for s, a in doc["assignment"].items()})


def split_labels(info: DatasetInfo, split: str) -> np.ndarray:
    """The main task's label of every row of ``split``, in the dataset's row order (only that column is read)."""
    out = []
    for path in info.split_files(split):
        fs, inner = resolve_fs(path)
        with fs.open_input_file(inner) as fh:
            out.append(pq.ParquetFile(fh).read(columns=["label"]).column("label").to_numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def train_val_labels(info: DatasetInfo) -> dict[str, np.ndarray]:
    return {s: split_labels(info, s) for s in SPLITS if s in info.splits}


def stratified_folds(labels: Mapping[str, np.ndarray], k: int, seed: int) -> Folds:
    """Deal the rows of ``labels`` (split -> each row's class) into ``k`` folds, stratified by class, seeded.

    Raises:
        ValueError: ``k`` below 2, or more folds than the rows of the smallest class
            (:func:`check_fold_count` says it to a user first).
    """
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs at least 2 folds, got {k}")
    splits = list(labels)
    flat = np.concatenate([np.asarray(labels[s], dtype=np.int64) for s in splits]) if splits else np.zeros(0, int)
    classes, counts = np.unique(flat, return_counts=True)
    if len(classes) == 0 or counts.min() < k:
        raise ValueError(f"{k} folds need at least {k} rows of every class; the smallest class has "
                         f"{int(counts.min()) if len(counts) else 0}")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(flat == c)) for c in classes])
    fold_of = np.empty(len(flat), dtype=np.int16)
    fold_of[order] = np.arange(len(order)) % k
    assignment, start = {}, 0
    for s in splits:
        n = len(labels[s])
        assignment[s] = fold_of[start:start + n]
        start += n
    return Folds(k, seed, assignment)


def make_folds(info: DatasetInfo, k: int, seed: int) -> Folds:
    """The ``k`` folds of the dataset's train+val rows (:func:`stratified_folds` of their labels)."""
    return stratified_folds(train_val_labels(info), k, seed)


def check_fold_count(info: DatasetInfo, k: int, flag: str) -> None:
    """Refuse ``k`` folds of train+val when a class has fewer rows there than ``k`` (a fold would miss it).

    Raises:
        UserError: naming ``flag``, the class, its rows and the largest ``k`` that works.
    """
    labels = train_val_labels(info)
    flat = np.concatenate(list(labels.values())) if labels else np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(flat, return_counts=True)
    if len(classes) == 0:
        raise UserError(f"{flag}: {info.path} has no train or val rows to make folds of")
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        names = info.class_names
        c = int(classes[smallest])
        name = names[c] if 0 <= c < len(names) else str(c)
        n = int(counts[smallest])
        fix = (f"choose {flag} {n} or fewer" if n >= 2 else
               f"this dataset cannot be cross-validated; re-check the finalists with other seeds (leave out {flag})")
        raise UserError(f"{flag}: {k} folds need at least {k} rows of every class in train+val, but class "
                        f"{name!r} has {n}; {fix}")
