"""The built-in model and the loader every model goes through (SD 1.x and SDXL)."""

from __future__ import annotations

import pytest
import torch

from dts_util.errors import ModelLoadError
from dts_util.models.builtin import ensure_builtin_model
from dts_util.models.clip_vocab import clip_vocabulary
from dts_util.models.loader import inspect_model, load_model, model_fingerprint
from dts_util.models.store import ModelStore


def test_clip_vocabulary_matches_the_real_tokenizer() -> None:
    vocab, merges = clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368


def test_builtin_model_loads_through_the_standard_loader(model_store) -> None:
    model = load_model("builtin-tiny-sd", model_store.model_path("builtin-tiny-sd"), "cpu")
    assert model.info.family == "sd" and model.info.native_size == 256 and model.info.vae_scale_factor == 8
    tokenizer = model.prompt_encoders().tokenizers[0]
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert not model.is_loaded("unet")  # lazily loaded
    model.unet()
    assert model.is_loaded("unet")
    model.unload("unet")
    assert not model.is_loaded("unet")


def test_builtin_model_is_deterministic(tmp_path, model_store) -> None:
    other = ensure_builtin_model(ModelStore(tmp_path))
    assert model_fingerprint(other) == model_fingerprint(model_store.model_path("builtin-tiny-sd"))


def test_fingerprint_cache_notices_changed_files(tmp_path, model_store) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model_store.model_path("builtin-tiny-sd"), folder)
    cache = tmp_path / "fp.json"
    first = model_fingerprint(folder, cache)
    assert model_fingerprint(folder, cache) == first and cache.is_file()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    assert model_fingerprint(folder, cache) != first


def test_incomplete_model_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelLoadError, match="has no unet/ folder"):
        inspect_model("broken", tmp_path)


def test_unsupported_pipeline_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ModelLoadError, match="WanPipeline pipeline; dts-util serves .*FluxPipeline"):
        inspect_model("wan", tmp_path)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL in the diffusers layout (diffusers' own test sizes), saved and reloaded from disk."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dts_util.models.builtin import VAE_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407)
    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return folder


def test_sdxl_loads_and_generates(tiny_sdxl) -> None:
    from dts_util.pipeline.components import EagerUNet, EagerVaeDecoder
    from dts_util.pipeline.params import GenerationRequest, resolve
    from dts_util.pipeline.generation import make_pipeline

    model = load_model("tiny-sdxl", tiny_sdxl, "cpu")
    assert model.info.family == "sdxl" and len(model.prompt_encoders().text_encoders) == 2

    class Eager:
        def denoiser(self, shape):
            return EagerUNet(model.unet())

        def vae_decoder(self, shape):
            return EagerVaeDecoder(model.vae())

    request = resolve(GenerationRequest(prompt="a boat", seed=1, steps=2, width=128, height=64), model.name,
                      model.info.native_size)
    result = make_pipeline(model, Eager())(request)
    assert result.images[0].size == (128, 64)


def test_sdxl_engine_spec_has_added_conditions(tiny_sdxl) -> None:
    from dts_util.engines.components import get_component
    from dts_util.boundary import Shape

    info = inspect_model("tiny-sdxl", tiny_sdxl)
    shapes = get_component("unet").input_shapes(info, Shape(8, 16, 2))
    assert shapes == {"sample": (2, 4, 8, 16), "timestep": (2,), "encoder_hidden_states": (2, 77, 64),
                      "text_embeds": (2, 32), "time_ids": (2, 6)}


@pytest.mark.parametrize("dtype, force_upcast, expected", [
    ("fp16", True, "float32"), ("fp16", None, "float32"), ("fp16", False, "float16"), ("bf16", True, "bfloat16"),
    ("fp32", True, "float32")])
def test_the_vae_is_upcast_where_its_config_asks(tiny_sdxl, dtype, force_upcast, expected) -> None:
    """SDXL's VAE overflows in fp16 (NaN, black images); diffusers' default is to upcast unless told not to."""
    import dataclasses

    import torch

    from dts_util.engines.components import VAE_DECODER
    from dts_util.models.loader import LoadedModel, default_dtype

    info = inspect_model("tiny-sdxl", tiny_sdxl)
    vae_config = {k: v for k, v in info.vae_config.items() if k != "force_upcast"}
    if force_upcast is not None:
        vae_config["force_upcast"] = force_upcast
    info = dataclasses.replace(info, vae_config=vae_config)
    model = LoadedModel(info, "cpu", default_dtype("cuda", dtype))
    assert model.vae_dtype == getattr(torch, expected)
    # Engines follow the same rule: an fp16 build makes an fp32 VAE decoder where upcasting is asked for.
    engine_precision = VAE_DECODER.build_precision(info, dtype)
    assert engine_precision == {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[expected]
