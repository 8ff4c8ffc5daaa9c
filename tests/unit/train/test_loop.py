"""The per-worker loop in-process (no Ray): schedule, accumulation, early stopping, resume, progress."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
from helpers import small_job

from mmray.config.schema import LRScheduleConfig
from mmray.data.synth import synth
from mmray.train.local import train_local
from mmray.train.loop import drop_modalities, make_scheduler, task_losses
from mmray.train.progress import ProgressPrinter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("loop") / "synth")
    synth(out, rows=120, shards=1, seed=2)
    return out


def lrs(schedule: LRScheduleConfig, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, schedule, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    values = lrs(LRScheduleConfig(name="cosine", warmup_ratio=0.1, min_lr_ratio=0.1), 100)
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_invalid_rows_weigh_nothing_in_the_loss():
    logits = {"label": torch.tensor([[5.0, 0.0], [0.0, 5.0], [9.0, -9.0]])}
    batch = {"label": torch.tensor([0, 1, 1]), "valid": torch.tensor([True, True, False])}
    only_valid = task_losses({"label": logits["label"][:2]}, {"label": batch["label"][:2],
                                                             "valid": torch.tensor([True, True])}, 0.0)
    assert task_losses(logits, batch, 0.0) == pytest.approx(only_valid.item())


class _Linear(torch.nn.Module):
    """A model with no dropout or batch statistics, so accumulation can be compared exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, batch):
        return type("Out", (), {"logits": {"label": self.fc(batch["x"])}})()


def _one_epoch(batch_size: int, accum: int, tiny: str) -> torch.Tensor:
    from mmray.train.checkpoint import TrainState
    from mmray.train.context import LocalContext
    from mmray.train.loop import make_optimizer, param_groups, train_epoch

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    batches = [{"x": x[i:i + batch_size], "label": y[i:i + batch_size],
                "valid": torch.ones(len(y[i:i + batch_size]), dtype=torch.bool)} for i in range(0, 16, batch_size)]
    config = small_job(tiny, workers=1, batch_size=batch_size, grad_accum_steps=accum, grad_clip=None,
                       optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
                       lr_schedule={"name": "constant", "warmup_ratio": 0.0})
    model = _Linear()
    opt = make_optimizer(config.train.optimizer, param_groups(model, config))
    sched = make_scheduler(opt, config.train.lr_schedule, 10)
    ctx = LocalContext("", lambda e: (), lambda e: ())
    train_epoch(model, batches, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                config=config, ctx=ctx, state=TrainState(), epoch=1, expected_rows=16)
    return model.fc.weight.detach().clone()


def test_gradient_accumulation_matches_one_big_batch(tiny):
    big = _one_epoch(batch_size=8, accum=1, tiny=tiny)  # 2 optimizer steps of 8 rows
    small = _one_epoch(batch_size=4, accum=2, tiny=tiny)  # 2 optimizer steps of 2 x 4 rows
    assert torch.allclose(big, small, atol=1e-6)
    trailing = _one_epoch(batch_size=4, accum=3, tiny=tiny)  # a partial accumulation is applied at epoch end
    assert not torch.allclose(trailing, _Linear().fc.weight)


def test_early_stopping_ends_a_run_that_stopped_improving(tiny, tmp_path):
    config = small_job(tiny, epochs=6, workers=1, batch_size=32, optimizer={"lr": 1e-9},
                       early_stopping={"patience": 1, "min_delta": 0.5})
    events: list[dict] = []
    state, ctx = train_local(config, str(tmp_path / "run"), on_event=events.append)
    assert state.epoch == 2 and state.best_epoch == 1  # epoch 2 could not improve by 0.5
    assert any(e["type"] == "early_stop" for e in events)
    assert len(ctx.history) == 2


def test_local_run_resumes_from_its_latest_checkpoint(tiny, tmp_path):
    run_dir = str(tmp_path / "run")
    first, _ = train_local(small_job(tiny, epochs=2, workers=1, batch_size=32), run_dir)
    events: list[dict] = []
    second, ctx = train_local(small_job(tiny, epochs=3, workers=1, batch_size=32), run_dir, on_event=events.append)
    assert events[0] == {"type": "resumed", "epoch": 2, "path": os.path.join(run_dir, "checkpoint_epoch_0002")}
    assert [m["epoch"] for m in ctx.history] == [3]  # only the new epoch ran
    assert [m["epoch"] for m in second.history] == [1, 2, 3]  # the full history survives the restart
    assert second.history[:2] == first.history


