"""After training: evaluate the best checkpoint on val and test, and write the model export. No Ray."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from mmray import storage as store
from mmray.config import JobConfig
from mmray.data.cache import CachePlan, iter_cached_batches, plan
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.decoded import DecodePlan, iter_decoded_batches
from mmray.data.decoded import plan as decode_plan
from mmray.data.reader import iter_batches
from mmray.export import write_export
from mmray.export.loader import load_trained
from mmray.models.builder import job_tasks
from mmray.models.cached import check_cached_encoders, encoder_hashes
from mmray.train.checkpoint import checkpoint_epoch, kept_checkpoints, left_out, read_train_state
from mmray.train.evaluation import evaluate_model, modality_ablations

EVAL_BATCH_SIZE = 256
MEASURE_EVERY_S = 1.0  # between "measure" progress events (a bar on a terminal; a line every 10 s elsewhere)


def best_kept(kept: dict[int, str], metric: str, mode: str) -> str | None:
    """The kept checkpoint whose epoch scored best on ``metric``, by the history in the latest one (which
    holds every epoch's metrics); ``None`` when nothing kept was scored."""
    if not kept:
        return None
    history = read_train_state(kept[max(kept)])["history"]
    sign = 1.0 if mode == "max" else -1.0
    scored = [m for m in history if int(m["epoch"]) in kept and metric in m]
    return kept[int(max(scored, key=lambda m: sign * m[metric])["epoch"])] if scored else None


def supervised_best(config: JobConfig, best_checkpoint: str) -> str:
    """``best_checkpoint`` unless it is a contrastive pre-training epoch (untrained heads), which Ray may rank
    first when no later epoch scored better; then the best kept checkpoint of a supervised epoch.

    The run's latest checkpoint is always kept and always supervised (pre-training ends before train.epochs),
    and its history holds every epoch's metrics. Paths may be local or URIs.
    """
    pretrain = config.train.contrastive.pretrain_epochs
    if pretrain == 0 or checkpoint_epoch(best_checkpoint) > pretrain:
        return best_checkpoint
    kept = {epoch: path for epoch, path in kept_checkpoints(store.split(best_checkpoint)[0]).items()
            if epoch > pretrain}
    if not kept:
        return best_checkpoint
    return best_kept(kept, config.train.metric, config.train.mode) or kept[max(kept)]


def evaluate_splits(model, config: JobConfig, info: DatasetInfo, tasks: dict[str, int], splits=("val", "test"),
                    verified: dict[str, str] | None = None, cache: CachePlan | None = None,
                    decoded: DecodePlan | None = None, on_event: Callable[[dict], None] | None = None,
                    epoch: int | None = None):
    """``{split}.{metric}`` for each split present in the dataset, with the same code the loop uses, plus the
    modality diagnostics ``{split}.diagnostics.{without_<m>|only_<m>}.{accuracy|f1}``.

    When the run trained from the embedding cache, the splits are read from it too (the model's logits from
    cached encoder outputs equal those from raw inputs; the encoders are checked against the cache's hashes),
    so measuring the best epoch does not run every frozen encoder over val and test seven times.
    ``verified``: modality -> weights hash already checked for ``model`` (a slim checkpoint's), not hashed again.
    ``cache``: the run's embedding-cache plan (:func:`mmray.data.cache.plan`); looked up when not given.
    Otherwise the splits are read from the decoded-input cache when there is one (``decoded``: the run's
    :func:`mmray.data.decoded.plan`; looked up when not given), else decoded from the shards.
    ``on_event``: gets a ``measure_start`` event (``epoch``, the splits' rows, passes over each row) and ``measure``
    events (``split``, rows done of ``rows_total``) at most every :data:`MEASURE_EVERY_S` while it runs: on 20k+
    rows this takes minutes, the model running once per row plus twice per modality for the diagnostics.
    """
    batches = _eval_batches(model, config, info, verified or {}, cache or plan(config, info, build=False), decoded)
    present = [s for s in splits if s in info.splits and info.split_rows(s) > 0]
    emit = on_event or (lambda event: None)
    emit({"type": "measure_start", "epoch": epoch, "rows": {s: info.split_rows(s) for s in present},
          "passes": 1 + len(modality_ablations(config.data.modalities))})
    metrics: dict[str, Any] = {}
    for split in present:
        counted = _counted(batches(split), emit, split, info.split_rows(split))
        metrics |= evaluate_model(model, counted, tasks=tasks, modalities=config.data.modalities,
                                  precision=config.train.precision, prefix=split, diagnostics=True)
    return metrics


def _counted(batches: Iterable[dict], emit: Callable[[dict], None], split: str, total: int) -> Iterator[dict]:
    """``batches``, emitting a ``measure`` event of the rows handed out so far at most every
    :data:`MEASURE_EVERY_S`, and one when the split is done."""
    rows, last = 0, time.perf_counter()
    for batch in batches:
        yield batch
        rows += len(batch["valid"])
        if time.perf_counter() - last >= MEASURE_EVERY_S:
            last = time.perf_counter()
            emit({"type": "measure", "split": split, "rows": rows, "rows_total": total})
    emit({"type": "measure", "split": split, "rows": rows, "rows_total": total, "done": True})


def _eval_batches(model, config: JobConfig, info: DatasetInfo, verified: dict[str, str], cache: CachePlan,
                  decoded: DecodePlan | None):
    """``split -> batches``: from the embedding cache when this job trains from it, else from the decoded-input
    cache when there is one, else decoded from the shards."""
    usable = cache.used and not cache.partial  # encoders that unfroze have moved on from the cached outputs
    if usable:
        unknown = [m for m in cache.weights if m not in verified]
        check_cached_encoders(verified | encoder_hashes(model, unknown), cache.weights)
    if decoded is None:
        decoded = decode_plan(config, info, build=False, embedding=cache if usable else None)

    def batches(split: str):
        if usable and all(split in e.manifest["splits"] for e in cache.entries.values()):
            return iter_cached_batches(cache.entries, info, split, batch_size=EVAL_BATCH_SIZE, train=False)
        if decoded.used and decoded.entry.has(split):
            return iter_decoded_batches(decoded.entry, config.data, info, split, batch_size=EVAL_BATCH_SIZE,
                                        train=False)
        return iter_batches(config.data, info, split, batch_size=EVAL_BATCH_SIZE, train=False)
    return batches


def write_diagnostics(tensorboard_dir: str, metrics: dict[str, Any], epoch: int, split: str = "val") -> None:
    """The exported epoch's modality diagnostics on ``split`` as TensorBoard scalars at step ``epoch``:
    ``diagnostics/without_<m>/accuracy``, ``diagnostics/only_<m>/f1``, ... (nothing for one modality).

    ``tensorboard_dir`` may be a local path or a URI."""
    prefix = f"{split}.diagnostics."
    found = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    if not found:
        return
    from torch.utils.tensorboard import SummaryWriter

    stage = store.StagedDir(tensorboard_dir)
    try:
        with SummaryWriter(stage.local) as writer:
            for key, value in sorted(found.items()):
                writer.add_scalar("diagnostics/" + key.replace(".", "/"), value, epoch)
    finally:
        stage.close()


def measure_checkpoint(config: JobConfig, info: DatasetInfo, checkpoint_dir: str, cache: CachePlan | None = None,
                       decoded: DecodePlan | None = None, on_event: Callable[[dict], None] | None = None):
    """Load ``checkpoint_dir`` (a local path or a URI) into the job's model and measure it on val and test
    (from the embedding cache of the run's plan ``cache``, or its decoded-input cache ``decoded``, when they
    serve them; looked up when not given).

    Returns ``(model, tokenizer, metrics)``; ``metrics["epoch"]`` is the checkpoint's epoch.
    """
    with store.local_copy(checkpoint_dir) as local:
        loaded = load_trained(local, config=config)  # verifies the frozen encoders it left out
        verified = {name.removeprefix("encoders."): digest for name, digest in left_out(local).items()}
        epoch = checkpoint_epoch(local)
    metrics = evaluate_splits(loaded.model, config, info, job_tasks(loaded.labels), verified=verified, cache=cache,
                              decoded=decoded, on_event=on_event, epoch=epoch)
    return loaded.model, loaded.tokenizer, {"epoch": epoch, **metrics}


def export_checkpoint(config: JobConfig, info: DatasetInfo, checkpoint_dir: str, export_dir: str,
                      tensorboard_dir: str | None = None, cache: CachePlan | None = None,
                      decoded: DecodePlan | None = None, on_event: Callable[[dict], None] | None = None
                      ) -> dict[str, Any]:
    """Load ``checkpoint_dir``, measure it on val and test, and write the export folder; returns its metrics.

    Either folder may be a local path or a URI. With ``tensorboard_dir``, the validation modality
    diagnostics also go there (:func:`write_diagnostics`). ``cache``, ``decoded``: the run's cache plans, as in
    :func:`measure_checkpoint`; ``on_event``: its progress (:func:`evaluate_splits`).
    """
    model, tokenizer, metrics = measure_checkpoint(config, info, checkpoint_dir, cache, decoded, on_event)
    write_export(export_dir, model, config, info, tokenizer, metrics, epoch=metrics["epoch"])
    if tensorboard_dir is not None:
        write_diagnostics(tensorboard_dir, metrics, metrics["epoch"])
    return metrics
