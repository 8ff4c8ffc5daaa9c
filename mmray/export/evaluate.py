"""Evaluate an export on a dataset split, and write per-row predictions (no Ray).

``mmray evaluate`` and ``mmray predict`` call these; they read the dataset's decoded-input cache when a run or a
sweep built one with the same key (:func:`mmray.data.decoded.eval_batches`), else decode the shards with the
in-process reader exactly as validation did during training: the same batches either way.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmray.config import UserError
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import Preprocessor
from mmray.data.decoded import eval_batches
from mmray.export.loader import Predictor, load_model
from mmray.models.builder import job_tasks
from mmray.storage import StagedDir, local_output
from mmray.train.evaluation import evaluate_model

log = logging.getLogger("mmray.export")

# Past this many classes the cells are too small to hold readable counts.
MAX_ANNOTATED_CLASSES = 30


def _open_split(predictor: Predictor, data_dir: str | Path, split: str):
    """The dataset and a (never augmenting, skipping) preprocessor for ``predictor``'s model.

    Raises:
        UserError: the dataset is missing, lacks a modality the model reads, or its classes differ.
    """
    info = read_dataset_info(str(data_dir))
    info.split_files(split)  # raises a UserError naming the splits if ``split`` is not one
    if list(info.class_names) != predictor.class_names:
        raise UserError(
            f"{info.path}: its classes {list(info.class_names)} differ from the model's {predictor.class_names}"
        )
    # Bad records are counted and reported as "skipped" rather than stopping the evaluation.
    data = predictor.config.data.model_copy(update={"path": str(data_dir), "on_bad_record": "skip"})
    pre = Preprocessor(data, info, train=False, tokenizer=predictor.tokenizer)
    return data, info, pre


def split_batches(predictor: Predictor, data_dir: str | Path, split: str, batch_size: int) -> Iterator[dict]:
    """Batches of ``split`` decoded with the export's own preprocessing (or read from the decoded-input cache of the
    same key), in file order, with row ids."""
    data, info, pre = _open_split(predictor, data_dir, split)
    yield from eval_batches(data, info, split, batch_size=batch_size, with_ids=True, tokenizer=predictor.tokenizer,
                            preprocessor=pre)


SCORES = ("accuracy", "precision", "recall", "f1", "confusion")


def measure(predictor: Predictor, batches, split: str, *, diagnostics: bool = True) -> dict[str, Any]:
    """The one evaluation (:func:`mmray.train.evaluation.evaluate_model`) of a loaded model on decoded batches.

    Returns:
        ``{"rows", "skipped", "loss", "accuracy", "precision", "recall", "f1", "confusion", "tasks",
        "diagnostics"}``: the main task's scores at the top level; ``tasks`` maps every other task
        (``label_<name>``) to its scores and class names; ``diagnostics`` maps ``without_<m>`` / ``only_<m>``
        to the main task's ``accuracy`` and ``f1`` with those modalities masked as missing (empty for a
        one-modality model, or without ``diagnostics``).
    """
    m = evaluate_model(predictor.model, batches, tasks=job_tasks(predictor.labels),
                       modalities=predictor.config.data.modalities, device=predictor.device,
                       precision=predictor.config.train.precision, prefix=split, diagnostics=diagnostics)
    out: dict[str, Any] = {"rows": int(m[f"{split}.rows"]), "skipped": int(m[f"{split}.bad_records"]),
                           "loss": m[f"{split}.loss"], **{k: m[f"{split}.{k}"] for k in SCORES}}
    out["tasks"] = {t: {**{k: m[f"{split}.{t}.{k}"] for k in SCORES}, "class_names": list(names)}
                    for t, names in predictor.labels.items() if t != "label"}
    prefix = f"{split}.diagnostics."
    out["diagnostics"] = {}
    for key, value in m.items():
        if key.startswith(prefix):
            variant, metric = key[len(prefix):].rsplit(".", 1)
            out["diagnostics"].setdefault(variant, {})[metric] = value
    return out


def evaluate(
    model_dir: str | Path, data_dir: str | Path, split: str = "test", batch_size: int = 256,
    diagnostics: bool = True,
) -> dict[str, Any]:
    """Metrics of the export at ``model_dir`` on one split of a dataset directory.

    Writes ``eval-<split>.json`` (the returned dict) and ``confusion-<split>.png`` into ``model_dir``.

    Args:
        model_dir: a model export folder (local path or URI).
        data_dir: a dataset directory with the same classes (local path or URI).
        split: ``train``, ``val`` or ``test``.
        batch_size: rows decoded and predicted at a time.
        diagnostics: also score the main task with each modality masked as missing, and with all but one.

    Returns:
        ``{"split", "model_dir", "data_dir", "rows", "skipped", "loss", "accuracy", "precision", "recall",
        "f1", "confusion", "class_names", "tasks", "diagnostics"}``: ``rows`` counts evaluated rows,
        ``skipped`` the records that could not be decoded; macro averages over classes; ``confusion``
        rows = true class; ``tasks`` and ``diagnostics`` as in :func:`measure`.

    Raises:
        UserError: a missing or mismatched export or dataset, or an unknown split.
    """
    predictor = load_model(model_dir)
    measured = measure(predictor, split_batches(predictor, data_dir, split, batch_size), split, diagnostics=diagnostics)
    result = {
        "split": split,
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        **measured,
        "class_names": list(predictor.class_names),
    }
    if result["rows"] == 0:
        log.warning("split %r of %s has no decodable rows; every metric is 0", split, data_dir)
    out = StagedDir(str(model_dir))  # a URI export gets its files uploaded
    with open(out.path(f"eval-{split}.json"), "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    plot_confusion(result["confusion"], result["class_names"], out.path(f"confusion-{split}.png"),
                   title=f"{split}: accuracy {result['accuracy']:.3f} ({result['rows']} rows)")
    out.close()
    return result


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: str | Path, title: str = "") -> Path:
    """Save a heat map of the row-normalised confusion matrix, raw counts in the cells, as PNG.

    Colour = fraction of the true class (row) predicted as each column, so rare classes read as
    clearly as common ones; the counts keep the absolute numbers visible.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.int64).reshape(len(class_names), len(class_names))
    support = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, support, out=np.zeros(counts.shape, dtype=np.float64), where=support > 0)
    n = len(class_names)
    side = min(max(4.0, 0.6 * n + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
        ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        if n <= MAX_ANNOTATED_CLASSES:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def format_evaluation(result: dict[str, Any]) -> str:
    """A terminal summary of :func:`evaluate`'s result: a metrics table (a column per task), the modality
    diagnostics and the main task's confusion matrix."""
    names = [_short(n) for n in result["class_names"]]
    tasks = {"label": result, **result.get("tasks", {})}
    lines = [
        f"split {result['split']}: {result['rows']} rows evaluated, {result['skipped']} skipped (undecodable)",
        "",
        f"{'metric':<10} " + (" ".join(f"{t:>{max(7, len(t))}}" for t in tasks) if len(tasks) > 1 else f"{'value':>7}"),
    ]
    for key in ("accuracy", "precision", "recall", "f1"):
        lines.append(f"{key:<10} " + " ".join(f"{m[key]:>{max(7, len(t))}.4f}" for t, m in tasks.items()))
    lines += format_diagnostics(result)
    lines += ["", "confusion matrix (rows = true, columns = predicted)"]
    conf = result["confusion"]
    width = max([len(n) for n in names] + [len(str(v)) for row in conf for v in row] + [4])
    lines.append(" " * width + "  " + " ".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, conf):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def format_diagnostics(result: dict[str, Any]) -> list[str]:
    """Lines of the modality table: the main task's accuracy / macro-F1 with all modalities, each one removed
    (masked as missing) and each one alone; no lines when there is nothing to remove."""
    diag = result.get("diagnostics") or {}
    if not diag:
        return []
    mods = sorted(k[len("without_"):] for k in diag if k.startswith("without_"))
    lines = ["", "modalities (main task; a removed modality is masked as missing in every row)",
             f"{'inputs':<24} {'accuracy':>8} {'f1':>7} {'vs all':>7}",
             f"{'all: ' + '+'.join(mods):<24} {result['accuracy']:>8.4f} {result['f1']:>7.4f} {'':>7}"]
    for kind, label in (("without", "without {}"), ("only", "only {}")):
        for m in mods:
            d = diag.get(f"{kind}_{m}")
            if d is not None:
                lines.append(f"{label.format(m):<24} {d['accuracy']:>8.4f} {d['f1']:>7.4f} "
                             f"{d['accuracy'] - result['accuracy']:>+7.4f}")
    return lines


def _short(name: str, limit: int = 12) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def predict_dataset(
    model_dir: str | Path, data_dir: str | Path, split: str, out_file: str | Path, batch_size: int = 256
) -> int:
    """Write one prediction per row of ``split``: JSONL (default) or CSV when ``out_file`` ends in ``.csv``.

    Columns: ``id``, ``label`` (predicted class id), ``class_name``, ``probability`` (of that class).
    A record that cannot be decoded is written with empty (null) prediction fields, so every id
    of the split appears once.

    Returns:
        The number of rows written.

    Raises:
        UserError: a missing or mismatched export or dataset, an unknown split, or an unwritable ``out_file``.
    """
    predictor = load_model(model_dir)
    with local_output(str(out_file)) as local:
        return _write_predictions(predictor, data_dir, split, str(out_file), Path(local), batch_size)


def _write_predictions(predictor: Predictor, data_dir, split: str, name: str, out: Path, batch_size: int) -> int:
    as_csv = out.suffix.lower() == ".csv"
    fields = ("id", "label", "class_name", "probability")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = out.open("w", newline="" if as_csv else None)
    except OSError as e:
        raise UserError(f"--out {name}: cannot write: {e}") from None
    n = 0
    with f:
        writer = csv.DictWriter(f, fieldnames=fields) if as_csv else None
        if writer:
            writer.writeheader()
        for batch in split_batches(predictor, data_dir, split, batch_size):
            for row in _prediction_rows(predictor, batch):
                if writer:
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
                else:
                    f.write(json.dumps(row) + "\n")
                n += 1
    return n


def _prediction_rows(predictor: Predictor, batch: dict) -> Iterator[dict[str, Any]]:
    valid = batch["valid"].bool()
    probs = predictor.predict_batch(batch)
    top_p, top = probs.max(dim=1)
    for i, record_id in enumerate(batch["id"]):
        if not valid[i]:
            yield {"id": record_id, "label": None, "class_name": None, "probability": None}
            continue
        label = int(top[i])
        yield {"id": record_id, "label": label, "class_name": predictor.class_names[label],
               "probability": round(float(top_p[i]), 6)}
