"""Text tokenisation: the dataset's own WordPiece tokenizer or a Hugging Face one, behind one interface.

Both kinds end up as a fast ``tokenizers.Tokenizer`` (a Hugging Face fast tokenizer's backend), so
encoding a batch is one Rust call and an export needs only ``tokenizer.json`` to reload it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from mmray import hf_local
from mmray.config.errors import UserError
from mmray.config.schema import DataConfig, TextPreprocess
from mmray.data.dataset_dir import DatasetInfo, read_text

META_FILE = "mmray_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Encodes texts into fixed-length ``input_ids`` / ``attention_mask`` arrays.

    Build it with :meth:`load` (from a job's ``data.text`` section) or :meth:`from_dir` (from an
    export's ``tokenizer/`` folder written by :meth:`save`).

    Attributes:
        pad_id: id of the padding token (``attention_mask`` is 0 there).
        vocab_size: number of token ids, special and added tokens included.
        source: where it came from (``"dataset"``, a Hugging Face name or path, or a folder).
    """

    def __init__(self, tokenizer, *, pad_id: int, source: str):
        self._tok = tokenizer  # tokenizers.Tokenizer
        self.pad_id = int(pad_id)
        self.source = source
        self._pad_token = tokenizer.id_to_token(self.pad_id) or "[PAD]"
        self._max_length: int | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_job(cls, data: DataConfig, info: DatasetInfo | None) -> "TextTokenizer | None":
        """The tokenizer a job's model reads text with (:meth:`load` of ``data.text``), or None when text is
        not one of ``data.modalities``: what training, the export and the embedding cache all build from."""
        return cls.load(data.text, info) if "text" in data.modalities else None

    @classmethod
    def load(
        cls, text_cfg: TextPreprocess, info: DatasetInfo | None = None, local_dir: str | None = None
    ) -> "TextTokenizer":
        """The tokenizer a job uses.

        Args:
            text_cfg: ``data.text``; ``tokenizer: null`` means the dataset's own tokenizer, otherwise
                a Hugging Face tokenizer name (from the local cache, never downloaded) or local folder.
            info: the dataset, for its own tokenizer.
            local_dir: a folder written by :meth:`save` (an export's ``tokenizer/``); when given it
                wins over everything else.

        Raises:
            UserError: the tokenizer cannot be found or loaded; the message names ``data.text.tokenizer``.
        """
        if local_dir is not None:
            return cls.from_dir(local_dir)
        if text_cfg.tokenizer is not None:
            return cls.from_pretrained(text_cfg.tokenizer)
        if info is None or info.tokenizer_path is None:
            where = info.path if info is not None else "the dataset"
            raise UserError(
                f"data.text.tokenizer: null means the dataset's own tokenizer, but {where} has none "
                "(dataset.json 'tokenizer' is null); set data.text.tokenizer to a Hugging Face tokenizer name or path"
            )
        return cls.from_file(info.tokenizer_path, source="dataset")

    @classmethod
    def from_file(cls, path: str, *, source: str | None = None) -> "TextTokenizer":
        """Load a ``tokenizers`` JSON file (local path or URI); ``[PAD]`` (or id 0) is the pad token.

        Raises:
            UserError: the file is missing or not a tokenizer.
        """
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(read_text(path))
        except (OSError, FileNotFoundError) as e:
            raise UserError(f"{path}: cannot read tokenizer: {e}") from None
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{path}: not a tokenizer.json: {e}") from None
        pad = tok.token_to_id("[PAD]")
        return cls(tok, pad_id=0 if pad is None else pad, source=source or path)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "TextTokenizer":
        """A Hugging Face tokenizer from a local folder or a hub name in the local cache (never downloaded
        unless the user opts in, see :mod:`mmray.hf_local`).

        Raises:
            UserError: naming ``data.text.tokenizer``: not available locally, cannot be loaded, or it has no
                fast (Rust) implementation.
        """
        hf = hf_local.from_pretrained("AutoTokenizer", name_or_path, "data.text.tokenizer", "tokenizer")
        if not getattr(hf, "is_fast", False):
            raise UserError(f"data.text.tokenizer: {name_or_path!r} has no fast tokenizer (tokenizer.json); use one that does")
        pad = hf.pad_token_id if hf.pad_token_id is not None else 0
        from tokenizers import Tokenizer

        # A copy: enabling padding/truncation below must not change the HF object's own settings.
        return cls(Tokenizer.from_str(hf.backend_tokenizer.to_str()), pad_id=pad, source=name_or_path)

    @classmethod
    def from_dir(cls, path: str) -> "TextTokenizer":
        """Reload a tokenizer written by :meth:`save` (no dataset or network needed).

        Raises:
            UserError: the folder has no ``tokenizer.json``.
        """
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise UserError(f"{path}: no {TOKENIZER_FILE}; expected a tokenizer folder written by an mmray export")
        meta_file = os.path.join(path, META_FILE)
        meta = json.loads(open(meta_file).read()) if os.path.isfile(meta_file) else {}
        tok = cls.from_file(file, source=meta.get("source", path))
        if "pad_id" in meta:
            tok = cls(tok._tok, pad_id=meta["pad_id"], source=tok.source)
        return tok

    def save(self, path: str) -> None:
        """Write ``tokenizer.json`` and ``mmray_tokenizer.json`` (pad id, source) into folder ``path``."""
        os.makedirs(path, exist_ok=True)
        from tokenizers import Tokenizer

        clean = Tokenizer.from_str(self._tok.to_str())
        clean.no_padding()
        clean.no_truncation()
        clean.save(os.path.join(path, TOKENIZER_FILE))
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump({"pad_id": self.pad_id, "source": self.source, "vocab_size": self.vocab_size}, f, indent=2)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str | None], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a batch, padded or truncated to ``max_length`` (special tokens included).

        Args:
            texts: B texts; None (a missing text) gives an all-padding row with an all-zero mask.
            max_length: L.

        Returns:
            ``(input_ids, attention_mask)``, both int64 [B, L]; mask 1 = real token.
        """
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), max_length), dtype=np.int64)
        rows = [i for i, t in enumerate(texts) if t is not None]
        if not rows:
            return ids, mask
        if self._max_length != max_length:
            self._tok.enable_truncation(max_length)
            self._tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self._pad_token)
            self._max_length = max_length
        encs = self._tok.encode_batch([str(texts[i]) for i in rows])
        ids[rows] = np.array([e.ids for e in encs], dtype=np.int64)
        mask[rows] = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def fingerprint(self) -> str:
        """sha256 of what decides the ids this tokenizer gives (its vocabulary, rules and pad id): a cache key part."""
        import hashlib

        from tokenizers import Tokenizer

        clean = Tokenizer.from_str(self._tok.to_str())  # padding/truncation are set per call by encode()
        clean.no_padding()
        clean.no_truncation()
        return hashlib.sha256(f"{self.pad_id}|{clean.to_str()}".encode()).hexdigest()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a row of ids, special and padding tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self):  # pickles to Ray workers as JSON, which every tokenizers version reads
        return {"json": self._tok.to_str(), "pad_id": self.pad_id, "source": self.source}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]), pad_id=state["pad_id"], source=state["source"])
