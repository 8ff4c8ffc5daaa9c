"""``scaling.strategy: fsdp`` through the real training loop on two processes (a gloo group, no Ray): an hf_image
ViT with LoRA and activation checkpointing + a checkpointed built-in Transformer, sharded per encoder block.

One group of two processes runs, in turn: a DDP run, an FSDP run, and an FSDP run stopped after epoch 2 then
resumed to epoch 3; then, on a ViT + BERT + wav2vec2 with LoRA on each, sharded by hand, one training step and a
sharded checkpoint next to the gathered weights and the sharded model's own logits. The tests read what the
processes left behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket

import pytest
import torch
from helpers import save_tiny_bert, save_tiny_vision, save_tiny_wav2vec2

from mmray.config import validate_job
from mmray.data.synth import synth

pytestmark = pytest.mark.slow  # four short training runs on two processes
WORLD = 2


def big_job(data: str, models: dict) -> dict:
    """The three Hugging Face encoders, LoRA on each, checkpointing on the image and audio ones, fsdp."""
    lora = {"rank": 2, "alpha": 4}
    return {
        "name": "fsdp-hf", "data": {"path": data},
        "model": {"encoders": {
            "image": {"name": "hf_image", "path": models["vit"], "lora": lora, "gradient_checkpointing": True},
            "text": {"name": "hf_text", "path": models["bert"], "lora": lora},
            "audio": {"name": "hf_audio", "path": models["wav2vec2"], "lora": lora, "gradient_checkpointing": True},
        }, "fusion": {"name": "concat", "hidden_dim": 32, "dropout": 0.0}},
        "scaling": {"num_workers": WORLD, "strategy": "fsdp"},
    }


def job(data: str, vit: str, strategy: str, epochs: int, accum: int = 1) -> dict:
    return {
        "name": f"fsdp-{strategy}", "data": {"path": data, "modalities": ["image", "text"]},
        "model": {"encoders": {
            "image": {"name": "hf_image", "path": vit, "lora": {"rank": 2, "alpha": 4}, "gradient_checkpointing": True},
            "text": {"name": "transformer", "dim": 32, "layers": 2, "heads": 2, "ff_dim": 64, "dropout": 0.0,
                     "gradient_checkpointing": True},
        }, "fusion": {"name": "concat", "hidden_dim": 32, "dropout": 0.0}},
        "train": {"epochs": epochs, "batch_size": 16, "optimizer": {"lr": 5e-3}, "early_stopping": {"patience": None},
                  "grad_accum_steps": accum,
                  "lr_schedule": {"name": "constant", "warmup_ratio": 0.0}},
        "scaling": {"num_workers": WORLD, "strategy": strategy},
    }


class GlooContext:
    """A :class:`~mmray.train.context.WorkerContext` for a process of a gloo group: each rank reads every other
    train batch of the local reader (the same count on every rank) and every other row of each val batch, and the ranks' checkpoint folders are merged into
    ``run_dir`` as Ray Train merges them."""

    def __init__(self, config, run_dir: str, rank: int):
        from mmray.data.reader import split_readers

        self.rank, self.world_size, self.device, self.run_dir = rank, WORLD, torch.device("cpu"), run_dir
        self._train, self._val = split_readers(config)
        self.events: list[dict] = []

    def _mine(self, batches):
        batches = list(batches)
        return batches[self.rank:len(batches) // WORLD * WORLD:WORLD]

    def train_batches(self, epoch):
        return self._mine(self._train(epoch))

    def val_batches(self, epoch):  # every batch, each rank every other row of it (val has few rows)
        for batch in self._val(epoch):
            yield {k: v[self.rank::WORLD] for k, v in batch.items()}

    def prepare_model(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)

    def all_reduce(self, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def all_gather(self, t):
        out = [torch.empty_like(t) for _ in range(WORLD)]
        torch.distributed.all_gather(out, t)
        return out

    def keep(self, checkpoint_dir):
        return None

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            target = os.path.join(self.run_dir, os.path.basename(checkpoint_dir))
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        torch.distributed.barrier()

    @contextlib.contextmanager
    def resume_checkpoint(self):
        from mmray.train.checkpoint import kept_checkpoints

        kept = kept_checkpoints(self.run_dir) if os.path.isdir(self.run_dir) else {}
        yield kept[max(kept)] if kept else None

    def progress(self, event):
        self.events.append(event)


def _worker(rank: int, port: int, root: str, data: str, models: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from mmray.train.loop import train_loop

        out: dict = {}
        # each rank reads 2 batches an epoch: with grad_accum_steps 3 the epoch ends mid-accumulation
        for name, strategy, epochs, accum in (("ddp", "ddp", 3, 1), ("fsdp", "fsdp", 3, 1), ("stopped", "fsdp", 2, 1),
                                              ("stopped", "fsdp", 3, 1), ("ddp-accum", "ddp", 1, 3),
                                              ("fsdp-accum", "fsdp", 1, 3)):
            config = validate_job(job(data, models["vit"], strategy, epochs, accum))
            ctx = GlooContext(config, os.path.join(root, name), rank)
            state = train_loop(config, ctx)
            out[f"{name}-{epochs}"] = {"history": state.history, "events": ctx.events, "batches": len(ctx.train_batches(1))}
        out["gathered"] = _shard_step_save(root, data, models, rank)
        if rank == 0:
            with open(os.path.join(root, "result.json"), "w") as f:
                json.dump(out, f)
    finally:
        torch.distributed.destroy_process_group()


def _shard_step_save(root: str, data: str, models: dict, rank: int) -> dict:
    """One training step of a sharded ViT + BERT + wav2vec2 with LoRA on each, then its sharded checkpoint, its gathered weights
    (``gathered.safetensors``) and its logits on the first val batch (``logits.pt``), from rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_job_model, job_tasks
    from mmray.models.lora import base_hash
    from mmray.train.checkpoint import TrainState, save_checkpoint
    from mmray.train.evaluation import task_losses
    from mmray.train.loop import make_optimizer, make_scheduler, param_groups
    from mmray.train.sharding import shard_model

    config = validate_job(big_job(data, models))
    info = read_dataset_info(data)
    torch.manual_seed(rank)
    model = build_job_model(config, job_tasks(info.tasks), TextTokenizer.for_job(config.data, info))
    lora = {f"encoders.{m}": base_hash(model.encoders[m]) for m in ("audio", "image", "text")}
    param_groups(model, config)
    model = shard_model(model, config.train.precision, torch.device("cpu"))
    groups = param_groups(model, config)
    optimizer = make_optimizer(config.train.optimizer, groups)
    scheduler = make_scheduler(optimizer, config.train.lr_schedule, 10, groups=groups)
    batch = next(iter(iter_batches(config.data, info, "train", batch_size=8, train=False)))
    task_losses(model(batch).logits, batch, 0.0).backward()
    optimizer.step()
    path = os.path.join(root, "sharded", f"rank{rank}")  # each rank its own folder, merged below
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainState(epoch=1), config=config, lora_base=lora)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    val = next(iter(iter_batches(config.data, info, "val", batch_size=8, train=False)))
    model.eval()
    with torch.no_grad():
        logits = model(val).logits["label"]
    torch.distributed.barrier()
    if rank == 0:
        merged = os.path.join(root, "sharded", "checkpoint_epoch_0001")
        for r in range(WORLD):
            shutil.copytree(os.path.join(root, "sharded", f"rank{r}"), merged, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(root, "gathered.safetensors"))
        torch.save(logits, os.path.join(root, "logits.pt"))
    return {"files": sorted(os.listdir(path))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = str(root / "synth")
    synth(data, rows=96, shards=1, seed=5)
    models = {"vit": save_tiny_vision(root / "vit", "vit", 16), "bert": save_tiny_bert(root / "bert"),
              "wav2vec2": save_tiny_wav2vec2(root / "wav2vec2")}
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(root), data, models), nprocs=WORLD)
    with open(root / "result.json") as f:
        return {"root": str(root), "data": data, **json.load(f)}


