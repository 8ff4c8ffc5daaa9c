"""hf_image (Hugging Face vision models by path), LoRA adapters on every hf_* encoder, and activation
checkpointing; tiny random-init models saved to temp folders, nothing downloaded, no Ray."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY_VISION, save_tiny_vision

from mmray.config import validate_job
from mmray.config.errors import ConfigError, UserError
from mmray.models import ENCODERS, BuildContext
from mmray.models.lora import has_lora, merged_state_dict

SIZE = 16


@pytest.fixture(scope="module")
def vision(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vision")
    return {kind: save_tiny_vision(root / kind, kind, SIZE) for kind in TINY_VISION}


def job(encoder: dict, **data) -> dict:
    return {"name": "x", "data": {"path": "d", **data}, "model": {"encoders": {"image": {"name": "hf_image", **encoder}}}}


def image_encoder(path: str, seed: int = 0, **keys):
    config = validate_job(job({"path": path, **keys}))
    torch.manual_seed(seed)
    return ENCODERS.build(config.model.encoders.image, ctx=BuildContext(image_size=config.data.image.size))


def images(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))}


# ------------------------------------------------------------------------------ hf_image
@pytest.mark.parametrize("kind", TINY_VISION)
def test_hf_image_gives_pooled_and_patch_sequence_and_trains(kind, vision):
    enc = image_encoder(vision[kind], dim=24)
    out = enc(images())
    # 4x4 patches (+ [CLS]); ConvNeXt and Swin downsample to 2x2
    tokens = {"vit": 17, "clip": 17, "dinov2": 17, "siglip": 16, "convnext": 4, "swin": 4}[kind]
    assert out.pooled.shape == (3, 24) and out.sequence.shape == (3, tokens, 24) and enc.output_dim == 24
    assert out.sequence_mask.all()
    (out.pooled.sum() + out.sequence.sum()).backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["vit", "clip", "siglip"])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_pooling_over_tokens_leaves_no_trained_weight_without_a_gradient(kind, pool, vision):
    enc = image_encoder(vision[kind], pool=pool)  # DDP fails on a trained weight that gets no gradient
    out = enc(images())
    assert torch.allclose(out.pooled, out.sequence[:, 0] if pool == "cls" else out.sequence.mean(dim=1), atol=1e-6)
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_hf_image_wires_its_image_processor_into_data_image(vision):
    from transformers import CLIPImageProcessor

    config = validate_job(job({"path": vision["clip"]}))
    clip = CLIPImageProcessor()
    assert config.data.image.size == SIZE  # the centre crop it feeds the model
    assert config.data.image.mean == pytest.approx(clip.image_mean)
    assert config.data.image.std == pytest.approx(clip.image_std)
    # The same values given explicitly (as an export's config.yaml writes them) are accepted.
    again = validate_job(job({"path": vision["clip"]}, image=config.data.image.model_dump()))
    assert again.data.image == config.data.image


@pytest.mark.parametrize("key,value", [("size", 32), ("mean", [0.5, 0.5, 0.5]), ("std", [0.2, 0.2, 0.2])])
def test_a_data_image_setting_that_differs_from_the_processor_names_the_key(key, value, vision):
    with pytest.raises(ConfigError) as info:
        validate_job(job({"path": vision["clip"]}, image={key: value}))
    (problem,) = info.value.problems
    assert problem.startswith(f"data.image.{key}: ") and "model.encoders.image.path" in problem


def test_hf_image_model_files_are_checked_before_the_run(vision, tmp_path):
    from mmray.train.api import check_model_files

    with pytest.raises(UserError, match=r"model\.encoders\.image\.path: .*not found"):
        check_model_files(validate_job(job({"path": str(tmp_path / "nowhere")})))
    with pytest.raises(UserError, match=r"model\.encoders\.image\.path: .*not found locally"):
        check_model_files(validate_job(job({"path": "org/not-cached-vit"})))
    check_model_files(validate_job(job({"path": vision["vit"]})))  # passes, offline


def test_hf_image_refuses_a_model_that_does_not_read_images(tiny):
    path = tiny.hf["hf_text"]  # a BERT folder
    with pytest.raises(UserError, match=r"model\.encoders\.image\.path: .* does not read images"):
        ENCODERS.build(ENCODERS.entry("hf_image").config(path=path), ctx=BuildContext(image_size=SIZE))


def test_a_whole_clip_model_contributes_its_vision_tower(tmp_path):
    import transformers as t

    layers = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    t.CLIPModel(t.CLIPConfig(text_config={**layers, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1},
                             vision_config={**layers, "image_size": SIZE, "patch_size": 4})).save_pretrained(tmp_path)
    t.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(tmp_path)
    enc = image_encoder(str(tmp_path), lora={"rank": 2})
    assert not any("text" in n for n, _ in enc.named_parameters())
    assert enc(images()).sequence.shape == (3, 17, 32)


def test_a_vit_fed_another_size_interpolates_its_positions(vision):
    enc = ENCODERS.build(ENCODERS.entry("hf_image").config(path=vision["vit"]), ctx=BuildContext(image_size=24))
    assert enc({"image": torch.randn(2, 3, 24, 24)}).sequence.shape == (2, 37, 32)  # 6x6 patches + [CLS]


# ------------------------------------------------------------------------------ LoRA
def _perturb_adapters(module: torch.nn.Module) -> None:
    """LoRA's B starts at zero (the adapted model equals the base): give the adapters a real update."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", TINY_VISION)
