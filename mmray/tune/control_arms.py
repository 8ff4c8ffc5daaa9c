"""Control arms of a sweep: is the winner really better than a simpler model on the test split?

Each comparison loads two trials' best checkpoints, predicts the test split with both, and takes a
paired bootstrap confidence interval of the accuracy difference (same rows for both models, so
row-level difficulty cancels out). No Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmray.config.errors import UserError
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decoded import eval_batches
from mmray.export.loader import load_trained
from mmray.models.builder import job_tasks
from mmray.train.evaluation import RowPredictions, evaluate_model

RESAMPLES, LEVEL, SEED = 2000, 0.95, 0
# Rows x resamples drawn at once: bounds the bootstrap's memory for large test splits (~80 MB).
_CHUNK_CELLS = 10_000_000


@dataclass(frozen=True)
class BootstrapCI:
    """Paired bootstrap of ``mean(a_correct) - mean(b_correct)`` over the same rows."""

    difference: float  # on the full sample
    low: float
    high: float
    level: float
    resamples: int
    rows: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def paired_bootstrap_ci(a_correct, b_correct, *, resamples: int = RESAMPLES, level: float = LEVEL,
                        seed: int = SEED) -> BootstrapCI:
    """Percentile bootstrap CI of the accuracy difference ``a - b`` on paired per-row outcomes.

    Args:
        a_correct, b_correct: bool or 0/1 arrays ``[N]``, row ``i`` of both is the same test row.
        resamples: bootstrap resamples of the ``N`` rows (with replacement).
        level: coverage of the interval (0.95 -> the 2.5th and 97.5th percentiles).
        seed: seeds the resampling; the same inputs and seed give the same interval.

    Raises:
        ValueError: arrays of different lengths, no rows, or a level outside (0, 1).
    """
    a = np.asarray(a_correct, dtype=np.float64).ravel()
    b = np.asarray(b_correct, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same rows; got {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("no rows to compare")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    diff = a - b
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // diff.size)
    means = np.empty(resamples)
    for start in range(0, resamples, per_chunk):
        n = min(per_chunk, resamples - start)
        means[start:start + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapCI(float(diff.mean()), float(low), float(high), level, resamples, int(diff.size))


def verdict(ci: BootstrapCI) -> str:
    """One plain sentence on what the interval says."""
    pct = f"{ci.level:.0%}"
    if ci.low > 0.0:
        return f"the winner is better: the {pct} CI excludes 0"
    if ci.high < 0.0:
        return f"the control is better: the {pct} CI excludes 0"
    return f"not distinguishable: the {pct} CI contains 0"


def predict_test(checkpoint_dir: str, *, batch_size: int = 256) -> RowPredictions:
    """Load a training checkpoint (weights + its ``config.yaml``) and predict the dataset's test split (read from the
    decoded-input cache when the sweep built one, as its trials did).

    Rows that cannot be decoded for this model are left out (they are skipped, not counted wrong).

    Raises:
        UserError: the checkpoint's config or dataset cannot be read, or the dataset has no test rows.
    """
    loaded = load_trained(checkpoint_dir)
    config = loaded.config
    info = read_dataset_info(config.data.path)
    if "test" not in info.splits or info.split_rows("test") == 0:
        raise UserError(f"{config.data.path}: no test rows to compare models on")
    data = config.data.model_copy(update={"on_bad_record": "skip"})
    rows = RowPredictions()
    batches = eval_batches(data, info, "test", batch_size=batch_size, with_ids=True, tokenizer=loaded.tokenizer)
    evaluate_model(loaded.model, batches,
                   tasks=job_tasks(loaded.labels), modalities=config.data.modalities, device=loaded.device,
                   precision=config.train.precision, prefix="test", rows=rows)
    return rows


@dataclass
class Comparison:
    """The winner against one control on the test rows both could read."""

    winner_accuracy: float
    control_accuracy: float
    ci: BootstrapCI

    @property
    def verdict(self) -> str:
        return verdict(self.ci)


def compare(winner: RowPredictions, control: RowPredictions, *, resamples: int = RESAMPLES,
            seed: int = SEED) -> Comparison:
    """Pair the two models' test outcomes by row id and bootstrap the accuracy difference.

    Raises:
        UserError: the two models share no decodable test row (e.g. trained on different datasets).
    """
    ids = sorted(set(winner.predicted) & set(control.predicted))
    if not ids:
        raise UserError("the two models share no test row; were they trained on different datasets?")
    w = np.array([winner.predicted[i] == winner.label[i] for i in ids])
    c = np.array([control.predicted[i] == control.label[i] for i in ids])
    return Comparison(float(w.mean()), float(c.mean()), paired_bootstrap_ci(w, c, resamples=resamples, seed=seed))
