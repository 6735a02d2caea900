"""The shipped Stable Diffusion configs (``models/configs/``) and the helpers in ``models/families.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dts_util.models.families import VARIANTS, config_folder, materialize, write_tokenizer

# Parameter counts the reference models publish (text encoders as diffusers builds them:
# SD2's OpenCLIP-H without its last layer, SDXL's bigG with its projection).
UNET_SD1, UNET_SD2, UNET_SDXL = 859_520_964, 865_910_724, 2_567_463_684
VAE = 83_653_863
CLIP_L, OPENCLIP_H, OPENCLIP_BIGG = 123_060_480, 340_387_840, 694_659_840
PUBLISHED = {
    "sd15": {"unet": UNET_SD1, "vae": VAE, "text_encoder": CLIP_L},
    "sd2_768": {"unet": UNET_SD2, "vae": VAE, "text_encoder": OPENCLIP_H},
    "sd2_512": {"unet": UNET_SD2, "vae": VAE, "text_encoder": OPENCLIP_H},
    "sdxl_base": {"unet": UNET_SDXL, "vae": VAE, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG},
}
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
PAD_IDS = {"<|endoftext|>": 49407, "!": 0}


def _empty_model(folder: Path, library: str, class_name: str) -> torch.nn.Module:
    """The component at ``folder`` built from its config alone, on the meta device (no memory, no weights)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(folder))
        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_pretrained(folder, local_files_only=True))


def test_the_variants_are_the_shipped_folders() -> None:
    shipped = {p.name for p in config_folder("sd15").parent.iterdir() if p.is_dir()}
    assert shipped == set(VARIANTS) == set(PUBLISHED)
    with pytest.raises(ValueError, match="unknown model variant"):
        config_folder("sd3")


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_configs_give_the_published_parameter_counts(variant: str) -> None:
    folder = config_folder(variant)
    index = json.loads((folder / "model_index.json").read_text())
    counts = {}
    for component in PUBLISHED[variant]:
        library, class_name = index[component]
        model = _empty_model(folder / component, library, class_name)
        counts[component] = sum(p.numel() for p in model.parameters())
    assert counts == PUBLISHED[variant]


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_configs_agree_with_the_variant_table(variant: str) -> None:
    import diffusers

    spec = VARIANTS[variant]
    folder = config_folder(variant)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == spec.pipeline
    assert {k for k, v in index.items() if v == ["transformers", "CLIPTokenizer"]} == set(spec.tokenizers)
    # Single-file loading must not need a safety checker or an image processor.
    assert all(index.get(k, [None, None]) == [None, None] for k in ("safety_checker", "feature_extractor"))
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == spec.prediction_type
    unet = diffusers.UNet2DConditionModel.load_config(folder, subfolder="unet")
    vae = diffusers.AutoencoderKL.load_config(folder, subfolder="vae")
    assert unet["sample_size"] * 8 == vae["sample_size"] == spec.native_size
    assert not any((folder / name).exists() for name in spec.tokenizers)  # written by materialize only


@pytest.mark.parametrize("pad_token", sorted(PAD_IDS))
def test_written_tokenizer_gives_the_published_ids(tmp_path: Path, pad_token: str) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    write_tokenizer(tmp_path, pad_token)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    for tokenizer in (CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True),
                      AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert tokenizer.model_max_length == 77
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert tokenizer("A  PHOTO of a Cat").input_ids == CAT_IDS  # lower-cased, whitespace collapsed
        padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert padded == CAT_IDS + [PAD_IDS[pad_token]] * (77 - len(CAT_IDS))
        assert tokenizer("cat " * 100, truncation=True, max_length=77).input_ids[-1] == 49407


def test_write_tokenizer_refuses_an_unknown_pad_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        write_tokenizer(tmp_path, "<pad>")


@pytest.mark.parametrize("variant", ["sd2_768", "sdxl_base"])
def test_materialize_writes_a_folder_diffusers_and_transformers_read(tmp_path: Path, variant: str) -> None:
    import diffusers
    from transformers import AutoTokenizer, CLIPTextConfig

    spec = VARIANTS[variant]
    folder = materialize(variant, tmp_path / "configs" / variant)
    assert folder == tmp_path / "configs" / variant and folder.is_dir()
    assert [p.name for p in folder.parent.iterdir()] == [variant]  # no temporary folder left behind
    pipeline_class = getattr(diffusers, spec.pipeline)
    assert pipeline_class.load_config(folder)["_class_name"] == spec.pipeline
    assert diffusers.UNet2DConditionModel.load_config(folder, subfolder="unet")["sample_size"] * 8 == spec.native_size
    for subfolder, pad_token in spec.tokenizers.items():
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert tokenizer.pad_token == pad_token and tokenizer.pad_token_id == PAD_IDS[pad_token]
    text = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    assert (text.bos_token_id, text.eos_token_id, text.max_position_embeddings) == (49406, 49407, 77)

    # An existing folder is returned untouched, however it got there.
    (folder / "marker").write_text("kept")
    assert materialize(variant, folder) == folder and (folder / "marker").read_text() == "kept"


def test_materialize_leaves_nothing_behind_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dts_util.models.families as families

    def fail(folder: Path, pad_token: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(families, "write_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        materialize("sd15", tmp_path / "sd15")
    assert list(tmp_path.iterdir()) == []
