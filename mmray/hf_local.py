"""Every Hugging Face load (tokenizers, text, vision and audio models, image processors) goes through
:func:`from_pretrained`.

One behaviour for all of them: local files only. ``path`` is a local folder (as ``save_pretrained`` writes
it) or a hub name already in the local Hugging Face cache; nothing is downloaded and no network connection
is tried, whatever ``HF_HUB_OFFLINE`` says, unless the user opts in with ``MMRAY_HF_DOWNLOAD=1``. No model
code from a folder is ever run (no remote code).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

from mmray.errors import UserError

DOWNLOAD_ENV = "MMRAY_HF_DOWNLOAD"


def downloads_allowed() -> bool:
    """Whether the user opted in to downloads from the Hugging Face hub (``MMRAY_HF_DOWNLOAD=1``)."""
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def looks_local(path: str) -> bool:
    """True if ``path`` names a local file or folder (existing, or spelt like a path: ``/``, ``.``, ``~``)
    rather than a hub name or a URI."""
    return "://" not in path and (path.startswith(("/", ".", "~")) or os.path.exists(path))


def is_folder_path(path: str) -> bool:
    """``path`` names a local folder, or is spelt like a path (``/``, ``.``, ``~``) rather than a hub name."""
    return looks_local(path) or os.path.isdir(os.path.expanduser(path))


def not_found(key: str, path: str, what: str) -> UserError:
    """The error for a ``path`` that is neither a local folder nor in the local cache."""
    hint = (f"mmray downloads nothing unless {DOWNLOAD_ENV}=1 is set" if not downloads_allowed()
            else "and it could not be downloaded")
    return UserError(
        f"{key}: {path!r} not found locally: no such folder, and no {what} of that name in the local Hugging "
        f"Face cache ({hint}). Pass the path of a local {what} folder (one written by save_pretrained, or "
        f"downloaded on a machine with internet)"
    )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """The hub client in offline mode for one load: ``local_files_only`` alone still lets it fetch its
    agent registry over HTTPS while it builds request headers."""
    if downloads_allowed():
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def from_pretrained(kind: str, path: str, key: str, what: str = "model", **kwargs: Any) -> Any:
    """``transformers.<kind>.from_pretrained(path)`` from local files only (see the module docstring).

    Args:
        kind: ``"AutoTokenizer"``, ``"AutoConfig"``, ``"AutoModel"``, ``"AutoFeatureExtractor"``,
            ``"AutoImageProcessor"``.
        path: a local folder or a hub name.
        key: the dotted config key ``path`` came from; every error names it.
        what: what is loaded, for messages ("model", "tokenizer").

    Raises:
        UserError: naming ``key`` and ``path``: not found locally, or it cannot be loaded.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    local = is_folder_path(path)
    folder = os.path.expanduser(path)
    if local and not os.path.isdir(folder):
        raise UserError(f"{key}: {path}: not found: no such folder (expected a local Hugging Face {what} folder)")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per worker per load would flood the run's log
    try:
        loader = getattr(transformers, kind)
        with _hub_offline():
            return loader.from_pretrained(folder if local else path,
                                          local_files_only=local or not downloads_allowed(),
                                          trust_remote_code=False, **kwargs)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load it from here"
        if local:
            raise UserError(f"{key}: cannot load {path}: {e}") from None
        raise not_found(key, path, what) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def image_settings(path: str, key: str) -> dict[str, Any]:
    """``{"size", "mean", "std"}`` for ``data.image`` from the image processor of the model at ``path``.

    ``size`` is the side the model is fed (its centre crop when it crops, else its resize target); ``mean``
    and ``std`` its normalisation ((0, 0, 0) and (1, 1, 1) when it does not normalise).

    Raises:
        UserError: naming ``key``: the processor cannot be loaded, or its input is not square.
    """
    proc = from_pretrained("AutoImageProcessor", path, key, "image processor")
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    size = _side(crop) or _side(getattr(proc, "size", None))
    if size is None:
        raise UserError(f"{key}: {path}: its image processor names no square input size; set data.image.size")
    normalize = getattr(proc, "do_normalize", True)
    mean = tuple(float(v) for v in _three(proc.image_mean)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in _three(proc.image_std)) if normalize else (1.0, 1.0, 1.0)
    return {"size": size, "mean": mean, "std": std}


def _three(v: Any) -> tuple:
    return tuple(v) * 3 if isinstance(v, (int, float)) else tuple(v)


def _side(size: Any) -> int | None:
    """A processor's ``size`` / ``crop_size`` (int, dict or SizeDict) as one square side; None if it is not."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    h, w = get("height"), get("width")
    if h and w:
        return int(h) if h == w else None
    edge = get("shortest_edge")
    return int(edge) if edge else None
