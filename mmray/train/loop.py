"""The per-worker training loop. Read it top to bottom: set-up, then one epoch = train, evaluate, report.

Plain PyTorch: everything that depends on where it runs (Ray Train workers or one local process)
comes in through a :class:`~mmray.train.context.WorkerContext`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from mmray import storage as store
from mmray.config import JobConfig
from mmray.config.errors import RunError
from mmray.config.schema import LRScheduleConfig, OptimizerConfig
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info
from mmray.data.decode import ROW_KEY
from mmray.data.tokenizer import TextTokenizer
from mmray.models.builder import build_job_model, job_tasks
from mmray.models.cached import check_cached_encoders, encoder_hashes
from mmray.models.lora import base_hash
from mmray.seeding import seed_everything
from mmray.train.checkpoint import (
    StorageFullError,
    TrainState,
    checkpoint_name,
    is_storage_full,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from mmray.train.context import LoopInputs, WorkerContext
from mmray.train.device import DeviceMonitor, batch_to_device, channels_last_encoders, maybe_compile, to_channels_last
from mmray.train.evaluation import autocast_dtype, evaluate_model, task_losses
from mmray.train.objectives import in_pretraining, step_losses
from mmray.train.outputs import EpochOutputs
from mmray.train.sharding import is_sharded, local_parameters, shard_model, shares_line

PROGRESS_EVERY_S = 1.0
# Batches between checks that the training loss is finite. A check reads one number from the device
# (a sync) and, with several workers, gathers it from all of them so that every rank stops at the same
# batch; the first non-finite batch is recorded exactly on the device in between, without a sync.
FINITE_CHECK_EVERY = 10
# train_epoch's account of the rows it saw (the batches' row_key, summed over workers): not a metric, it goes
# to the epoch_end event as rows_seen = {"rows": n, "sum": sum of their keys}, for checks that every row of
# the split was seen once (:func:`mmray.data.decode.row_keys`).
ROW_DIGEST = "rows_seen"


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite: the run stops before that epoch is evaluated, checkpointed
    or exported. Raised on every rank at the same batch."""

    def __init__(self, epoch: int, step: int, value: float, lr: float, precision: str):
        self.epoch, self.step, self.value, self.lr, self.precision = epoch, step, value, lr, precision
        super().__init__(
            f"training loss became {value} at epoch {epoch}, step {step}; stopped before evaluating, "
            f"checkpointing or exporting that epoch. Usual causes: a learning rate too high (lr {lr:g}, "
            f"train.optimizer.lr), half precision overflowing (train.precision {precision}: try bf16 or fp32), "
            "no train.grad_clip, or non-finite values in the data. The run keeps the checkpoints of the epochs "
            "before; fix the cause and train under a new --name")

    def __reduce__(self):  # pickles across Ray workers
        return (type(self), (self.epoch, self.step, self.value, self.lr, self.precision))


@dataclass
class ParamGroup:
    """Parameters that share a learning-rate multiplier and a frozen-until epoch."""

    name: str
    params: list
    lr_mult: float = 1.0
    frozen_epochs: int = 0  # trained from this epoch on (0 = from the start)


def param_groups(model: nn.Module, config: JobConfig) -> list[ParamGroup]:
    """One group per encoder (its ``lr_mult``, ``freeze``, ``unfreeze_after_epochs``) and one for the rest.

    An encoder frozen for the whole run gets ``requires_grad=False`` (no backward through it at all);
    one frozen for some epochs keeps its gradients and gets a zero learning rate until then. With contrastive
    pre-training the fusion and heads are frozen that way for ``train.contrastive.pretrain_epochs``, and the
    contrastive projections form a group of their own.
    """
    inner = unwrap(model)
    groups, seen = [], set()
    never_trained = permanently_frozen(config)
    for modality, encoder in getattr(inner, "encoders", {}).items():
        cfg = getattr(config.model.encoders, modality)
        params = list(encoder.parameters())
        seen |= {id(p) for p in params}
        if modality in never_trained:
            for p in params:
                p.requires_grad_(False)
            continue
        groups.append(ParamGroup(f"encoders.{modality}", params, cfg.lr_mult,
                                 cfg.unfreeze_after_epochs if cfg.freeze else 0))
    contrastive = getattr(inner, "contrastive", None)
    if contrastive is not None:
        params = list(contrastive.parameters())
        seen |= {id(p) for p in params}
        groups.append(ParamGroup("contrastive", params))
    groups.append(ParamGroup("fusion_and_heads", [p for p in inner.parameters() if id(p) not in seen],
                             frozen_epochs=config.train.contrastive.pretrain_epochs))
    return groups