def test_progress_is_parseable_without_a_terminal():
    out = io.StringIO()
    p = ProgressPrinter(out, tty=False)
    p({"type": "epoch_start", "epoch": 1, "epochs": 2})
    p({"type": "step", "epoch": 1, "rows": 10, "rows_total": 20, "loss": 1.0})
    p({"type": "epoch_end", "epoch": 1, "epochs": 2, "metric": "val.accuracy",
       "metrics": {"train.loss": 1.25, "val.loss": 1.5, "val.accuracy": 0.5, "val.f1": 0.4,
                   "train.samples_per_s": 100.0, "best_epoch": 1}})
    (line,) = out.getvalue().splitlines()
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert line.startswith("mmray epoch=1/2 ")
    assert float(fields["val.accuracy"]) == 0.5 and fields["best"] == "1" and "eta_s" in fields


def test_progress_shows_gpu_figures_when_the_epoch_has_them():
    out = io.StringIO()
    p = ProgressPrinter(out, tty=False)
    p({"type": "epoch_end", "epoch": 1, "epochs": 1, "metric": "val.accuracy",
       "metrics": {"train.loss": 1.0, "val.accuracy": 0.5, "gpu.utilization": 87.5, "gpu.memory_peak_gb": 3.25}})
    assert "gpu.utilization=87.5" in out.getvalue() and "gpu.memory_peak_gb=3.25" in out.getvalue()


def test_progress_on_a_terminal_draws_a_bar_then_an_epoch_line():
    out = io.StringIO()
    p = ProgressPrinter(out, tty=True)
    p({"type": "epoch_start", "epoch": 1, "epochs": 3})
    p({"type": "step", "epoch": 1, "rows": 50, "rows_total": 100, "loss": 0.9})
    p({"type": "epoch_end", "epoch": 1, "epochs": 3, "metric": "val.accuracy",
       "metrics": {"train.loss": 0.8, "val.accuracy": 0.7, "best_epoch": 1}})
    text = out.getvalue()
    assert "[############............] 50/100 rows" in text
    assert "\r\033[K" in text  # the bar is cleared before the epoch line
    assert text.rstrip().endswith("* best") and "epoch 1/3" in text and "ETA" in text


def test_measuring_the_exported_epoch_shows_its_progress(tiny, monkeypatch):
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_as_trained, job_tasks
    from mmray.train import finalize

    config, info = small_job(tiny, epochs=1, workers=1), read_dataset_info(tiny)
    tasks = job_tasks(info.tasks)
    model = build_as_trained(config, tasks, TextTokenizer.load(config.data.text, info)).eval()
    monkeypatch.setattr(finalize, "MEASURE_EVERY_S", 0.0)  # an event after every batch
    events: list[dict] = []
    metrics = finalize.evaluate_splits(model, config, info, tasks, on_event=events.append, epoch=3)
    rows = {"val": info.split_rows("val"), "test": info.split_rows("test")}
    assert events[0] == {"type": "measure_start", "epoch": 3, "rows": rows, "passes": 7}  # + without/only x 3
    for split, n in rows.items():
        counts = [e["rows"] for e in events[1:] if e["split"] == split]
        assert counts == sorted(counts) and counts[-1] == n and metrics[f"{split}.accuracy"] >= 0
    assert [e["split"] for e in events if e.get("done")] == ["val", "test"]

    out = io.StringIO()
    terminal = ProgressPrinter(out, tty=True)
    for event in events:
        terminal(event)
    assert f"measuring val [########################] {rows['val']}/{rows['val']} rows" in out.getvalue()
    printed = io.StringIO()
    ProgressPrinter(printed, tty=False)(events[0])
    assert printed.getvalue() == (f"measuring epoch 3 on {rows['val']} val + {rows['test']} test rows, 7 passes a "
                                  "row: the model, then without and with only each modality\n")


