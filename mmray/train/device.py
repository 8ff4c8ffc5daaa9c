"""How the loop uses the device: memory format, ``torch.compile``, and per-epoch GPU figures.

Plain PyTorch, no Ray. ``torch.compile`` and the GPU figures are CUDA matters (no-ops on CPU unless asked for);
the NHWC memory format of convolutional encoders is the default on CPU and CUDA alike.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import torch
from torch import nn

from mmray.config import JobConfig

SAMPLE_EVERY_S = 0.2  # NVML's utilisation counter covers the last 1/6 s to 1 s, so 5 samples a second see it all


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def is_convolutional(module: nn.Module) -> bool:
    """Most of the module's weights are 2-D convolutions (``cnn``, ``resnet*``, ``mel_cnn``; not a ViT, whose one
    convolution is its patch embedding)."""
    conv = sum(p.numel() for m in module.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    return conv > 0 and conv * 2 >= sum(p.numel() for p in module.parameters())


def channels_last_encoders(config: JobConfig, encoders: Mapping[str, nn.Module]) -> tuple[str, ...]:
    """``train.channels_last``: which of ``encoders`` (a model's ``encoders``) run in NHWC. ``auto`` = every
    convolutional one (:func:`is_convolutional`), on CPU and CUDA alike: oneDNN's NHWC convolution, pooling and
    batch-norm kernels take 1.2-1.9x less CPU time a step than NCHW (``benchmarks/step_speed.py``) and CUDA's
    tensor cores want NHWC; ``on`` = every encoder with a 2-D convolution; ``off`` = none. Never with
    ``scaling.strategy: fsdp`` (it cannot shard NHWC weights; ``on`` is refused with it at config validation)."""
    setting = config.train.channels_last
    if setting == "off" or config.scaling.strategy == "fsdp":
        return ()
    wanted = has_conv if setting == "on" else is_convolutional
    return tuple(m for m, encoder in encoders.items() if wanted(encoder))


def to_channels_last(encoders: Mapping[str, nn.Module], modalities: tuple[str, ...]) -> None:
    """The conv weights of these modalities' encoders in NHWC, in place. A convolution with NHWC weights gives
    NHWC outputs whatever its input's layout (image batches are also moved, in :func:`batch_to_device`)."""
    for modality in modalities:
        encoders[modality].to(memory_format=torch.channels_last)


def batch_to_device(batch: dict[str, Any], device: torch.device, *, channels_last: bool = False) -> dict[str, Any]:
    """``channels_last``: also the image batch in NHWC (when the image encoder runs in it)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last and torch.is_tensor(out.get("image")) and out["image"].dim() == 4:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def maybe_compile(model: nn.Module, config: JobConfig) -> nn.Module:
    """``torch.compile`` the (DDP-wrapped) model with ``train.compile`` as the mode; ``off`` returns it as is.

    The first steps pay the compilation (tens of seconds); a partial last batch compiles once more with
    dynamic shapes. :func:`mmray.train.checkpoint.unwrap` sees through the wrapper, so checkpoints and
    exports hold the plain module's weights.
    """
    mode = config.train.compile
    if mode == "off":
        return model
    return torch.compile(model, mode=mode)


class DeviceMonitor:
    """Per-epoch GPU figures of this worker: mean utilisation (sampled from NVML while the epoch runs)
    and peak memory allocated / reserved by this process. Reports nothing on CPU.

    NVML's utilisation is the whole GPU's, so trials sharing a GPU (fractional ``gpus_per_worker``) each
    see the sum of their work; without NVML (no ``nvidia-ml-py``, or a driver without it) only memory is
    reported.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self.enabled and _nvml_works(device)

    def start(self) -> None:
        if not self.enabled:
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        self._samples = []
        if self._nvml:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="mmray-gpu-monitor", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self._samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # a driver hiccup must not end training
                return

    def stop(self) -> dict[str, float]:
        """``gpu.utilization`` (percent, mean over the epoch), ``gpu.memory_peak_gb``,
        ``gpu.memory_reserved_peak_gb`` and ``gpu.memory_total_gb``; {} on CPU."""
        if not self.enabled:
            return {}
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._thread = None
        gib = 2.0 ** 30
        out = {"gpu.memory_peak_gb": torch.cuda.max_memory_allocated(self.device) / gib,
               "gpu.memory_reserved_peak_gb": torch.cuda.max_memory_reserved(self.device) / gib,
               "gpu.memory_total_gb": torch.cuda.get_device_properties(self.device).total_memory / gib}
        if self._samples:
            out["gpu.utilization"] = sum(self._samples) / len(self._samples)
        return out


def _nvml_works(device: torch.device) -> bool:
    try:
        torch.cuda.utilization(device)
        return True
    except Exception:
        return False