def _losses(history):
    return [round(m["train.loss"], 4) for m in history]


def test_fsdp_run_matches_ddp_and_each_rank_holds_half(runs):
    ddp, fsdp = runs["ddp-3"], runs["fsdp-3"]
    assert [m["epoch"] for m in fsdp["history"]] == [1, 2, 3]
    assert fsdp["history"][-1]["train.loss"] < fsdp["history"][0]["train.loss"]  # it trains
    assert all(m["val.rows"] > 0 for m in fsdp["history"])
    for a, b in zip(ddp["history"], fsdp["history"]):
        assert a["train.loss"] == pytest.approx(b["train.loss"], rel=1e-3, abs=1e-4)
        assert a["val.loss"] == pytest.approx(b["val.loss"], rel=1e-3, abs=1e-4)
    lines = [e["line"] for e in fsdp["events"] if e["type"] == "sharding"]
    assert len(lines) == 1 and lines[0].startswith("fsdp: rank 0 holds "), lines
    shares = [float(s.rstrip("%")) for s in __import__("re").findall(r"([\d.]+)%", lines[0])]
    assert len(shares) == WORLD and all(45.0 <= s <= 55.0 for s in shares) and sum(shares) == pytest.approx(100, abs=0.2)
    assert not any(e["type"] == "sharding" for e in ddp["events"])


