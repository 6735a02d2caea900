"""The Stable Diffusion families dts-util knows, and their shipped diffusers configs.

A single-file checkpoint (``.safetensors`` / ``.ckpt``) holds weights only; diffusers
needs a pipeline folder of configs next to it to build the models. With no model hub
to fetch them from, ``configs/<variant>/`` ships those folders, written from the values
the reference repositories publish:

- ``sd15``: runwayml/stable-diffusion-v1-5
- ``sd2_768``: stabilityai/stable-diffusion-2-1 (v-prediction)
- ``sd2_512``: stabilityai/stable-diffusion-2-1-base (epsilon)
- ``sdxl_base``: stabilityai/stable-diffusion-xl-base-1.0

They hold no tokenizer files: every tokenizer is the same CLIP BPE, built from the
vocabulary in ``assets/`` and written at run time by :func:`materialize`, which
differs only in its pad token.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from dts_util.models.clip_vocab import clip_vocabulary
from dts_util.models.store import publish_folder

# OpenAI's CLIP tokenizer pads with its end token; OpenCLIP's (SD2, SDXL's second
# encoder) pads with id 0, which is "!". The text encoders were trained with these.
PAD_ENDOFTEXT = "<|endoftext|>"
PAD_EXCLAMATION = "!"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# The header of OpenAI's and Hugging Face's merges files; transformers 4 skips line 1.
MERGES_HEADER = "#version: 0.2"


@dataclass(frozen=True)
class Variant:
    """One shipped config folder and what a caller needs to know about it without reading it."""

    name: str
    family: str  # "sd1", "sd2" or "sdxl"
    pipeline: str  # the diffusers pipeline class in model_index.json
    prediction_type: str  # "epsilon" or "v_prediction", as the scheduler config says
    native_size: int  # pixels per side the model was trained at
    tokenizers: Mapping[str, str]  # tokenizer subfolder -> its pad token
    source: str  # the repository the values come from


def _variant(name: str, family: str, pipeline: str, prediction_type: str, native_size: int,
             tokenizers: dict[str, str], source: str) -> Variant:
    return Variant(name, family, pipeline, prediction_type, native_size, MappingProxyType(tokenizers), source)


VARIANTS: Mapping[str, Variant] = MappingProxyType({
    "sd15": _variant("sd15", "sd1", "StableDiffusionPipeline", "epsilon", 512,
                     {"tokenizer": PAD_ENDOFTEXT}, "runwayml/stable-diffusion-v1-5"),
    "sd2_768": _variant("sd2_768", "sd2", "StableDiffusionPipeline", "v_prediction", 768,
                        {"tokenizer": PAD_EXCLAMATION}, "stabilityai/stable-diffusion-2-1"),
    "sd2_512": _variant("sd2_512", "sd2", "StableDiffusionPipeline", "epsilon", 512,
                        {"tokenizer": PAD_EXCLAMATION}, "stabilityai/stable-diffusion-2-1-base"),
    "sdxl_base": _variant("sdxl_base", "sdxl", "StableDiffusionXLPipeline", "epsilon", 1024,
                          {"tokenizer": PAD_ENDOFTEXT, "tokenizer_2": PAD_EXCLAMATION},
                          "stabilityai/stable-diffusion-xl-base-1.0"),
})


def _get(variant: str) -> Variant:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}; known: {', '.join(VARIANTS)}") from None


def config_folder(variant: str) -> Path:
    """The shipped config folder of ``variant`` (read-only: copy it with :func:`materialize`)."""
    _get(variant)
    folder = resources.files("dts_util.models").joinpath("configs", variant)
    # Installed packages are plain folders; a zipped one could not be handed to diffusers anyway.
    if not isinstance(folder, Path) or not folder.is_dir():
        raise FileNotFoundError(f"the config folder for {variant!r} is missing from the dts_util package ({folder})")
    return folder


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """Write a CLIP tokenizer folder padding with ``pad_token``, readable by transformers 4 and 5.

    The slow-tokenizer files (vocab.json, merges.txt) rather than tokenizer.json alone:
    transformers 4's ``CLIPTokenizer`` cannot read tokenizer.json, and transformers 5
    builds the same tokenizer from either.
    """
    vocab, merges = clip_vocabulary()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        **special,
        "add_prefix_space": False,
        # As transformers >= 4.34 saves them. It also registers a "!" pad token as a special token,
        # so a "!" in a prompt becomes id 0, as it does with the published SD2/SDXL tokenizers.
        "added_tokens_decoder": {
            str(vocab[token]): {"content": token, "lstrip": False, "normalized": True, "rstrip": False,
                                "single_word": False, "special": True}
            for token in (BOS_TOKEN, EOS_TOKEN)
        },
        # Cleanup is meant for WordPiece; transformers 5 ignores it for BPE, with a warning.
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def materialize(variant: str, target: Path) -> Path:
    """A complete config folder for ``variant`` at ``target`` (shipped configs plus tokenizers).

    This is the folder to pass as ``from_single_file(config=...)``. It is built in a
    temporary folder next to ``target`` and renamed into place, so it is never seen
    half-written; an existing ``target`` is returned as it is.
    """
    spec = _get(variant)
    return publish_folder(Path(target), lambda folder: fill_config_folder(spec, folder))


def fill_config_folder(spec: "Variant", folder: Path) -> None:
    """Write ``spec``'s shipped configs and its tokenizers into ``folder``."""
    source = config_folder(spec.name)
    # File by file: copytree would copy the package's permissions, read-only where it is installed so.
    for path in sorted(source.rglob("*")):
        if path.is_file():
            copy = folder / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
    for subfolder, pad_token in spec.tokenizers.items():
        write_tokenizer(folder / subfolder, pad_token)
