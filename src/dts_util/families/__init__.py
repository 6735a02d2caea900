"""The model families dts-util serves: one object per family, one row per family in ``FAMILIES``.

A family (``base.ModelFamily``) owns how its models are recognised and loaded, its prompt
handling, latent space, denoiser call and guidance, samplers and defaults, engine components,
LoRA format and the names the Draw Things app uses. Adding one is a module with a subclass
and a row here; nothing else branches on a family's name.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from dts_util.families.base import FamilyDefaults, LoraFormat, ModelFamily
from dts_util.families.flux import FluxFamily
from dts_util.families.flux2_klein import Flux2KleinFamily
from dts_util.families.sd import StableDiffusionFamily
from dts_util.families.zimage import ZImageFamily

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({family.name: family for family in (
    StableDiffusionFamily(xl=False),
    StableDiffusionFamily(xl=True),
    FluxFamily(),
    ZImageFamily(),
    Flux2KleinFamily(),
)})

__all__ = ["FAMILIES", "FamilyDefaults", "LoraFormat", "ModelFamily", "family_for_file", "family_for_index",
           "get_family"]


def get_family(name: str) -> ModelFamily:
    return FAMILIES[name]


def family_for_index(index: Mapping[str, Any]) -> ModelFamily | None:
    """The family of a diffusers folder, by its ``model_index.json``: a pipeline class a family names outright
    wins over one whose components merely look like it."""
    class_name = index.get("_class_name", "")
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    return next((family for family in FAMILIES.values() if family.recognizes(index)), None)


def family_for_file(keys: Mapping[str, tuple[int, ...]]) -> ModelFamily | None:
    """The family of a single weights file, by its tensor names and shapes (read from its header)."""
    return next((family for family in FAMILIES.values() if family.recognizes_file(keys)), None)


def served_pipelines() -> list[str]:
    """Every diffusers pipeline class some family serves, for error messages."""
    return sorted({name for family in FAMILIES.values() for name in family.pipelines if "Onnx" not in name})
