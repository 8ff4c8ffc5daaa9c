"""Contrastive alignment and adversarial training: the losses themselves, their config, and short local runs."""
from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import small_job

from mmray.config import ConfigError, validate_job
from mmray.config.schema import AdversarialConfig
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.data.tokenizer import TextTokenizer
from mmray.models.builder import build_job_model, job_tasks
from mmray.models.contrastive import ContrastiveHead
from mmray.train.local import train_local
from mmray.train.loop import task_losses
from mmray.train.objectives import perturbation
from mmray.tune.space import _parse, check_against_job


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("objectives") / "synth")
    synth(out, rows=240, shards=1, seed=3)
    return out


def _present(n: int, *mods: str) -> dict[str, torch.Tensor]:
    return {m: torch.ones(n, dtype=torch.bool) for m in mods}


# ------------------------------------------------------------------------------------ contrastive
def test_contrastive_loss_is_low_for_aligned_pairs_and_high_for_shuffled_ones():
    torch.manual_seed(0)
    head = ContrastiveHead({"image": 8, "text": 8})
    x = torch.randn(16, 8)
    aligned = head({"image": x, "text": x + 0.01 * torch.randn(16, 8)}, _present(16, "image", "text"))
    shuffled = head({"image": x, "text": x[torch.randperm(16)]}, _present(16, "image", "text"))
    assert aligned < 0.1 < math.log(16) / 2 < shuffled
    assert isinstance(head.proj["image"], torch.nn.Identity)  # equal widths: no projection


def test_contrastive_pairs_only_rows_where_both_modalities_are_present():
    torch.manual_seed(0)
    head = ContrastiveHead({"audio": 4, "image": 6, "text": 5}, projection_dim=3)
    emb = {"audio": torch.randn(8, 4), "image": torch.randn(8, 6), "text": torch.randn(8, 5)}
    present = _present(8, "audio", "image", "text")
    present["text"][:3] = False
    before = head(emb, present)
    emb["text"][:3] = torch.randn(3, 5) * 100  # missing rows' content changes: the loss must not
    assert torch.allclose(head(emb, present), before)
    assert head.proj["image"].weight.shape == (3, 6)  # widths differ: projected to projection_dim


def test_contrastive_temperature_starts_as_clip_and_is_clamped():
    head = ContrastiveHead({"image": 4, "text": 4}, temperature=0.07, max_logit_scale=100.0)
    assert head.temperature == pytest.approx(0.07)
    with torch.no_grad():
        head.log_scale.fill_(10.0)  # 1/T = e^10 > 100
    assert head.temperature == pytest.approx(0.01)
    fixed = ContrastiveHead({"image": 4, "text": 4}, learn_temperature=False)
    assert not any(p is fixed.log_scale for p in fixed.parameters())


def test_contrastive_loss_with_no_pair_is_zero_but_reaches_every_parameter():
    head = ContrastiveHead({"image": 4, "text": 6})
    present = {"image": torch.tensor([True, False]), "text": torch.tensor([False, True])}
    loss = head({"image": torch.randn(2, 4), "text": torch.randn(2, 6)}, present)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is not None for p in head.parameters())


def _contrastive_inputs():
    torch.manual_seed(1)
    emb = {"image": torch.randn(10, 6), "text": torch.randn(10, 5)}
    emb["text"][:4] = emb["image"][:4, :5] + 0.1 * torch.randn(4, 5)  # some aligned pairs
    present = _present(10, "image", "text")
    present["text"][7] = False
    return emb, present


class _Gloo:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_gather(self, t):
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return out


def _contrastive_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    head = ContrastiveHead({"image": 6, "text": 5}, projection_dim=4)
    emb, present = _contrastive_inputs()
    rows = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal batches: the last one of an epoch
    loss = head({m: e[rows] for m, e in emb.items()}, {m: p[rows] for m, p in present.items()}, _Gloo(rank, world))
    loss.backward()
    grads = {}
    for name, p in head.named_parameters():  # what DDP does: average the gradients
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.destroy_process_group()


