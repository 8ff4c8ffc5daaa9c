"""Per-modality encoders, registered by name in :data:`ENCODERS`.

An encoder is an ``nn.Module`` built as ``Encoder(config, ctx: BuildContext)`` with an ``output_dim``
attribute and ``forward(batch: dict[str, Tensor]) -> EncoderOutput``; it reads its own modality's keys
from the batch (``image``; ``input_ids``/``attention_mask``; ``audio``).
"""
from mmray.registry import Registry

ENCODERS: Registry = Registry("encoder")

from mmray.models.encoders import audio, hf, image, text  # noqa: E402,F401  (registers the built-ins)
from mmray.models.encoders.base import BuildContext, EncoderConfig, EncoderOutput  # noqa: E402

__all__ = ["ENCODERS", "BuildContext", "EncoderConfig", "EncoderOutput"]
