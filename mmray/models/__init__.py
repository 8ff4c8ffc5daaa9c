"""Plain-PyTorch models: per-modality encoders, fusions, and :func:`build_model` that assembles them. Never Ray."""
from mmray.models.encoders import ENCODERS, BuildContext, EncoderOutput
from mmray.models.fusion import FUSIONS
from mmray.models.model import ModelOutput, MultimodalModel, build_model

__all__ = ["ENCODERS", "FUSIONS", "BuildContext", "EncoderOutput", "ModelOutput", "MultimodalModel", "build_model"]