def _encoder_weights(run_dir: str, epoch: int, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(run_dir, f"checkpoint_epoch_{epoch:04d}", "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith(prefix) and "running" not in k and "num_batches" not in k}


def _with_encoder(config, modality: str, **update):
    enc = getattr(config.model.encoders, modality).model_copy(update=update)
    return config.model_copy(update={"model": config.model.model_copy(
        update={"encoders": config.model.encoders.model_copy(update={modality: enc})})})


def _job_parts(config, data: str):
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import job_tasks

    info = read_dataset_info(data)
    return job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)


def test_frozen_encoder_does_not_change_while_the_rest_trains(tiny, tmp_path):
    from mmray.models.builder import build_as_trained
    from mmray.train.checkpoint import left_out, load_model

    config = _with_encoder(small_job(tiny, epochs=1, workers=1, batch_size=32), "image", freeze=True)
    tasks, tokenizer = _job_parts(config, tiny)
    initial = build_as_trained(config, tasks, tokenizer).state_dict()
    train_local(config, str(tmp_path / "run"))
    checkpoint = str(tmp_path / "run" / "checkpoint_epoch_0001")
    # The checkpoint leaves the never-trained encoder out (and names it); the others are in it.
    assert set(left_out(checkpoint)) == {"encoders.image"}
    assert not _encoder_weights(str(tmp_path / "run"), 1, "encoders.image.")
    trained = load_model(config, tasks, tokenizer, checkpoint).state_dict()
    image = [k for k in trained if k.startswith("encoders.image.")]
    audio = [k for k in trained if k.startswith("encoders.audio.") and "running" not in k and "num_batches" not in k]
    assert image and all(torch.equal(trained[k], initial[k]) for k in image)  # frozen: unchanged, BN stats too
    assert any(not torch.equal(trained[k], initial[k]) for k in audio)


def test_a_slim_checkpoint_resumes_and_refuses_other_encoder_weights(tiny, tmp_path):
    from mmray.config.errors import UserError
    from mmray.train.checkpoint import load_model

    config = _with_encoder(small_job(tiny, epochs=3, workers=1, batch_size=32), "audio", freeze=True)
    run_dir = str(tmp_path / "run")
    first, _ = train_local(config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})}), run_dir)
    resumed, ctx = train_local(config, run_dir)  # rebuilds the left-out encoder, verifies it, continues
    assert [m["epoch"] for m in ctx.history] == [3] and resumed.history[:2] == first.history
    assert resumed.history[-1]["train.loss"] < first.history[0]["train.loss"]

    # Another seed builds another random-init audio encoder: loading must refuse rather than pair the heads with it.
    tasks, tokenizer = _job_parts(config, tiny)
    other = config.model_copy(update={"train": config.train.model_copy(update={"seed": config.train.seed + 1})})
    with pytest.raises(UserError, match=r"leaves out the frozen weights of encoders\.audio"):
        load_model(other, tasks, tokenizer, os.path.join(run_dir, "checkpoint_epoch_0003"))


def test_encoder_unfreezes_after_its_epochs(tiny, tmp_path):
    config = _with_encoder(small_job(tiny, epochs=2, workers=1, batch_size=32), "text",
                           freeze=True, unfreeze_after_epochs=1, lr_mult=2.0)
    run_dir = str(tmp_path / "run")
    train_local(config, run_dir)
    first, second = (_encoder_weights(run_dir, e, "encoders.text.") for e in (1, 2))
    torch.manual_seed(0)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # trained in epoch 2


def test_lr_mult_and_frozen_epochs_shape_each_groups_learning_rate():
    from mmray.train.loop import ParamGroup, make_optimizer

    enc, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [ParamGroup("encoders.text", list(enc.parameters()), lr_mult=0.1, frozen_epochs=1),
              ParamGroup("fusion_and_heads", list(head.parameters()))]
    from mmray.config.schema import OptimizerConfig

    opt = make_optimizer(OptimizerConfig(lr=1.0), groups)
    sched = make_scheduler(opt, LRScheduleConfig(name="constant", warmup_ratio=0.0), 20, groups=groups,
                           steps_per_epoch=5)
    lrs = {g["name"]: [] for g in opt.param_groups}
    for _ in range(10):
        for name in lrs:  # weight and bias groups of a component share one schedule: read the first
            lrs[name].append(next(g["lr"] for g in opt.param_groups if g["name"] == name))
        opt.step()
        sched.step()
    assert lrs["encoders.text"][:5] == [0.0] * 5 and lrs["encoders.text"][5:] == pytest.approx([0.1] * 5)
    assert lrs["fusion_and_heads"] == pytest.approx([1.0] * 10)


