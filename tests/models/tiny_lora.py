"""A LoRA file in the kohya/A1111 format for a given model, with seeded non-zero weights, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def _entries(prefix: str, module: torch.nn.Module, targets: tuple[str, ...], rank: int,
             generator: torch.Generator, module_prefix: str = "") -> dict[str, torch.Tensor]:
    tensors = {}
    for path, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear) or not path.endswith(targets):
            continue
        name = _kohya_name(prefix, module_prefix + path)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def write_kohya_lora(path: Path, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], rank: int = 4,
                     seed: int = 7) -> Path:
    """LoRA tensors for every attention projection of ``unet`` and the text encoders, kohya-named."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = _entries("lora_unet", unet, UNET_TARGETS, rank, generator)
    prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, encoder in zip(prefixes, text_encoders):
        # kohya names text-encoder layers as transformers 4 did, under text_model.
        inner = encoder.text_model if hasattr(encoder, "text_model") else encoder
        tensors.update(_entries(prefix, inner, TEXT_TARGETS, rank, generator, module_prefix="text_model."))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
