"""write_export + load_model: the export layout, no pickle, and identical predictions after reloading."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmray.config import UserError
from mmray.data.reader import iter_batches
from mmray.export import export_files, load_model, write_export
from mmray.export.writer import weights_for_safetensors
from mmray.train.device import channels_last_encoders, to_channels_last


def _decoded(ex, split, batch_size=64):
    return next(iter_batches(ex.config.data, ex.info, split, batch_size=batch_size, train=False))


def _as_trained(ex):
    """A copy of the exported model in the memory format training (and the loaded export) runs it in: its
    convolutional encoders NHWC (train.channels_last: auto)."""
    model = copy.deepcopy(ex.model)
    to_channels_last(model.encoders, channels_last_encoders(ex.config, model.encoders))
    return model


def test_export_has_exactly_the_documented_files(exported):
    names = sorted(p.name for p in exported.export_dir.iterdir())
    assert names == export_files(("audio", "image", "text")) == [
        "config.yaml", "labels.json", "metrics.json", "model.safetensors", "tokenizer", "versions.json",
    ]
    assert (exported.export_dir / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((exported.export_dir / "labels.json").read_text()) == {"label": list(exported.info.class_names)}
    assert json.loads((exported.export_dir / "metrics.json").read_text()) == {"val": {"accuracy": 0.5}, "epoch": 3}
    versions = json.loads((exported.export_dir / "versions.json").read_text())
    assert versions["torch"] == torch.__version__
    assert versions["ray"] == importlib.metadata.version("ray")
    assert set(versions) >= {"mmray", "torch", "ray", "git_commit"}


def test_every_file_of_the_export_is_readable_by_others_as_the_umask_allows(exported):
    # safetensors writes its file 0600; an export (and a checkpoint) is meant to be shared like its other files
    mode = lambda name: (exported.export_dir / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.yaml") == mode("labels.json")  # 0644 under umask 022


def test_weights_are_safetensors_not_pickle(exported):
    path = exported.export_dir / "model.safetensors"
    assert path.read_bytes()[:1] != b"\x80"  # pickle protocol marker
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(exported.model.state_dict())  # buffers (BatchNorm statistics) included


def test_reloaded_model_gives_identical_probabilities(exported):
    batch, model = _decoded(exported, "train"), _as_trained(exported)
    with torch.inference_mode():
        expected = torch.softmax(model(batch).logits["label"], dim=-1)
    p = load_model(exported.export_dir)
    assert not p.model.training
    assert p.class_names == list(exported.info.class_names)
    assert p.modalities == ("audio", "image", "text")
    assert torch.equal(p.predict_batch(batch), expected)


def test_predict_from_raw_bytes_equals_decoded_batch(exported):
    # The train split has null cells (missing modalities), so this covers those rows too.
    table = pq.read_table(exported.info.split_files("train")[0])
    batch = _decoded(exported, "train")
    assert batch["label"].shape[0] == table.num_rows
    assert not bool(batch["text_present"].all())
    p = load_model(exported.export_dir)
    rows = p.predict(
        images=table.column("image").to_pylist(),
        texts=table.column("text").to_pylist(),
        audios=table.column("audio").to_pylist(),
    )
    probs = torch.tensor([[r["probabilities"][n] for n in p.class_names] for r in rows])
    expected = p.predict_batch(batch)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert [r["label"] for r in rows] == expected.argmax(dim=1).tolist()
    assert all(r["class_name"] == p.class_names[r["label"]] for r in rows)


def test_missing_modalities_still_predict(exported):
    table = pq.read_table(exported.info.split_files("test")[0])
    image = table.column("image")[0].as_py()
    p = load_model(exported.export_dir)
    rows = p.predict(images=[image, None], texts=[None, "a red circle"])  # audio not given: missing everywhere
    assert len(rows) == 2
    for r in rows:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["class_name"] in p.class_names
    assert p.predict(images=[]) == []


def test_bad_raw_inputs_are_user_errors(exported):
    p = load_model(exported.export_dir)
    with pytest.raises(UserError, match="input-1"):
        p.predict(images=[None, b"not an image"])
    with pytest.raises(UserError, match="same"):
        p.predict(images=[None], texts=["a", "b"])


@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "labels.json", "tokenizer"])
def test_missing_export_file_is_named(exported, tmp_path, name):
    broken = tmp_path / "broken"
    shutil.copytree(exported.export_dir, broken)
    target = broken / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=name):
        load_model(broken)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such model export"):
        load_model(tmp_path / "nope")


def test_image_only_model_exports_without_tokenizer(exported, tmp_path, tools):
    config = tools.config(exported.data_dir, modalities=("image",))
    ex = tools.build_and_export(tmp_path, config, exported.info, tmp_path / "img")
    assert "tokenizer" not in {q.name for q in ex.export_dir.iterdir()}
    p = load_model(ex.export_dir)
    batch, model = _decoded(ex, "test"), _as_trained(ex)
    with torch.inference_mode():
        expected = torch.softmax(model(batch).logits["label"], dim=-1)
    assert torch.equal(p.predict_batch(batch), expected)
    with pytest.raises(UserError, match="takes no text"):
        p.predict(images=[None], texts=["x"])


def test_rewriting_replaces_an_export_but_not_other_folders(exported, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(exported.export_dir, out)
    (out / "stale.txt").write_text("old")
    write_export(out, exported.model, exported.config, exported.info, exported.tokenizer, {}, epoch=None)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "metrics.json").read_text()) == {"epoch": None}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not a model export"):
        write_export(other, exported.model, exported.config, exported.info, exported.tokenizer, {})
    assert (other / "mine.txt").read_text() == "keep"


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    m = Tied()
    save_file(weights_for_safetensors(m), str(tmp_path / "w.safetensors"))
    fresh = Tied()
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    assert torch.equal(fresh.a.weight, m.a.weight) and fresh.b.weight is fresh.a.weight


def test_export_package_never_imports_ray():
    code = "import mmray.export, mmray.export.evaluate, sys; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_wrapped_model_exports_plain_keys(exported, tmp_path):
    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    out = tmp_path / "wrapped"
    write_export(out, Wrapper(exported.model), exported.config, exported.info, exported.tokenizer, {})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(exported.model.state_dict())


def test_hugging_face_encoders_predict_from_the_export_alone(exported, tmp_path):
    """An export of hf_text + hf_audio encoders carries their architecture: deleting the source folders
    afterwards still loads and predicts the same."""
    import string

    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    from mmray.config import validate_job
    from mmray.data.tokenizer import TextTokenizer
    from mmray.export.writer import export_files
    from mmray.models.builder import build_job_model, job_tasks

    bert, w2v = tmp_path / "src" / "bert", tmp_path / "src" / "w2v"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, "the", "a", "tone", "sound"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=32)).save_pretrained(bert)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2,
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)).save_pretrained(w2v)
    Wav2Vec2FeatureExtractor(sampling_rate=4000, do_normalize=True).save_pretrained(w2v)

    base = exported.config.model_dump(mode="json")
    config = validate_job({**base, "data": {**base["data"], "text": {"max_length": 8}},
                           "model": {**base["model"], "encoders": {
                               **base["model"]["encoders"],
                               "text": {"name": "hf_text", "path": str(bert), "dim": 8},
                               "audio": {"name": "hf_audio", "path": str(w2v), "dim": 8}}}})
    tokenizer = TextTokenizer.load(config.data.text, exported.info)
    model = build_job_model(config, job_tasks(exported.info.tasks), tokenizer).eval()
    out = tmp_path / "export"
    write_export(out, model, config, exported.info, tokenizer, {}, epoch=1)
    assert sorted(p.name for p in out.iterdir()) == export_files(config.data.modalities, config)
    assert (out / "encoders" / "audio" / "preprocessor_config.json").is_file()

    batch = next(iter_batches(config.data, exported.info, "test", batch_size=64, train=False))  # BERT's ids
    shutil.rmtree(tmp_path / "src")
    with torch.inference_mode():
        expected = torch.softmax(model(batch).logits["label"], dim=-1)
    p = load_model(out)
    assert torch.allclose(p.predict_batch(batch), expected, atol=1e-6)
    assert p.config.model.encoders.text.path == str(out / "encoders" / "text")


@pytest.mark.parametrize("text", ["name: !!python/object/apply:os.system ['touch {marker}']\n", "name: [unclosed\n",
                                  b"\x89PNG\r\n\x1a\n\xff\x00"])
@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_an_exports_config_that_is_not_plain_yaml_exits_2_naming_the_file(exported, tmp_path, capsys, text, verb):
    from mmray.cli.main import main

    copy = tmp_path / "export"
    shutil.copytree(exported.export_dir, copy)
    marker = tmp_path / "ran"
    config = copy / "config.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.format(marker=marker).encode())
    out = tmp_path / "preds.jsonl"
    extra = ["--out", str(out)] if verb == "predict" else []
    assert main([verb, str(copy), "--data", str(exported.data_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmray: {config}: not ") and "Traceback" not in err and "ConstructorError" not in err
    assert not marker.exists() and not out.exists()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("verb", ["evaluate", "predict", "export"])
def test_a_pickle_planted_as_the_weights_is_refused_by_every_verb_and_never_runs(exported, tmp_path, verb, capsys):
    from mmray.cli.main import main

    planted = tmp_path / "export"
    shutil.copytree(exported.export_dir, planted)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, planted / "model.safetensors")
    args = {"evaluate": ["evaluate", str(planted), "--data", str(exported.data_dir)],
            "predict": ["predict", str(planted), "--data", str(exported.data_dir), "--out", str(tmp_path / "p.jsonl")],
            "export": ["export", str(planted), "--quantize", "fp16", "--out", str(tmp_path / "q")]}[verb]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmray: ") and "model.safetensors" in err
    assert not marker.exists() and not (tmp_path / "q").exists() and not (tmp_path / "p.jsonl").exists()
