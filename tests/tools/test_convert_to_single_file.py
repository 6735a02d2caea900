"""tools/convert_to_single_file.py: diffusers folder -> original SD layout, back through diffusers' own loader.

Tiny seeded random SD1.x, SD2.x and SDXL pipelines are saved in the diffusers layout,
converted to one file, and loaded back with ``from_single_file`` (fully offline, the
local folder as ``config``). Every weight must come back bit-identical.
"""

from __future__ import annotations

import os

# huggingface_hub reads this once, at import: set it before diffusers is imported here.
# (If another test module imported it first, the autouse fixture below covers that.)
os.environ["HF_HUB_OFFLINE"] = "1"

import socket
from pathlib import Path

import pytest
import torch

from dts_util.models.clip_vocab import clip_vocabulary
from tests.tools import load_tool

conv = load_tool("convert_to_single_file")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=8, sample_size=64,
)


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                         model_max_length=77, pad_token=pad_token)


def _text_config(hidden: int, layers: int, act: str, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def _vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)


def _build_sd1():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    # Three blocks so the up path has an upsampler after a plain block (.1.conv) and
    # after an attention block (.2.conv); two resnets per block as in real SD1.x.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(64, 2, "quick_gelu"))
    return StableDiffusionPipeline(
        vae=_vae(3, 0.18215), text_encoder=text_encoder, tokenizer=_tokenizer("<|endoftext|>"), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _build_sd2():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=96, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
    )
    torch.manual_seed(12)
    # An odd layer count, like the 23 of SD2's diffusers text encoder.
    text_encoder = CLIPTextModel(_text_config(96, 3, "gelu", projection_dim=48))
    return StableDiffusionPipeline(
        vae=_vae(13, 0.18215), text_encoder=text_encoder, tokenizer=_tokenizer("!"), unet=unet,
        scheduler=DDIMScheduler(prediction_type="v_prediction", steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(21)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64 + 128, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
    )
    torch.manual_seed(22)
    text_encoder = CLIPTextModel(_text_config(64, 2, "quick_gelu"))
    torch.manual_seed(23)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(128, 2, "gelu", projection_dim=32))
    return StableDiffusionXLPipeline(
        vae=_vae(24, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer("<|endoftext|>"), tokenizer_2=_tokenizer("!"), unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


BUILDERS = {"sd1": _build_sd1, "sd2": _build_sd2, "sdxl": _build_sdxl}
_cache: dict[str, tuple[Path, object, Path]] = {}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family -> (diffusers folder, the original pipeline, converted .safetensors), built once each."""

    def get(family: str):
        if family not in _cache:
            root = tmp_path_factory.mktemp(family)
            pipe = BUILDERS[family]()
            folder = root / "diffusers"
            pipe.save_pretrained(folder, safe_serialization=True)
            out = root / f"{family}.safetensors"
            conv.convert(folder, out)
            _cache[family] = (folder, pipe, out)
        return _cache[family]

    yield get
    _cache.clear()


def _assert_identical(loaded: torch.nn.Module, original: torch.nn.Module, name: str,
                      dtype: torch.dtype | None = None) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    if dtype is not None:
        want = {k: v.to(dtype) if v.is_floating_point() else v for k, v in want.items()}
    assert set(got) == set(want), f"{name}: key sets differ: {sorted(set(got) ^ set(want))[:10]}"
    for key, value in want.items():
        other = got[key]
        assert not other.is_meta, f"{name}.{key} was never loaded"
        assert other.shape == value.shape and other.dtype == value.dtype, f"{name}.{key}"
        assert (other - value).abs().max().item() == 0.0 if value.is_floating_point() \
            else torch.equal(other, value), f"{name}.{key} differs"


def _components(family: str) -> tuple[str, ...]:
    return ("unet", "vae", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "vae", "text_encoder")


def _load_pipeline(family: str, path: Path, folder: Path, **kwargs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)


def _safetensors_keys(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- layout


def test_sd1_key_layout(family_model) -> None:
    folder, pipe, out = family_model("sd1")
    sd = _safetensors_keys(out)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.",
                             "cond_stage_model.transformer.text_model.")) for k in sd)
    n_params = sum(len(getattr(pipe, c).state_dict()) for c in _components("sd1"))
    assert len(sd) == n_params  # nothing dropped, nothing invented (no position_ids)
    u = "model.diffusion_model."
    # 3 blocks x 2 layers: input_blocks 1,2 | 3(op) | 4,5 | 6(op) | 7,8; upsamplers after blocks 0 and 1.
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                "input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight", "input_blocks.6.0.op.bias",
                "input_blocks.7.0.skip_connection.weight", "middle_block.0.emb_layers.1.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.out_layers.3.bias",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.8.1.transformer_blocks.0.ff.net.2.weight", "out.0.weight", "out.2.bias"):
        assert u + key in sd, key
    assert u + "output_blocks.8.2.conv.weight" not in sd and u + "label_emb.0.0.weight" not in sd
    v = "first_stage_model."
    assert sd[v + "encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd[v + "decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert v + "encoder.down.0.downsample.conv.weight" in sd and v + "encoder.down.3.downsample.conv.weight" not in sd
    # LDM numbers the decoder from the bottom: diffusers up_blocks.0 (64 ch, upsamples) is up.3.
    assert v + "decoder.up.3.upsample.conv.weight" in sd and v + "decoder.up.0.upsample.conv.weight" not in sd
    assert sd[v + "decoder.up.0.block.0.nin_shortcut.weight"].shape == (16, 32, 1, 1)
    assert torch.equal(sd[v + "decoder.up.3.block.1.conv2.weight"],
                       pipe.vae.decoder.up_blocks[0].resnets[1].conv2.weight)
    c = "cond_stage_model.transformer.text_model."
    for key in ("embeddings.position_embedding.weight", "embeddings.token_embedding.weight",
                "encoder.layers.1.self_attn.q_proj.weight", "final_layer_norm.bias"):
        assert c + key in sd, key
    assert c + "embeddings.position_ids" not in sd


def test_sd2_writes_openclip_layout(family_model) -> None:
    folder, pipe, out = family_model("sd2")
    sd = _safetensors_keys(out)
    p = "cond_stage_model.model."
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    text = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    assert sorted({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")}, key=int) == ["0", "1", "2"]
    assert text["text_projection"].shape == (96, 48)  # [hidden, projection_dim]
    assert text["transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 96, 96)
    layer = pipe.text_encoder.state_dict()
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in layer else ""
    assert torch.equal(text["transformer.resblocks.1.attn.in_proj_bias"][96:192],
                       layer[prefix + "encoder.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(text["positional_embedding"], layer[prefix + "embeddings.position_embedding.weight"])
    for key in ("token_embedding.weight", "ln_final.weight", "transformer.resblocks.0.ln_1.bias",
                "transformer.resblocks.0.ln_2.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.attn.out_proj.weight"):
        assert key in text, key
    # Linear projections in the UNet's transformers are kept as they are (SD2 uses linear proj_in).
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2


def test_sdxl_key_layout(family_model) -> None:
    folder, pipe, out = family_model("sdxl")
    sd = _safetensors_keys(out)
    n_params = sum(len(getattr(pipe, c).state_dict()) for c in _components("sdxl"))
    # text_encoder_2's Linear projection becomes OpenCLIP's text_projection: one key each way.
    assert len(sd) == n_params - 2 * 4  # per layer, q/k/v weight+bias (6 keys) -> in_proj_weight/bias (2)
    u = "model.diffusion_model."
    assert torch.equal(sd[u + "label_emb.0.0.weight"], pipe.unet.add_embedding.linear_1.weight)
    assert torch.equal(sd[u + "label_emb.0.2.bias"], pipe.unet.add_embedding.linear_2.bias)
    assert u + "input_blocks.3.1.transformer_blocks.1.attn1.to_q.weight" in sd  # 2 transformer layers
    assert u + "output_blocks.1.2.conv.weight" in sd  # attention up block followed by its upsampler
    assert sd["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"].shape[-1] == 64
    g = "conditioner.embedders.1.model."
    assert sd[g + "positional_embedding"].shape == (77, 128)
    assert torch.equal(sd[g + "text_projection"], pipe.text_encoder_2.text_projection.weight.T)
    assert sd[g + "text_projection"].shape == (128, 32)
    assert not any(k.startswith("cond_stage_model.") for k in sd)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_pipeline_round_trip_is_exact(family_model, family) -> None:
    folder, pipe, out = family_model(family)
    loaded = _load_pipeline(family, out, folder)
    for name in _components(family):
        _assert_identical(getattr(loaded, name), getattr(pipe, name), name)
    assert type(loaded.scheduler) is type(pipe.scheduler)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_model_level_round_trip_is_exact(family_model, family) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder, pipe, out = family_model(family)
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(folder), subfolder="unet", local_files_only=True)
    _assert_identical(unet, pipe.unet, "unet")
    vae = AutoencoderKL.from_single_file(str(out), config=str(folder), subfolder="vae", local_files_only=True)
    _assert_identical(vae, pipe.vae, "vae")


def test_sd1_ckpt_round_trip(family_model, tmp_path) -> None:
    folder, pipe, _ = family_model("sd1")
    out = tmp_path / "sd1.ckpt"
    conv.convert(folder, out)
    data = torch.load(out, weights_only=True)
    assert set(data) == {"state_dict"}
    assert data["state_dict"].keys() == conv.to_single_file_state_dict(folder).keys()
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    loaded = _load_pipeline("sd1", out, folder)
    for name in _components("sd1"):
        _assert_identical(getattr(loaded, name), getattr(pipe, name), name)


def test_fp16_output(family_model, tmp_path) -> None:
    folder, pipe, _ = family_model("sd2")
    out = tmp_path / "sd2-fp16.safetensors"
    conv.convert(folder, out, dtype="fp16")
    sd = _safetensors_keys(out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    loaded = _load_pipeline("sd2", out, folder, torch_dtype=torch.float16)
    for name in _components("sd2"):
        _assert_identical(getattr(loaded, name), getattr(pipe, name), name, dtype=torch.float16)


def test_loading_makes_no_network_access(family_model, monkeypatch) -> None:
    folder, pipe, out = family_model("sdxl")
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during an offline single-file load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    loaded = _load_pipeline("sdxl", out, folder)
    _assert_identical(loaded.text_encoder_2, pipe.text_encoder_2, "text_encoder_2")
    assert attempts == []


# ----------------------------------------------------------------------------- CLI and errors


def test_cli_main(family_model, tmp_path, capsys) -> None:
    folder, _, converted = family_model("sd1")
    out = tmp_path / "cli.safetensors"
    assert conv.main([str(folder), str(out), "--dtype", "bf16"]) == 0
    sd = _safetensors_keys(out)
    reference = _safetensors_keys(converted)
    assert sd.keys() == reference.keys()
    assert all(torch.equal(sd[k], reference[k].to(torch.bfloat16)) for k in sd)
    assert not (tmp_path / "cli.safetensors.partial").exists()
    with pytest.raises(SystemExit):
        conv.main([str(folder), str(tmp_path / "out.pt")])


def test_unknown_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="encoder_hid_proj"):
        conv.convert_unet({"conv_in.weight": torch.zeros(1), "encoder_hid_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="dtype"):
        conv.convert(Path("unused"), Path("x.safetensors"), dtype="fp8")
