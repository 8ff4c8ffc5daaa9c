"""Build the model a job config describes: the one place training and export agree on."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmray.errors import UserError
from mmray.models.contrastive import ContrastiveHead
from mmray.models.encoders.base import BuildContext
from mmray.models.model import build_model
from mmray.seeding import seeded

if TYPE_CHECKING:
    from mmray.config.schema import JobConfig
    from mmray.models.model import MultimodalModel


def job_tasks(class_names: dict[str, list[str]]) -> dict[str, int]:
    """``{"label": [...], "label_color": [...]}`` -> task -> number of classes (``label`` first)."""
    return {t: len(class_names[t]) for t in sorted(class_names, key=lambda t: (t != "label", t))}


def build_job_model(
    config: "JobConfig", tasks: dict[str, int], tokenizer: Any | None = None, *, pretrained: bool = True
) -> "MultimodalModel":
    """The model for ``config`` with one head per task; ``tokenizer`` sizes the text embedding.

    With ``train.contrastive`` on, the model also holds the contrastive projections and temperature.

    ``pretrained=False`` skips reading pretrained encoder weights (``resnet*.weights``, ``hf_*`` weights) when a
    checkpoint or export overwrites every weight next anyway (``hf_*`` still read ``config.json`` from ``path``).

    Raises:
        UserError: text is among the modalities but no tokenizer was given.
    """
    if "text" in config.data.modalities and tokenizer is None:
        raise UserError("data.modalities includes text but no tokenizer was found")
    ctx = BuildContext.from_config(
        config.data,
        vocab_size=tokenizer.vocab_size if tokenizer is not None else 0,
        pad_token_id=tokenizer.pad_id if tokenizer is not None else 0,
        pretrained=pretrained,
    )
    model = build_model(config.model, modalities=config.data.modalities, tasks=tasks, ctx=ctx)
    c = config.train.contrastive
    if c.enabled:  # part of the model, so checkpoints, DDP and the optimizer carry it like any other weight
        model.contrastive = ContrastiveHead(
            {m: e.output_dim for m, e in model.encoders.items()}, projection_dim=c.projection_dim,
            temperature=c.temperature, learn_temperature=c.learn_temperature, max_logit_scale=c.max_logit_scale)
    return model


def build_as_trained(config: "JobConfig", tasks: dict[str, int], tokenizer: Any | None = None) -> "MultimodalModel":
    """The model exactly as the training loop builds it on rank 0 before its first step: seeded with
    ``train.seed`` (DDP copies rank 0's weights to every rank) and with pretrained encoder weights read.

    Whatever that build leaves untouched during training (a permanently frozen encoder) therefore comes out
    bit-identical, which the embedding cache and slim checkpoints rely on (and verify by hash). The caller's
    random state is left as it was.
    """
    with seeded(config.train.seed):
        return build_job_model(config, tasks, tokenizer)