def test_lora_trains_only_adapters_and_merges_to_the_same_predictions(kind, vision):
    enc = image_encoder(vision[kind], lora={"rank": 2})
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {"convnext": {"pwconv1", "pwconv2"}}.get(kind, {"q_proj", "v_proj"})
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets  # per model type

    _perturb_adapters(enc)
    enc.eval()
    merged = image_encoder(vision[kind])  # the same encoder without adapters, as an export builds it
    merged.load_state_dict(merged_state_dict(enc), strict=True)
    merged.eval()
    assert not has_lora(merged)
    with torch.no_grad():
        a, b = enc(images()), merged(images())
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5) and torch.allclose(a.sequence, b.sequence, atol=1e-5)
    assert not torch.allclose(a.pooled, image_encoder(vision[kind]).eval()(images()).pooled, atol=1e-4)


def test_lora_on_hf_text_and_hf_audio_merges_to_the_same_outputs(ctx, tiny):
    batch = tiny.batch(4)
    for name in ("hf_text", "hf_audio"):
        torch.manual_seed(0)
        adapted = ENCODERS.build(tiny.small(ENCODERS.entry(name), lora={"rank": 2, "alpha": 4}), ctx=ctx)
        trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert all("lora_" in n or n.startswith("proj.") for n in trainable) and any("lora_" in n for n in trainable)
        _perturb_adapters(adapted)
        plain = ENCODERS.build(tiny.small(ENCODERS.entry(name)), ctx=ctx)
        plain.load_state_dict(merged_state_dict(adapted), strict=True)
        with torch.no_grad():
            assert torch.allclose(adapted.eval()(batch).pooled, plain.eval()(batch).pooled, atol=1e-5), name


def test_lora_layers_that_do_not_exist_are_named(vision):
    with pytest.raises(UserError, match=r"model\.encoders\.image\.lora\.target_modules: \['nope'\]"):
        image_encoder(vision["vit"], lora={"target_modules": ["nope"]})


def test_lora_keys_are_checked_and_sweepable():
    from mmray.tune.space import SpaceConfig, check_against_job

    with pytest.raises(ConfigError) as info:
        validate_job(job({"path": "p", "lora": {"rank": 0, "alpha": 8}}))
    assert any(p.startswith("model.encoders.image.lora.rank") for p in info.value.problems)
    with pytest.raises(ConfigError, match=r"model\.encoders\.image\.lora: .*would never train"):
        validate_job(job({"path": "p", "lora": {}, "freeze": True}))
    validate_job(job({"path": "p", "lora": {}, "freeze": True, "unfreeze_after_epochs": 1}))
    base = {"name": "t", "data": {"path": "d"}, "model": {"encoders": {"text": {"name": "hf_text", "path": "p"}}}}
    check_against_job(SpaceConfig.model_validate({"parameters": {"model.encoders.text.lora.rank": {"choice": [4, 8, 16]}}}), base)
    with pytest.raises(ConfigError) as info:
        check_against_job(SpaceConfig.model_validate({"parameters": {"model.encoders.text.lora.rank": {"choice": [0, 8]}}}), base)
    assert any("model.encoders.text.lora.rank" in p for p in info.value.problems)


# ------------------------------------------------------------------------------ activation checkpointing
def _grads(module: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    module.train()
    module.zero_grad()
    out = module(batch)
    (out.pooled.square().sum() + out.sequence.sum()).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [None, {"rank": 2}])
def test_hf_gradient_checkpointing_gives_the_same_gradients(lora, vision):
    plain = image_encoder(vision["vit"], lora=lora)
    ckpt = image_encoder(vision["vit"], lora=lora, gradient_checkpointing=True)
    if lora:
        _perturb_adapters(plain), _perturb_adapters(ckpt)
    a, b = _grads(plain, images()), _grads(ckpt, images())
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_builtin_transformer_checkpointing_gives_the_same_gradients(ctx, tiny):
    entry = ENCODERS.entry("transformer")
    torch.manual_seed(0)
    plain = ENCODERS.build(tiny.small(entry, layers=2), ctx=ctx)
    torch.manual_seed(0)
    ckpt = ENCODERS.build(tiny.small(entry, layers=2, gradient_checkpointing=True), ctx=ctx)
    batch = tiny.batch(5)
    calls = []
    hook = torch.utils.checkpoint.checkpoint

    def counting(*a, **kw):
        calls.append(1)
        return hook(*a, **kw)

    import mmray.models.encoders.text as text_module

    text_module.checkpoint, original = counting, text_module.checkpoint
    try:
        a, b = _grads(plain, batch), _grads(ckpt, batch)
    finally:
        text_module.checkpoint = original
    assert len(calls) == 2  # one checkpointed call per layer
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpointing_a_model_that_cannot_names_the_key(vision):
    with pytest.raises(UserError, match=r"model\.encoders\.image\.gradient_checkpointing: ConvNextModel"):
        image_encoder(vision["convnext"], gradient_checkpointing=True)
