"""The losses one training step optimises besides the supervised one: contrastive alignment and adversarial
perturbation of the modality embeddings. Plain PyTorch; the loop calls :func:`step_losses`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from mmray.config import JobConfig
from mmray.config.schema import AdversarialConfig
from mmray.train.checkpoint import unwrap

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # task logits -> scalar loss


def in_pretraining(config: JobConfig, epoch: int) -> bool:
    """Whether ``epoch`` (1-based) is one of the contrastive pre-training epochs."""
    return epoch <= config.train.contrastive.pretrain_epochs


def contrastive_loss(model, out, batch: dict[str, Any], collective=None) -> torch.Tensor:
    """The model's contrastive head on this batch's embeddings, over valid rows where both modalities are present;
    with a ``collective`` (the worker context) of several workers, against every worker's rows."""
    inner = unwrap(model)
    valid = batch["valid"].bool()
    present = {m: mask & valid for m, mask in inner.present_masks(batch, out.embeddings).items()}
    return inner.contrastive(out.embeddings, present, collective)


def perturbation(model, out, batch: dict[str, Any], loss_fn: LossFn, cfg: AdversarialConfig) -> dict[str, torch.Tensor]:
    """Per-modality perturbations ``[B, D_m]`` (no gradient) of the pooled embeddings that increase the loss.

    FGSM (Goodfellow et al., ICLR 2015): ``epsilon * sign(dL/dh)``. PGD (Madry et al., ICLR 2018): ``steps``
    steps of ``step_size * sign(dL/dh)``, each projected back into the L-inf ball of radius ``epsilon``, from a
    uniform random point of that ball (``random_start``, as Madry et al.) or from zero. A modality missing in a
    row (or a row that did not decode) starts at zero and has zero gradient there, so it stays unperturbed.
    The gradient is taken through fusion and heads only, at detached embeddings, so it works for frozen
    encoders too and adds no gradient to any parameter.
    """
    names = sorted(out.embeddings)
    inner = unwrap(model)
    base = {m: out.embeddings[m].detach() for m in names}
    seqs = {m: (s.detach(), mask) for m, (s, mask) in out.sequences.items()} if out.sequences else out.sequences
    steps, step = 1, cfg.epsilon  # fgsm: one step of epsilon
    if cfg.method == "pgd":
        steps, step = cfg.steps, cfg.step_size if cfg.step_size is not None else 2.5 * cfg.epsilon / cfg.steps
    delta = {m: torch.zeros_like(base[m]) for m in names}
    if cfg.method == "pgd" and cfg.random_start:
        valid = batch["valid"].to(torch.bool)
        counted = {m: (mask & valid).unsqueeze(1) for m, mask in inner.present_masks(batch, base).items()}
        delta = {m: (torch.rand_like(base[m]) * 2 - 1) * cfg.epsilon * counted[m] for m in names}
    for _ in range(steps):
        d = {m: delta[m].requires_grad_(True) for m in names}
        loss = loss_fn(inner.fuse(batch, {m: base[m] + d[m] for m in names}, seqs).logits)
        grads = torch.autograd.grad(loss, [d[m] for m in names], allow_unused=True)
        delta = {m: (delta[m].detach() + step * _sign(g, base[m])).clamp(-cfg.epsilon, cfg.epsilon)
                 for m, g in zip(names, grads)}
    return delta


def _sign(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach().sign()


def adversarial_loss(model, out, batch: dict[str, Any], loss_fn: LossFn, cfg: AdversarialConfig) -> torch.Tensor:
    """The loss with the embeddings perturbed (:func:`perturbation`); gradients reach encoders, fusion and heads."""
    delta = perturbation(model, out, batch, loss_fn, cfg)
    adv = unwrap(model).fuse(batch, {m: e + delta[m] for m, e in out.embeddings.items()}, out.sequences)
    return loss_fn(adv.logits)


def step_losses(model, out, batch: dict[str, Any], loss_fn: LossFn, config: JobConfig,
                epoch: int, collective=None) -> dict[str, torch.Tensor]:
    """``{"total", "supervised"[, "contrastive"][, "adversarial"]}`` for one step of ``epoch``.

    In a contrastive pre-training epoch the total is the contrastive loss alone (the supervised loss is
    kept in the graph at weight 0, so every parameter still gets a gradient, as DDP needs; the fusion
    and heads have a zero learning rate then). Otherwise ``supervised + contrastive.weight * contrastive
    + adversarial.weight * adversarial``, each term present only when switched on. ``collective`` (the
    worker context) gives the contrastive loss every worker's rows as negatives.
    """
    supervised = loss_fn(out.logits)
    parts = {"supervised": supervised}
    c, a = config.train.contrastive, config.train.adversarial
    if c.enabled:
        parts["contrastive"] = contrastive_loss(model, out, batch, collective)
    if in_pretraining(config, epoch):
        parts["total"] = parts["contrastive"] + 0.0 * supervised
        return parts
    total = supervised
    if c.enabled:
        total = total + c.weight * parts["contrastive"]
    if a.method != "none":
        parts["adversarial"] = adversarial_loss(model, out, batch, loss_fn, a)
        total = total + a.weight * parts["adversarial"]
    parts["total"] = total
    return parts
