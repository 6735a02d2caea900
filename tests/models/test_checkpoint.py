"""Checkpoint detection from tensor shapes alone: families, architectures, refusals."""

from __future__ import annotations

import pytest

from dts_util.errors import ModelLoadError
from dts_util.models.checkpoint import detect, is_checkpoint, read_shapes
from tests.models.tiny_pipelines import build, single_file


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: read_shapes(single_file(build(family, root / family), root / f"{family}.safetensors"))
            for family in ("sd1", "sd2", "sdxl")}


def test_families_and_architectures_come_from_shapes(shapes) -> None:
    sd1, sd2, sdxl = (detect(shapes[f], f) for f in ("sd1", "sd2", "sdxl"))
    assert (sd1.variant, sd2.variant, sdxl.variant) == ("sd15", "sd2_768", "sdxl_base")
    assert sd1.overrides["unet"]["block_out_channels"] == [32, 64]
    assert sd1.overrides["unet"]["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert sd1.overrides["text_encoder"]["hidden_act"] == "quick_gelu"
    assert sd2.overrides["unet"]["use_linear_projection"] is True and sd2.overrides["unet"]["attention_head_dim"] == [1, 2]
    assert sd2.overrides["text_encoder"]["hidden_act"] == "gelu"
    assert sdxl.overrides["unet"]["transformer_layers_per_block"] == [1, 2]
    assert sdxl.overrides["unet"]["cross_attention_dim"] == 192
    assert sdxl.overrides["unet"]["addition_time_embed_dim"] == 8
    assert sdxl.overrides["text_encoder_2"]["projection_dim"] == 32
    assert sdxl.overrides["vae"]["block_out_channels"] == [32, 32, 64, 64]


def test_what_is_not_a_servable_checkpoint_is_refused() -> None:
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert not is_checkpoint({"lora_unet_x.lora_down.weight": (4, 8)})
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        detect({"lora_unet_x.lora_down.weight": (4, 8)}, "lora.safetensors")
    with pytest.raises(ModelLoadError, match="8 input channels"):
        detect({unet_in: (320, 8, 3, 3)}, "depth.safetensors")
    with pytest.raises(ModelLoadError, match="refiner"):
        detect({unet_in: (384, 4, 3, 3), "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "r")


def test_a_truncated_safetensors_header_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        read_shapes(path)
