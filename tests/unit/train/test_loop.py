"""The per-worker loop in-process (no Ray): schedule, accumulation, early stopping, resume, progress."""
from __future__ import annotations

import io
import os

import pytest
import torch

from mmray.config.schema import LRScheduleConfig
from mmray.data.synth import synth
from mmray.train.local import train_local
from mmray.train.loop import make_scheduler, task_losses
from mmray.train.progress import ProgressPrinter

from helpers import small_job


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
    from mmray.train.loop import make_optimizer, train_epoch

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    batches = [{"x": x[i:i + batch_size], "label": y[i:i + batch_size],
                "valid": torch.ones(len(y[i:i + batch_size]), dtype=torch.bool)} for i in range(0, 16, batch_size)]
    config = small_job(tiny, workers=1, batch_size=batch_size, grad_accum_steps=accum, grad_clip=None,
                       optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
                       lr_schedule={"name": "constant", "warmup_ratio": 0.0})
    model = _Linear()
    opt = make_optimizer(config.train.optimizer, model)
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


@pytest.mark.gpu
def test_bf16_autocast_trains_on_cuda(tiny, tmp_path):
    config = small_job(tiny, epochs=2, workers=1, batch_size=32)
    config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"use_gpu": True})})
    state, _ = train_local(config, str(tmp_path / "gpu"), device="cuda")
    assert state.history[-1]["train.loss"] < state.history[0]["train.loss"] * 1.5