def test_contrastive_negatives_span_every_worker_as_if_one_worker_had_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_contrastive_worker, args=(2, port, out), nprocs=2, join=True)
    two = torch.load(out)
    torch.manual_seed(0)
    head = ContrastiveHead({"image": 6, "text": 5}, projection_dim=4)
    emb, present = _contrastive_inputs()
    one = head(emb, present)  # one worker, all ten rows
    one.backward()
    assert two["loss"] == pytest.approx(one.item(), rel=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(two["grads"][name], p.grad, rtol=1e-4, atol=1e-6)


def test_contrastive_and_adversarial_keys_validate_and_are_sweepable(data):
    raw = small_job(data).model_dump(mode="json")
    space = _parse({"parameters": {
        "train.contrastive.weight": {"uniform": [0.0, 1.0]},
        "train.contrastive.pretrain_epochs": {"int": [0, 2]},
        "train.contrastive.temperature": {"loguniform": [0.01, 0.5]},
        "train.adversarial.method": {"choice": ["none", "fgsm", "pgd"]},
        "train.adversarial.epsilon": {"loguniform": [1e-3, 0.1], "when": {"train.adversarial.method": ["fgsm", "pgd"]}},
    }}, None)
    check_against_job(space, raw)  # raises ConfigError if any bound did not validate
    with pytest.raises(ConfigError, match="train.contrastive.pretrain_epochs.*less than train.epochs"):
        validate_job({**raw, "train": {**raw["train"], "epochs": 2, "contrastive": {"pretrain_epochs": 2}}})
    with pytest.raises(ConfigError, match="train.contrastive.*two or more modalities"):
        validate_job({**raw, "data": {**raw["data"], "modalities": ["image"]},
                      "train": {**raw["train"], "contrastive": {"weight": 0.5}}})
    with pytest.raises(ConfigError, match="train.adversarial.method"):
        validate_job({**raw, "train": {**raw["train"], "adversarial": {"method": "fgsmm"}}})


def _tensorboard_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    tb = os.path.join(run_dir, "tensorboard")
    for name in sorted(os.listdir(tb)):
        acc = EventAccumulator(os.path.join(tb, name))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


class _Interrupt(Exception):
    pass


def test_contrastive_pretraining_then_supervised_resumes_and_logs_its_phase(data, tmp_path):
    from safetensors.torch import load_file

    config = small_job(data, epochs=3, workers=1, batch_size=32,
                       contrastive={"pretrain_epochs": 1, "weight": 0.1})
    run_dir = str(tmp_path / "run")

    def stop_after_first_epoch(event):
        if event["type"] == "epoch_end" and event["epoch"] == 1:
            raise _Interrupt  # as if the run was killed after epoch 1's checkpoint
    info = read_dataset_info(data)
    torch.manual_seed(config.train.seed)
    initial = build_job_model(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)).state_dict()
    with pytest.raises(_Interrupt):
        train_local(config, run_dir, on_event=stop_after_first_epoch)
    events: list[dict] = []
    state, ctx = train_local(config, run_dir, on_event=events.append)
    assert events[0]["type"] == "resumed" and [m["epoch"] for m in ctx.history] == [2, 3]
    assert [m["train.contrastive_pretraining"] for m in state.history] == [1.0, 0.0, 0.0]
    assert state.best_epoch in (2, 3)  # the pre-training epoch is never the best

    pretrained = load_file(os.path.join(run_dir, "checkpoint_epoch_0001", "model.safetensors"))
    heads = [k for k in pretrained if k.startswith(("heads.", "fusion."))]
    assert heads and all(torch.equal(pretrained[k], initial[k]) for k in heads)  # frozen while pre-training
    assert not torch.equal(pretrained["contrastive.log_scale"], initial["contrastive.log_scale"])
    supervised = load_file(os.path.join(run_dir, "checkpoint_epoch_0002", "model.safetensors"))
    assert any(not torch.equal(supervised[k], pretrained[k]) for k in heads)

    scalars = _tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["train/contrastive_loss"]] == [1, 2, 3]
    assert dict(scalars["train/contrastive_pretraining"]) == {1: 1.0, 2: 0.0, 3: 0.0}
    assert any(e["type"] == "epoch_end" and e["phase"] == "supervised" for e in events)


# ------------------------------------------------------------------------------------ adversarial
def _model_and_batch(data: str, **train):
    config = small_job(data, workers=1, **train)
    info = read_dataset_info(data)
    torch.manual_seed(0)
    model = build_job_model(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)).eval()
    batch = next(iter_batches(config.data, info, "train", batch_size=32, train=False))
    batch["audio_present"][:4] = False  # some rows miss a modality: they must stay unperturbed
    return model, batch