def test_modality_dropout_hides_modalities_but_never_a_whole_row():
    torch.manual_seed(0)
    n = 4000
    batch = {"audio_present": torch.ones(n, dtype=torch.bool), "image_present": torch.ones(n, dtype=torch.bool),
             "text_present": torch.rand(n) > 0.5}
    text_before = batch["text_present"].clone()
    drop_modalities(batch, ("audio", "image", "text"), 0.3)
    present = torch.stack([batch[f"{m}_present"] for m in ("audio", "image", "text")], 1)
    assert present.any(dim=1).all()
    assert not (batch["text_present"] & ~text_before).any()  # a missing modality never reappears
    assert 0.6 < batch["audio_present"].float().mean() < 0.8


def test_task_weights_scale_each_tasks_loss():
    logits = {"label": torch.tensor([[2.0, 0.0]]), "label_color": torch.tensor([[0.0, 2.0]])}
    batch = {"label": torch.tensor([1]), "label_color": torch.tensor([1]), "valid": torch.tensor([True])}
    only_main = task_losses({"label": logits["label"]}, batch, 0.0)
    assert task_losses(logits, batch, 0.0, {"label_color": 0.0}) == pytest.approx(only_main.item())
    assert task_losses(logits, batch, 0.0, {"label": 2.0, "label_color": 0.0}) == pytest.approx(2 * only_main.item())


@pytest.mark.gpu
def test_bf16_autocast_trains_on_cuda(tiny, tmp_path):
    config = small_job(tiny, epochs=2, workers=1, batch_size=32)
    config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"use_gpu": True})})
    state, _ = train_local(config, str(tmp_path / "gpu"), device="cuda")
    assert state.history[-1]["train.loss"] < state.history[0]["train.loss"] * 1.5


def test_a_dataset_with_many_missing_modalities_trains_and_evaluates(tmp_path):
    import pyarrow.parquet as pq

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.export.evaluate import evaluate
    from mmray.train.finalize import export_checkpoint

    data = str(tmp_path / "gappy")
    info = synth(data, rows=240, shards=1, seed=6, missing_fraction=0.15)
    table = pq.read_table(info.split_files("train"))
    missing_any = sum(any(table.column(m)[i].as_py() is None for m in ("audio", "image", "text"))
                      for i in range(table.num_rows))
    assert missing_any / table.num_rows > 0.3

    config = small_job(data, epochs=2, workers=1, batch_size=32, modality_dropout=0.2)
    state, ctx = train_local(config, str(tmp_path / "run"))
    assert all(m["train.bad_records"] == 0 for m in state.history)
    tb = str(tmp_path / "run" / "tensorboard")
    metrics = export_checkpoint(config, read_dataset_info(data), ctx.checkpoints[-1], str(tmp_path / "export"),
                                tensorboard_dir=tb)
    result = evaluate(str(tmp_path / "export"), data, split="test")
    assert result["skipped"] == 0 and result["rows"] == info.split_rows("test")
    assert result["accuracy"] == pytest.approx(metrics["test.accuracy"])
    # modality diagnostics: the same numbers from `mmray evaluate`, metrics.json and (val) TensorBoard
    saved = json.loads((tmp_path / "export" / "metrics.json").read_text())
    for variant in ("without_audio", "only_image"):
        assert result["diagnostics"][variant]["accuracy"] == pytest.approx(saved[f"test.diagnostics.{variant}.accuracy"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for name in os.listdir(tb):
        acc = EventAccumulator(os.path.join(tb, name))
        acc.Reload()
        tags |= {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("diagnostics/")}
    assert len(tags) == 12  # without_/only_ x 3 modalities x accuracy, f1
    assert tags["diagnostics/only_audio/accuracy"] == pytest.approx(saved["val.diagnostics.only_audio.accuracy"])
