"""The sweep's ensemble arm: the top-k trials' best checkpoints as one ensemble export, against the single winner.

With ``ensemble: K`` in the space (``--ensemble K``), when the sweep ends:

- ``best-single/``: the winner's export (what ``best/`` is without an ensemble);
- ``best-ensemble/``: the top K trials' best checkpoints, their probabilities averaged
  (:mod:`mmray.export.ensemble`);
- ``best/``: a copy of the one with the better validation score (ties: the single model, smaller and faster);
- ``ensemble-arm.json`` in the experiment: both validation scores, which one ``best/`` is, and the paired bootstrap CI
  of their test accuracy difference (ensemble - single), which the summary and report show.

The choice is made on validation, never on test: the test CI only says whether the difference holds up.
No Ray: the members are measured and exported in this process.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from mmray import storage as store
from mmray.config import UserError, validate_job
from mmray.config.loader import apply_overrides
from mmray.data.dataset_dir import read_dataset_info
from mmray.export.ensemble import write_ensemble
from mmray.export.evaluate import evaluate, split_batches
from mmray.export.loader import load_model
from mmray.export.writer import EXPORT_METRICS_FILE
from mmray.train.evaluation import RowPredictions
from mmray.train.finalize import export_checkpoint, supervised_best
from mmray.tune.control_arms import compare
from mmray.tune.experiment import BEST_DIR, ENSEMBLE_ARM_FILE
from mmray.tune.finalists import pick

SINGLE_DIR, ENSEMBLE_DIR = "best-single", "best-ensemble"


def _split_metrics(split: str, measured: dict[str, Any]) -> dict[str, Any]:
    """``evaluate``'s result as a single export's ``metrics.json`` holds it (``val.accuracy``, ...)."""
    out = {f"{split}.{k}": measured[k] for k in ("loss", "rows", "accuracy", "precision", "recall", "f1", "confusion")
           if k in measured}
    return out | {f"{split}.bad_records": measured.get("skipped", 0)}


def test_rows(export_dir: str, data_dir: str):
    """An export's prediction for every decodable test row (the rows the control arms' CI pairs)."""
    import torch


    predictor = load_model(export_dir)
    out = RowPredictions()
    for batch in split_batches(predictor, data_dir, "test", 256):
        predicted = predictor.predict_batch(batch).argmax(dim=-1)
        for i, row_id in enumerate(batch["id"]):
            if bool(torch.as_tensor(batch["valid"][i])):
                out.predicted[row_id] = int(predicted[i])
                out.label[row_id] = int(batch["label"][i])
    return out


def ensemble_arm(setup, trials: list, single_metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``best-single/``, ``best-ensemble/`` and choose ``best/`` (see the module docstring); returns what
    ``ensemble.json`` records, or None when there is no ensemble to make (fewer than two scored trials, or an
    experiment in object storage)."""

    space, exp = setup.space, setup.experiment_dir
    members = [t for t in pick(trials, space.ensemble) if t.best_checkpoint]
    if len(members) < 2 or store.is_uri(exp):
        return None
    metric = space.metric
    staging = os.path.join(exp, ".ensemble-members")
    shutil.rmtree(staging, ignore_errors=True)
    member_dirs = []
    for i, t in enumerate(members):
        config = validate_job(apply_overrides(setup.job_raw, t.params.items()))
        out = os.path.join(staging, str(i))
        export_checkpoint(config, read_dataset_info(config.data.path), supervised_best(config, t.best_checkpoint), out)
        member_dirs.append(out)
    best, single, ens = (os.path.join(exp, d) for d in (BEST_DIR, SINGLE_DIR, ENSEMBLE_DIR))
    config = validate_job(apply_overrides(setup.job_raw, members[0].params.items()))
    data = config.data.path
    try:
        ensemble_val = evaluate(write_ensemble(ens, member_dirs, sources=[t.trial_id for t in members]), data,
                                split="val", diagnostics=False)
    except UserError as e:  # members that read their inputs differently (a space that sweeps data.*)
        print(f"mmray: no ensemble export: {e}", flush=True)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if os.path.isdir(single):
        shutil.rmtree(single)
    shutil.copytree(best, single)
    single_val = float(single_metrics.get("val.accuracy", 0.0))
    key = "accuracy"
    ens_score = float(ensemble_val[key])
    chosen = "ensemble" if ens_score > single_val else "single"
    record: dict[str, Any] = {
        "members": [t.trial_id for t in members], "metric": f"val.{key}",
        "val": {"ensemble": ens_score, "single": single_val}, "chosen": chosen, "ranked_by": metric,
    }
    metrics = _split_metrics("val", ensemble_val)
    if "test" in read_dataset_info(data).splits:
        metrics |= _split_metrics("test", evaluate(ens, data, split="test", diagnostics=False))
        c = compare(test_rows(ens, data), test_rows(single, data))
        record["test"] = {"ensemble": c.winner_accuracy, "single": c.control_accuracy,
                          "difference": c.ci.difference, "low": c.ci.low, "high": c.ci.high, "level": c.ci.level,
                          "rows": c.ci.rows, "verdict": c.verdict.replace("the winner", "the ensemble")
                          .replace("the control", "the single winner")}
    with open(os.path.join(ens, EXPORT_METRICS_FILE), "w") as f:  # what best/ shows, whichever it is
        f.write(json.dumps(metrics, indent=2) + "\n")
    if chosen == "ensemble":
        shutil.rmtree(best)
        shutil.copytree(ens, best)
    with open(os.path.join(exp, ENSEMBLE_ARM_FILE), "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    return record


def read_arm(experiment_dir: str) -> dict[str, Any] | None:

    path = os.path.join(experiment_dir, ENSEMBLE_ARM_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def arm_lines(record: dict[str, Any] | None) -> list[str]:
    """The ensemble-vs-single lines of the summary and the report."""
    if not record:
        return []
    v = record["val"]
    lines = [f"the top {len(record['members'])} trials' probabilities averaged ({', '.join(record['members'])}): "
             f"val accuracy {v['ensemble']:.4f} vs the single winner's {v['single']:.4f}; "
             f"best/ is the {'ensemble' if record['chosen'] == 'ensemble' else 'single winner'} "
             f"({ENSEMBLE_DIR}/ and {SINGLE_DIR}/ are both kept)"]
    t = record.get("test")
    if t:
        lines.append(f"test accuracy {t['ensemble']:.4f} vs {t['single']:.4f}, difference {t['difference']:+.4f}, "
                     f"{t['level']:.0%} CI [{t['low']:+.4f}, {t['high']:+.4f}] over {t['rows']} rows: {t['verdict']}")
    return lines
