"""Pieces several benchmarks share (imported by the scripts next to it; not a benchmark itself)."""
from __future__ import annotations

import copy
import os

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_model(modalities=("audio", "image", "text")) -> dict:
    """The ``model`` section of ``jobs/quickstart.yaml`` (its encoders and fusion), with the encoders of
    ``modalities`` only: the model the benchmarks that compare loops, trials and readers train."""
    with open(os.path.join(REPO, "jobs", "quickstart.yaml")) as f:
        model = copy.deepcopy(yaml.safe_load(f)["model"])
    model["encoders"] = {m: e for m, e in model["encoders"].items() if m in modalities}
    return model
