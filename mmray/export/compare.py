"""A compressed export next to its source: accuracy, agreement, size on disk and CPU latency (no Ray).

``mmray evaluate`` on a compressed export (one with ``quantization.json``) adds :func:`compare_with_source`.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mmray.errors import UserError
from mmray.export.codec import QUANTIZATION_FILE, read_quantization
from mmray.export.evaluate import split_batches
from mmray.export.loader import load_model
from mmray.export.quantize import check_export_dir, folder_bytes
from mmray.export.writer import WEIGHTS_FILE
from mmray.models.builder import job_tasks
from mmray.train.evaluation import RowPredictions, evaluate_model

log = logging.getLogger("mmray.export")


def latency_ms(predictor: Any, batch: Mapping[str, Any], min_seconds: float = 0.5, min_repeats: int = 5,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds per sample of ``predictor.predict_batch(batch)`` (after one warm-up call).

    ``clock`` is wall-clock time by default; ``time.thread_time`` measures this thread's CPU time,
    which on a busy machine (with one torch thread) is the latency the call would have on an idle core.
    """
    rows = len(batch["label"])
    predictor.predict_batch(batch)
    n, start = 0, clock()
    while n < min_repeats or clock() - start < min_seconds:
        predictor.predict_batch(batch)
        n += 1
    return (clock() - start) / n / rows * 1000.0