def permanently_frozen(config: JobConfig) -> list[str]:
    """Modalities whose encoder never trains in this run (``freeze: true`` and no ``unfreeze_after_epochs``)."""
    encoders = [(m, getattr(config.model.encoders, m)) for m in config.data.modalities]
    return [m for m, enc in encoders if enc.freeze and enc.unfreeze_after_epochs is None]


def lora_encoders(config: JobConfig) -> list[str]:
    """Modalities whose encoder trains through LoRA adapters (``lora`` set, not permanently frozen)."""
    never = permanently_frozen(config)
    return [m for m in config.data.modalities
            if getattr(getattr(config.model.encoders, m), "lora", None) is not None and m not in never]


def frozen_encoders(config: JobConfig, epoch: int) -> list[str]:
    """Modalities whose encoder does not train in ``epoch`` (1-based); they run in eval mode."""
    out = []
    for modality in config.data.modalities:
        cfg = getattr(config.model.encoders, modality)
        if cfg.freeze and (cfg.unfreeze_after_epochs is None or epoch <= cfg.unfreeze_after_epochs):
            out.append(modality)
    return out


def make_optimizer(cfg: OptimizerConfig, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D tensors): decaying them only hurts.
    torch_groups = []
    for g in groups:
        trainable = [p for p in g.params if p.requires_grad]
        for decay in (True, False):
            ps = [p for p in trainable if (p.ndim > 1) == decay]
            if ps:
                torch_groups.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                                     "lr": cfg.lr * g.lr_mult, "name": g.name})
    fused = fusable([p for g in torch_groups for p in g["params"]])
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(torch_groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused optimizer kernels can step ``params``: one kernel over all of a group's tensors instead
    of a Python loop over them (on CPU, torch's own default is that loop; fused steps take a third of its time for
    the zoo's small models, ``benchmarks/RESULTS.md``). Plain floating-point tensors on CPU or CUDA only: not the
    DTensor shards of a sharded model."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless something imported it
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point()
        and not (dtensor is not None and isinstance(p, dtensor.DTensor)) for p in params)


def make_scheduler(optimizer, cfg: LRScheduleConfig, total_steps: int, *, groups: list[ParamGroup] | None = None,
                   steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine/linear/constant, per optimizer group; a group of an encoder that is still
    frozen (``unfreeze_after_epochs``) has factor 0 until its epoch comes."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def shape(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        curve = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * curve

    frozen_until = {g.name: g.frozen_epochs * steps_per_epoch for g in groups or []}

    def for_group(name: str):
        return lambda step: 0.0 if step < frozen_until.get(name, 0) else shape(step)

    # base lrs already carry each group's lr_mult; the factor is the shared schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(g.get("name", "")) for g in optimizer.param_groups])


def drop_modalities(batch: dict[str, Any], modalities: tuple[str, ...], p: float) -> None:
    """Hide each present modality of each row with probability ``p``, in place, never all of a row's."""
    present = torch.stack([batch[f"{m}_present"] for m in modalities], dim=1)  # [B, M]
    keep = present & (torch.rand(present.shape, device=present.device) >= p)
    lost_all = present.any(dim=1) & ~keep.any(dim=1)
    keep[lost_all] = present[lost_all]  # a row keeps what it had rather than nothing
    for i, m in enumerate(modalities):
        batch[f"{m}_present"] = keep[:, i]


def train_epoch(model, batches: Iterable, *, optimizer, scheduler, scaler, config: JobConfig, ctx: WorkerContext,
                state: TrainState, epoch: int, expected_rows: int, channels_last: bool = False,
                from_cache: bool = False) -> dict[str, float]:
    """One epoch of training on ``batches``; ``from_cache``: they are the embedding cache's (no encoder runs)."""
    model.train()
    for modality in frozen_encoders(config, epoch):  # fixed features: no dropout, no batch-norm updates
        unwrap(model).encoders[modality].eval()
    accum, amp = config.train.grad_accum_steps, autocast_dtype(config.train.precision, ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    # contrastive / adversarial loss * rows; the same keys on every rank (the all-reduce below must match)
    extra_sums = {name: torch.zeros((), device=ctx.device) for name in _extra_losses(config, epoch)}
    rows = torch.zeros((), device=ctx.device)
    bad = torch.zeros((), device=ctx.device)
    keyed = torch.zeros(2, dtype=torch.int64, device=ctx.device)  # sum of the rows' row_key, rows that had one
    start = last_progress = time.perf_counter()
    pending = 0  # micro-batches whose gradients are not yet applied
    # Encoders frozen for now (unfreeze_after_epochs) still get gradients (DDP needs every registered weight to);
    # they are dropped before each step, so neither clipping nor the optimizer's moments see them.
    held = [p for m in frozen_encoders(config, epoch) for p in unwrap(model).encoders[m].parameters() if p.requires_grad]
    first_bad = torch.tensor([math.inf, 0.0], device=ctx.device)  # [batch, loss] of the first non-finite loss
    for step, batch in enumerate(batches, start=1):
        batch = batch_to_device(batch, ctx.device, channels_last=channels_last)
        if config.train.modality_dropout > 0:
            drop_modalities(batch, config.data.modalities, config.train.modality_dropout)
        pending += 1
        sync = pending == accum
        # Skip DDP's gradient all-reduce on micro-batches that only accumulate (a sharded model reduce-scatters
        # every micro-batch's gradients into its shards: they are averaged across workers as they accumulate).
        no_sync = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with no_sync, torch.autocast(ctx.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            supervised = functools.partial(task_losses, batch=batch, label_smoothing=config.train.label_smoothing,
                                           weights=config.train.task_weights)
            parts = step_losses(model, model(batch), batch, supervised, config, epoch, ctx)
            total = parts["total"]
            if held and from_cache:
                # Cached embeddings: the encoders waiting to unfreeze did not run, but DDP expects a gradient
                # for every weight it registered. Zero ones, dropped before the step like the rest of `held`.
                total = total + 0.0 * sum(p.reshape(-1)[0] for p in held)
            scaler.scale(total / accum).backward()
            loss = parts["supervised"]
        seen = torch.stack([torch.tensor(float(step), device=ctx.device), total.detach().float()])
        first_bad = torch.where(torch.isfinite(total.detach()) | (first_bad[0] < step), first_bad, seen)
        if step % FINITE_CHECK_EVERY == 0:
            _stop_if_not_finite(first_bad, ctx, epoch, optimizer, config)
        if sync:
            _optimizer_step(model, optimizer, scheduler, scaler, config, held)
            state.global_step += 1
            pending = 0
        n_valid = batch["valid"].sum()
        loss_sum += loss.detach() * n_valid
        for name in extra_sums:
            extra_sums[name] += parts[name].detach().float() * n_valid
        rows += n_valid
        bad += (~batch["valid"]).sum()
        if ROW_KEY in batch:  # the Ray Data pipeline's batches: which rows this epoch saw, order-free
            keyed += torch.stack([batch[ROW_KEY].sum(), torch.tensor(batch[ROW_KEY].numel(), device=ctx.device)])
        if ctx.rank == 0 and time.perf_counter() - last_progress > PROGRESS_EVERY_S:
            last_progress = time.perf_counter()
            # .item() syncs with the GPU: only once a second, for the person watching.
            ctx.progress({"type": "step", "epoch": epoch, "rows": int(rows.item()) * ctx.world_size,
                          "rows_total": expected_rows, "loss": (loss_sum / rows.clamp(min=1)).item()})
    _stop_if_not_finite(first_bad, ctx, epoch, optimizer, config)  # every rank, at the same point
    if pending:  # a partial accumulation at the end of the epoch: average it in by hand across workers
        for p in model.parameters() if not is_sharded(model) else ():  # sharded: averaged already
            if p.grad is not None:
                p.grad.copy_(ctx.all_reduce(p.grad) / ctx.world_size)
        _optimizer_step(model, optimizer, scheduler, scaler, config, held)
        state.global_step += 1
    elapsed = time.perf_counter() - start
    extras = sorted(extra_sums)
    totals = ctx.all_reduce(torch.stack([loss_sum, rows, bad, *[extra_sums[k] for k in extras]]).float())
    seconds = ctx.all_reduce(torch.tensor([elapsed], device=ctx.device)).item() / ctx.world_size
    out = {"train.loss": (totals[0] / totals[1].clamp(min=1)).item(), "train.rows": totals[1].item(),
           "train.bad_records": totals[2].item(), "train.samples_per_s": totals[1].item() / max(seconds, 1e-9),
           "train.epoch_s": seconds}
    for i, name in enumerate(extras):  # train.contrastive_loss, train.adversarial_loss
        out[f"train.{name}_loss"] = (totals[3 + i] / totals[1].clamp(min=1)).item()
    keys, keyed_rows = ctx.all_reduce(keyed).tolist()  # exact: int64
    if keyed_rows:
        out[ROW_DIGEST] = {"rows": keyed_rows, "sum": keys}
    return out


def _stop_if_not_finite(first_bad: torch.Tensor, ctx: WorkerContext, epoch: int, optimizer, config: JobConfig) -> None:
    """Raise :class:`NonFiniteLossError` on every rank when any rank has seen a non-finite loss (the earliest
    batch across ranks is named). Every rank must call this at the same batches."""
    step, value = min((tuple(t.tolist()) for t in ctx.all_gather(first_bad)), key=lambda t: t[0])
    if math.isfinite(step):
        raise NonFiniteLossError(epoch, int(step), value, optimizer.param_groups[-1]["lr"], config.train.precision)


def _extra_losses(config: JobConfig, epoch: int) -> list[str]:
    """The auxiliary losses a step of ``epoch`` computes (see :func:`mmray.train.objectives.step_losses`)."""
    names = ["contrastive"] if config.train.contrastive.enabled else []
    if config.train.adversarial.method != "none" and not in_pretraining(config, epoch):
        names.append("adversarial")
    return names


def _optimizer_step(model, optimizer, scheduler, scaler, config: JobConfig, held=()) -> None:
    for p in held:  # frozen for now: no update, no Adam moments, no share of the clipped norm
        p.grad = None
    if config.train.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def device_figures(mine: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    """This worker's :class:`~mmray.train.device.DeviceMonitor` figures averaged over the workers
    (every worker calls this: the all-reduce needs the same shape everywhere). {} on CPU."""
    if ctx.device.type != "cuda":
        return {}
    keys = ("gpu.memory_peak_gb", "gpu.memory_reserved_peak_gb", "gpu.memory_total_gb")
    util = mine.get("gpu.utilization")
    local = [mine.get(k, 0.0) for k in keys] + [util or 0.0, float(util is not None)]
    total = ctx.all_reduce(torch.tensor(local, device=ctx.device, dtype=torch.float64)).tolist()
    out = {k: total[i] / ctx.world_size for i, k in enumerate(keys)}
    if total[-1] > 0:  # workers that could read NVML
        out["gpu.utilization"] = total[-2] / total[-1]
    return out


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _checkpoint_record_report(ctx: WorkerContext, epoch: int, scalars: dict[str, float], state: TrainState,
                              outputs: EpochOutputs | None, save, sharded: bool = False) -> None:
    """End ``epoch``: rank 0 writes its checkpoint (``save(path)``) and makes it durable (``ctx.keep``), then
    writes the epoch's record (``metrics.jsonl``, TensorBoard), then every rank reports. ``sharded``: every
    rank writes its shards of the checkpoint and reports them (the folders are merged into one).

    The order is the guarantee: a recorded epoch always has its checkpoint where ``keep`` stores it, so a run
    or trial killed right after the record resumes past it and never trains it again; and the record comes
    before report, inside which a scheduler may stop a trial for good. A full disk is :class:`StorageFullError`.
    Where ``report`` stores the checkpoint, a large one may still be uploading when the next epoch starts
    (``checkpoint.async_upload_mb``): a kill before it is stored resumes from the one before and trains that
    epoch again, and its record is rewritten from the checkpointed history (each epoch once)."""
    scratch = tempfile.mkdtemp(prefix="mmray-ckpt-") if ctx.rank == 0 or sharded else None
    try:
        ckpt = kept = None
        if scratch is not None:  # one copy of the checkpoint, from rank 0 (Ray merges multi-rank folders)
            with _storage_full_at(ctx, epoch, resume_epoch=epoch - 1):
                ckpt = save(os.path.join(scratch, checkpoint_name(epoch)))
                kept = ctx.keep(ckpt) if ctx.rank == 0 else None
        if outputs is not None:
            outputs.write(epoch, scalars, state.history)
        with _storage_full_at(ctx, epoch, resume_epoch=epoch if kept else epoch - 1, partial=not kept):
            ctx.report(scalars, ckpt)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _report_again(ctx: WorkerContext, state: TrainState, resume_from: str) -> None:
    """Report the last epoch of a finished run or trial once more: its record and checkpoint were written, but
    a kill came before Ray or Tune recorded that report. Sent from a copy: Ray copies what is reported into
    the run folder, where ``resume_from`` may already be."""
    scratch = tempfile.mkdtemp(prefix="mmray-ckpt-") if ctx.rank == 0 else None
    try:
        again = shutil.copytree(resume_from, os.path.join(scratch, checkpoint_name(state.epoch))) \
            if scratch is not None else None
        ctx.report(state.history[-1], again)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _storage_full_at(ctx: WorkerContext, epoch: int, *, resume_epoch: int, partial: bool = True):
    """Turn a full disk while ``epoch``'s checkpoint is written into :class:`StorageFullError` (one line),
    first removing that epoch's partial checkpoint from the run folder (``partial``) so nothing half-written
    is ever resumed from or exported."""
    try:
        yield
    except Exception as e:
        if not is_storage_full(e):
            raise
        target = store.join(ctx.run_dir, checkpoint_name(epoch)) if ctx.run_dir else ""
        if partial and target:
            with contextlib.suppress(Exception):
                store.remove(target)
        raise StorageFullError(getattr(e, "filename", None) or target or "the checkpoint folder", epoch,
                               resume_epoch) from e


def _wrap(model: nn.Module, config: JobConfig, ctx: WorkerContext) -> nn.Module:
    """``scaling.strategy``: ``ddp`` = the context's wrap (DDP on Ray Train workers); ``fsdp`` = sharded
    (:func:`mmray.train.sharding.shard_model`), with one run-log line on how the parameters are spread."""
    if config.scaling.strategy != "fsdp":
        return ctx.prepare_model(model)
    model = shard_model(model, config.train.precision, ctx.device)
    held, total = local_parameters(model)
    counts = ctx.all_gather(torch.tensor([held], dtype=torch.float64, device=ctx.device))
    ctx.progress({"type": "sharding", "line": shares_line([int(c.item()) for c in counts], total)})
    return model


def train_loop(config: JobConfig, ctx: WorkerContext, inputs: LoopInputs | None = None) -> TrainState:
    """Train ``config`` on this worker until ``train.epochs`` or early stopping; report every epoch.

    ``inputs``: what the run was planned to read (the embedding cache); default none of it.
    Returns the final :class:`TrainState` (history of every epoch's metrics, best epoch).
    """
    inputs = inputs or LoopInputs()
    info: DatasetInfo = read_dataset_info(config.data.path)
    seed_everything(config.train.seed + ctx.rank)
    tasks = job_tasks(info.tasks)
    tokenizer = TextTokenizer.for_job(config.data, info)
    model = build_job_model(config, tasks, tokenizer)
    # Rank 0's permanently frozen encoders (DDP copies them to every rank): checkpoints leave them out and
    # record these hashes; the embedding cache's batches must come from exactly these weights.
    cached = dict(inputs.cached_encoders)
    hashes = encoder_hashes(model, sorted(set(permanently_frozen(config)) | set(cached))) if ctx.rank == 0 else {}
    # Every rank names them (each leaves them out of its shards of a sharded checkpoint); rank 0 hashes them.
    frozen = {m: hashes.get(m, "") for m in permanently_frozen(config)}
    # LoRA-adapted encoders that train: checkpoints hold their adapters, and the hash of the base weights.
    lora_base = {f"encoders.{m}": base_hash(model.encoders[m]) if ctx.rank == 0 else "" for m in lora_encoders(config)}
    if ctx.rank == 0:
        check_cached_encoders(hashes, cached)
    groups = param_groups(model, config)  # before DDP: it must not register permanently frozen weights
    nhwc = channels_last_encoders(config, model.encoders)
    to_channels_last(model.encoders, nhwc)
    channels_last = "image" in nhwc  # image batches follow their encoder's layout
    model = maybe_compile(_wrap(model, config, ctx), config)  # compile the DDP wrapper: it splits at buckets
    if is_sharded(model):  # sharding replaced every parameter by its shard: group those
        groups = param_groups(model, config)
    monitor = DeviceMonitor(ctx.device)
    optimizer = make_optimizer(config.train.optimizer, groups)
    rows_per_worker = info.splits["train"].rows // ctx.world_size
    steps_per_epoch = max(1, math.ceil(math.ceil(rows_per_worker / config.train.batch_size) / config.train.grad_accum_steps))
    scheduler = make_scheduler(optimizer, config.train.lr_schedule, steps_per_epoch * config.train.epochs,
                               groups=groups, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=autocast_dtype(config.train.precision, ctx.device) == torch.float16)

    state = TrainState()
    patience = config.train.early_stopping.patience
    with ctx.resume_checkpoint() as resume_from:  # a temporary local copy lives for this block only
        if resume_from:
            state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, verify=ctx.rank == 0,
                                    hashes={f"encoders.{m}": d for m, d in frozen.items()} | lora_base)
            ctx.progress({"type": "resumed", "epoch": state.epoch, "path": resume_from})
            if state.epoch >= config.train.epochs or (patience is not None
                                                      and state.epochs_without_improvement >= patience):
                _report_again(ctx, state, resume_from)  # finished: nothing is trained again
                return state

    def save(path: str) -> str:  # this epoch's checkpoint; frozen encoders are left out, named with their hashes
        return save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               state=state, config=config, frozen={f"encoders.{m}": d for m, d in frozen.items()},
                               lora_base=lora_base)

    outputs = EpochOutputs(ctx.run_dir, first_epoch=state.epoch + 1) if ctx.rank == 0 else None
    try:
        metric, mode = config.train.metric, config.train.mode
        for epoch in range(state.epoch + 1, config.train.epochs + 1):
            pretraining = in_pretraining(config, epoch)
            phase = "contrastive pretraining" if pretraining else "supervised"
            ctx.progress({"type": "epoch_start", "epoch": epoch, "epochs": config.train.epochs, "phase": phase})
            metrics: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[-1]["lr"]}
            if config.train.contrastive.pretrain_epochs:  # TensorBoard: train/contrastive_pretraining 1, then 0
                metrics["train.contrastive_pretraining"] = float(pretraining)
            monitor.start()
            metrics |= train_epoch(model, ctx.train_batches(epoch), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   config=config, ctx=ctx, state=state, epoch=epoch, expected_rows=info.splits["train"].rows,
                                   channels_last=channels_last, from_cache=inputs.from_cache_in(epoch))
            metrics |= evaluate_model(model, ctx.val_batches(epoch), tasks=tasks, modalities=config.data.modalities,
                                      device=ctx.device, precision=config.train.precision, all_reduce=ctx.all_reduce,
                                      channels_last=channels_last)
            metrics |= device_figures(monitor.stop(), ctx)

            if pretraining:
                pass  # untrained heads: not a candidate for the best epoch, and no early-stopping patience spent
            elif improved(metrics[metric], state.best_value, mode, config.train.early_stopping.min_delta):
                state.best_value, state.best_epoch, state.epochs_without_improvement = metrics[metric], epoch, 0
            else:
                state.epochs_without_improvement += 1
            state.epoch = epoch
            seen = metrics.pop(ROW_DIGEST, None)
            scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            scalars["best_epoch"] = float(state.best_epoch or 0)  # 0 while pre-training: no candidate yet
            state.history.append(scalars)

            ending = time.perf_counter()
            _checkpoint_record_report(ctx, epoch, scalars, state, outputs, save, sharded=is_sharded(model))
            # checkpoint_s: how long checkpointing, recording and reporting kept the next epoch waiting
            ctx.progress({"type": "epoch_end", "epoch": epoch, "epochs": config.train.epochs, "metrics": scalars,
                          "metric": metric, "phase": phase, "checkpoint_s": time.perf_counter() - ending,
                          **({"rows_seen": seen} if seen else {})})
            if patience is not None and state.epochs_without_improvement >= patience:
                ctx.progress({"type": "early_stop", "epoch": epoch, "best_epoch": state.best_epoch})
                break
    finally:  # also on failure: a URI run's staging folder is uploaded and deleted
        if outputs is not None:
            outputs.close()
    return state