def test_a_partial_gradient_accumulation_at_the_end_of_an_epoch_is_averaged_as_under_ddp(runs):
    ddp, fsdp = runs["ddp-accum-1"], runs["fsdp-accum-1"]
    assert fsdp["batches"] % 3 != 0  # the epoch's last step applies fewer than grad_accum_steps micro-batches
    assert ddp["history"][0]["val.loss"] == pytest.approx(fsdp["history"][0]["val.loss"], rel=1e-3, abs=1e-4)
    assert fsdp["history"][0]["val.rows"] > 0
    assert fsdp["history"][0]["val.loss"] != pytest.approx(runs["fsdp-3"]["history"][0]["val.loss"], rel=1e-3)


def test_sharded_checkpoint_layout_and_resume_continues_with_the_same_optimizer_state(runs):
    from mmray.train.checkpoint import is_sharded_checkpoint, lora_bases, read_state

    ckpt = os.path.join(runs["root"], "stopped", "checkpoint_epoch_0003")
    names = set(os.listdir(ckpt))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "config.yaml", "frozen.json"} <= names
    assert "model.safetensors" not in names and is_sharded_checkpoint(ckpt)
    assert read_state(ckpt)["optimizer"] is None and lora_bases(ckpt).keys() == {"encoders.image"}
    resumed = runs["stopped-3"]
    assert [e["epoch"] for e in resumed["events"] if e["type"] == "resumed"] == [2]
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    # epoch 3 after the resume trains as it did without a stop: same weights, Adam moments and schedule
    assert _losses(resumed["history"]) == _losses(runs["fsdp-3"]["history"])


def test_sharded_checkpoint_loads_whole_and_exports_as_a_ddp_run_would(runs, tmp_path):
    from safetensors.torch import load_file

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches
    from mmray.data.tokenizer import TextTokenizer
    from mmray.export import load_model as load_export
    from mmray.export import write_export
    from mmray.models.builder import job_tasks
    from mmray.train.checkpoint import load_model, read_config
    from mmray.train.finalize import export_checkpoint

    ckpt = os.path.join(runs["root"], "sharded", "checkpoint_epoch_0001")
    config = read_config(ckpt)
    info = read_dataset_info(runs["data"])
    tokenizer = TextTokenizer.for_job(config.data, info)
    model = load_model(config, job_tasks(info.tasks), tokenizer, ckpt).eval()
    gathered = load_file(os.path.join(runs["root"], "gathered.safetensors"))
    loaded = model.state_dict()
    assert loaded.keys() == gathered.keys()
    for k, v in gathered.items():
        assert torch.equal(loaded[k], v), k
    val = next(iter(iter_batches(config.data, info, "val", batch_size=8, train=False)))
    in_worker = torch.load(os.path.join(runs["root"], "logits.pt"))
    with torch.no_grad():
        assert torch.allclose(model(val).logits["label"], in_worker, atol=1e-5)
    # the export is one model.safetensors (adapters merged) that predicts as the in-worker model did
    out = write_export(tmp_path / "export", model, config, info, tokenizer, {})
    assert not any("lora_" in k for k in load_file(str(out / "model.safetensors")))
    exported = load_export(str(out))
    with torch.no_grad():
        assert torch.allclose(exported.model(val).logits["label"], in_worker, atol=1e-5)
    # and the run's own export path reads the sharded checkpoint of a finished fsdp run the same way
    metrics = export_checkpoint(read_config(os.path.join(runs["root"], "fsdp", "checkpoint_epoch_0003")), info,
                                os.path.join(runs["root"], "fsdp", "checkpoint_epoch_0003"), str(tmp_path / "run-export"))
    assert metrics["epoch"] == 3 and os.path.isfile(tmp_path / "run-export" / "model.safetensors")