def _rows(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


def compare_with_source(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                        batch_size: int = 256, latency_batch: int = 32, write: bool = True) -> dict[str, Any]:
    """Accuracy, size on disk and CPU latency of a compressed export next to its source export's.

    Both models predict the same decoded rows. When the source export is no longer where
    ``quantization.json`` says, its accuracy is read from the metrics recorded at compression
    time (``source_metrics``, the training run's ``metrics.json``), and its latency is not measured.

    Returns:
        ``{"split", "mode", "rows", "agreement", "latency_batch", "compressed": {...}, "original": {...}}``,
        each side with ``accuracy``, ``f1``, ``weights_bytes``, ``folder_bytes``, ``ms_per_sample_batch1``,
        ``ms_per_sample_batched`` and ``measured`` (False = read from metrics.json). ``agreement`` is the
        share of rows where both predict the same class (``None`` without the source). Written to
        ``compare-<split>.json`` in ``model_dir`` when ``write``.

    Raises:
        UserError: ``model_dir`` is not a compressed export, or the dataset does not fit it.
    """
    root = check_export_dir(model_dir)
    spec = read_quantization(root)
    if spec is None:
        raise UserError(f"{root}: not a compressed export (no {QUANTIZATION_FILE}); see `mmray export --help`")
    compressed = load_model(root)
    source_dir = Path(spec["source"])
    source = None
    try:
        if read_quantization(check_export_dir(source_dir)) is None:
            source = load_model(source_dir)
    except UserError as e:
        log.warning("source export not loadable (%s); using its recorded metrics", e)

    sides = {"compressed": (compressed, root), "original": (source, source_dir)}
    measured: dict[str, dict[str, Any]] = {}
    predictions: dict[str, RowPredictions] = {}
    for side, (predictor, _) in sides.items():  # both read the same rows, decoded as the compressed export does
        if predictor is not None:
            predictions[side] = RowPredictions()
            measured[side] = evaluate_model(
                predictor.model, split_batches(compressed, data_dir, split, batch_size),
                tasks=job_tasks(predictor.labels), modalities=predictor.config.data.modalities,
                device=predictor.device, precision=predictor.config.train.precision, prefix=split,
                rows=predictions[side])
    sample = _latency_sample(compressed, data_dir, split, batch_size, latency_batch)

    result: dict[str, Any] = {"split": split, "mode": spec["mode"], "model_dir": str(root),
                              "source": str(source_dir), "latency_batch": None, "agreement": None}
    for side, (predictor, folder) in sides.items():
        entry: dict[str, Any] = {"measured": predictor is not None}
        if predictor is not None:
            m = measured[side]
            entry |= {"rows": int(m[f"{split}.rows"]), "accuracy": m[f"{split}.accuracy"], "f1": m[f"{split}.f1"]}
            entry |= {"weights_bytes": (folder / WEIGHTS_FILE).stat().st_size, "folder_bytes": folder_bytes(folder)}
        else:
            recorded = spec.get("source_metrics") or {}
            entry |= {"accuracy": recorded.get(f"{split}.accuracy"), "f1": recorded.get(f"{split}.f1"),
                      "weights_bytes": spec.get("source_weights_bytes")}
        result[side] = entry
    if sample is not None:
        _measure_latency({side: p for side, (p, _) in sides.items() if p is not None}, sample, result)
    result["rows"] = result["compressed"].get("rows", 0)
    if sample is not None:
        result["latency_batch"] = len(sample["label"])
    if source is not None and result["rows"]:
        ours, theirs = predictions["compressed"].predicted, predictions["original"].predicted
        result["agreement"] = sum(theirs.get(i) == p for i, p in ours.items()) / result["rows"]
    if write:
        (root / f"compare-{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _latency_sample(predictor: Any, data_dir: str | Path, split: str, batch_size: int, rows: int) -> dict | None:
    """The first ``rows`` rows of the first batch with a decodable row: latency does not depend on which rows."""
    for batch in split_batches(predictor, data_dir, split, batch_size):
        if batch["valid"].bool().any():
            return _rows(batch, rows)
    return None


def _measure_latency(predictors: Mapping[str, Any], sample: Mapping[str, Any], result: dict[str, Any],
                     rounds: int = 3) -> None:
    """Median ms/sample at batch 1 and batched; the models alternate within each round, so background
    load hits both alike."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for side, predictor in predictors.items():
            for key, batch in (("ms_per_sample_batch1", _rows(sample, 1)), ("ms_per_sample_batched", sample)):
                times.setdefault((side, key), []).append(latency_ms(predictor, batch, min_seconds=0.2))
    for (side, key), values in times.items():
        result[side][key] = statistics.median(values)


def format_comparison(result: Mapping[str, Any]) -> str:
    """A terminal table of :func:`compare_with_source`'s result."""
    comp, orig = result["compressed"], result["original"]
    b = result.get("latency_batch") or 0

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def mb(v: Any) -> str:
        return "-" if v is None else f"{v / 1e6:.3f} MB"

    rows = [
        ("accuracy", num(orig.get("accuracy"), ".4f"), num(comp.get("accuracy"), ".4f")),
        ("f1", num(orig.get("f1"), ".4f"), num(comp.get("f1"), ".4f")),
        ("weights on disk", mb(orig.get("weights_bytes")), mb(comp.get("weights_bytes"))),
        ("export folder", mb(orig.get("folder_bytes")), mb(comp.get("folder_bytes"))),
        ("ms/sample, batch 1", num(orig.get("ms_per_sample_batch1"), ".3f"),
         num(comp.get("ms_per_sample_batch1"), ".3f")),
        (f"ms/sample, batch {b}", num(orig.get("ms_per_sample_batched"), ".3f"),
         num(comp.get("ms_per_sample_batched"), ".3f")),
    ]
    lines = ["", f"compressed ({result['mode']}) vs original on split {result['split']} "
                 f"({result['rows']} rows; CPU, {torch.get_num_threads()} threads)",
             f"{'':<22} {'original':>12} {result['mode']:>12}"]
    lines += [f"{k:<22} {o:>12} {c:>12}" for k, o, c in rows]
    if result.get("agreement") is not None:
        lines.append(f"same prediction as the original on {result['agreement']:.1%} of rows")
    lines.append("latency: wall-clock median of 3 alternating rounds; it varies with other load on the machine")
    if not orig.get("measured"):
        lines.append(f"original not found at {result['source']}: its accuracy is the one recorded in its metrics.json")
    return "\n".join(lines)