def _loss(model, batch, delta=None):
    def loss_fn(logits):
        return task_losses(logits, batch, 0.0)
    out = model(batch)
    if delta is None:
        return out, loss_fn, loss_fn(out.logits)
    return out, loss_fn, loss_fn(model.fuse(batch, {m: e + delta[m] for m, e in out.embeddings.items()}).logits)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_adversarial_perturbation_has_the_epsilon_norm_and_increases_the_loss(data, method):
    model, batch = _model_and_batch(data)
    cfg = AdversarialConfig(method=method, epsilon=0.05, steps=3)
    out, loss_fn, clean = _loss(model, batch)
    delta = perturbation(model, out, batch, loss_fn, cfg)
    norms = {m: d.abs().amax(dim=1) for m, d in delta.items()}  # L-inf per row
    for m, n in norms.items():
        counted = batch[f"{m}_present"] & batch["valid"]  # rows that miss m (or do not decode) stay unperturbed
        assert (n[~counted] == 0).all() and (n[counted] > 0).all() and (n <= 0.05 + 1e-7).all()
        if method == "fgsm":
            assert torch.allclose(n[counted], torch.full_like(n[counted], 0.05))
    assert (norms["audio"][:4] == 0).all()
    _, _, attacked = _loss(model, batch, delta)
    random = {m: 0.05 * torch.randint(0, 2, d.shape).float().mul(2).sub(1) for m, d in delta.items()}
    _, _, noisy = _loss(model, batch, random)
    assert attacked > clean + 1e-4 and attacked > noisy  # the gradient sign beats random signs of the same size


def test_pgd_starts_from_a_random_point_of_the_ball_unless_told_not_to(data):
    model, batch = _model_and_batch(data)
    out, loss_fn, _ = _loss(model, batch)
    tiny = dict(method="pgd", epsilon=0.05, steps=1, step_size=1e-4)  # the start dominates the one small step
    torch.manual_seed(1)
    first = perturbation(model, out, batch, loss_fn, AdversarialConfig(**tiny))
    torch.manual_seed(2)
    second = perturbation(model, out, batch, loss_fn, AdversarialConfig(**tiny))
    for m in first:
        counted = batch[f"{m}_present"] & batch["valid"]
        assert not torch.equal(first[m][counted], second[m][counted])
        assert (first[m][~counted] == 0).all() and first[m].abs().max() <= 0.05 + 1e-7
    zero = [perturbation(model, out, batch, loss_fn, AdversarialConfig(**tiny, random_start=False)) for _ in range(2)]
    assert all(torch.equal(zero[0][m], zero[1][m]) and zero[0][m].abs().max() <= 1e-4 + 1e-7 for m in zero[0])


def test_training_with_adversarial_perturbations_still_learns(data, tmp_path):
    config = small_job(data, epochs=3, workers=1, batch_size=32, adversarial={"method": "fgsm", "epsilon": 0.05})
    state, _ = train_local(config, str(tmp_path / "run"))
    first, last = state.history[0], state.history[-1]
    assert last["train.adversarial_loss"] < first["train.adversarial_loss"]
    assert max(m["val.accuracy"] for m in state.history) > 1 / 6 + 0.15  # 6 classes: chance is 0.17


def test_a_pretraining_epoch_ranked_best_is_never_exported(data, tmp_path):
    from mmray.train.finalize import supervised_best

    config = small_job(data, epochs=4, workers=1, contrastive={"pretrain_epochs": 2})
    accuracy = {1: 0.30, 2: 0.50, 3: 0.20, 4: 0.25}  # pre-training epoch 2 scored best (by chance)
    history = [{"epoch": float(e), "val.accuracy": a} for e, a in accuracy.items()]
    for epoch in (2, 3, 4):  # what Ray kept: the 2 best and the latest
        path = tmp_path / f"checkpoint_epoch_{epoch:04d}"
        path.mkdir()
        torch.save({"train_state": {"epoch": epoch, "history": history[:epoch]}}, path / "state.pt")
    assert supervised_best(config, str(tmp_path / "checkpoint_epoch_0002")) == str(tmp_path / "checkpoint_epoch_0004")
    assert supervised_best(config, str(tmp_path / "checkpoint_epoch_0003")) == str(tmp_path / "checkpoint_epoch_0003")
