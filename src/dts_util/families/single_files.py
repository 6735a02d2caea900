"""Split single files as ComfyUI users keep them: a denoiser file and its companions (text encoders, VAE).

A FLUX.1 or Z-Image transformer file holds the transformer alone; its text encoders and VAE are files of
their own, in the same folder or in ComfyUI's ``models/clip``, ``models/text_encoders`` and ``models/vae``
beside it, or named in a ``<file>.dts.json`` sidecar. Each family says which kinds it needs and how to tell
a file's kind from its tensor names (``Companions``); finding them, and the shared reading helpers, are here.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dts_util.client_text import quote
from dts_util.errors import ModelLoadError

Shapes = Mapping[str, tuple[int, ...]]
# Where a transformer file's companions are looked for, relative to its folder (ComfyUI's models/ layout).
COMPANION_FOLDERS = (".", "../clip", "../text_encoders", "../vae", "clip", "text_encoders", "vae")
SIDECAR_SUFFIX = ".dts.json"
MAX_COMPANION_CANDIDATES = 64
MAX_SIDECAR_BYTES = 65536


@dataclass(frozen=True)
class Companions:
    """What one family's transformer file loads with.

    Args:
        family: the family's name in messages ("FLUX", "Z-Image").
        kinds: component -> what a user would call its file, e.g. "T5-XXL text encoder (t5xxl_fp16.safetensors)".
        classify: the component a file (or a prefixed part of one) holds, from its tensor names and shapes.
        hints: component -> file-name starts that say what a file is (a tie-break between candidates).
        all_in_one: component -> its prefix inside an all-in-one checkpoint.
    """

    family: str
    kinds: Mapping[str, str]
    classify: Callable[[Shapes, str], str | None]
    hints: Mapping[str, tuple[str, ...]]
    all_in_one: Mapping[str, str] = field(default_factory=dict)

    def find(self, name: str, path: Path, keys: Shapes) -> dict[str, Path]:
        """The files a transformer file loads with: itself for parts it holds (an all-in-one checkpoint), a
        sidecar's choices, else the best-named file of each kind in ``COMPANION_FOLDERS``; ModelLoadError names
        what is missing."""
        files: dict[str, Path] = {"transformer": path}
        for part, prefix in self.all_in_one.items():
            if self.classify(keys, prefix) == part:
                files[part] = path
        files.update(self._sidecar(name, path))
        missing = [part for part in self.kinds if part not in files]
        if missing:
            files.update(self._scan(path, missing))
        missing = [part for part in self.kinds if part not in files]
        if missing:
            wanted = "; ".join(self.kinds[part] for part in missing)
            example = ", ".join(f"\"{part}\": ..." for part in self.kinds)
            raise ModelLoadError(
                f"{self.family} model {quote(name)} is a transformer file without its companions: no {wanted} was "
                f"found beside it or in ../clip, ../text_encoders or ../vae. Put them there, or name them in "
                f"{quote(path.name + SIDECAR_SUFFIX)} as {{{example}}}")
        return files

    def _sidecar(self, name: str, path: Path) -> dict[str, Path]:
        """Companions named in ``<file>.dts.json``, relative to the file's folder, never outside the store."""
        named = read_sidecar(name, path)
        files = {}
        for part in self.kinds:
            relative = named.get(part)
            if isinstance(relative, str) and relative:
                candidate = (path.parent / relative).resolve()
                if path.parent.resolve().parent not in candidate.parents or not candidate.is_file():
                    raise ModelLoadError(f"{quote(path.name + SIDECAR_SUFFIX)} names {part} {quote(relative)}, "
                                         "which is not a file in the model's folder or a folder beside it")
                files[part] = candidate
        return files

    def _scan(self, path: Path, wanted: list[str]) -> dict[str, Path]:
        """Each wanted kind's file among the safetensors files near ``path``, judged by their headers; a name
        that says what it is wins over one that does not."""
        from dts_util.models.checkpoint import cached_shapes

        candidates: dict[str, list[Path]] = {part: [] for part in wanted}
        seen = 0
        for folder in COMPANION_FOLDERS:
            directory = path.parent / folder
            if not directory.is_dir():
                continue
            for file in sorted(directory.glob("*.safetensors")):
                if file.resolve() == path.resolve() or seen >= MAX_COMPANION_CANDIDATES:
                    continue
                seen += 1
                try:
                    kind = self.classify(cached_shapes(file), "")
                except (ModelLoadError, OSError):
                    continue
                if kind in candidates and file not in candidates[kind]:
                    candidates[kind].append(file)
        return {part: min(found, key=lambda f: self._rank(part, f)) for part, found in candidates.items() if found}

    def _rank(self, part: str, file: Path) -> tuple[int, str]:
        stem = file.stem.lower()
        for rank, hint in enumerate(self.hints.get(part, ())):
            if stem.startswith(hint):
                return rank, file.name
        return len(self.hints.get(part, ())), file.name


def read_sidecar(name: str, path: Path) -> dict[str, Any]:
    """A single file's ``<file>.dts.json`` (what its tensors cannot say: companions, the model's variant); {}
    when there is none."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return {}
    try:
        named = json.loads(sidecar.read_text(encoding="utf-8")[:MAX_SIDECAR_BYTES])
    except ValueError:
        raise ModelLoadError(f"{quote(sidecar.name)} of model {quote(name)} is not JSON") from None
    return named if isinstance(named, dict) else {}


def flux_vae_kind(keys: Shapes, prefix: str = "") -> bool:
    """A FLUX.1 VAE (``ae.safetensors``): an LDM-layout decoder reading 16 latent channels."""
    conv = keys.get(f"{prefix}decoder.conv_in.weight")
    return conv is not None and len(conv) == 4 and conv[1] == 16


def safetensors_dtype(path: Path, prefix: str = "") -> str:
    """The dtype of a safetensors file's first tensor under ``prefix``: "fp32", "bf16", "fp16", "fp8" or ""."""
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024 * 1024:
                return ""
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return ""
    for key, meta in header.items():
        if key.startswith(prefix) and isinstance(meta, dict) and "dtype" in meta:
            return {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}.get(
                meta["dtype"], "")
    return ""


def folder_dtype(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    return safetensors_dtype(files[0]) if files else ""


def shapes_of(path: Path) -> Shapes:
    from dts_util.models.checkpoint import cached_shapes

    return cached_shapes(path)


def strip_prefix(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def count_indices(shapes: Mapping[str, Any], pattern: str) -> int:
    """How many distinct numbers the first group of ``pattern`` matches among the keys (a depth)."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def read_tensors(model_name: str, path: Path, prefix: str, dtype: torch.dtype,
                 exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a safetensors file, without the prefix, each converted to ``dtype`` as it is
    read (fp8 and bf16 files are never widened beyond it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key[len(prefix):]: handle.get_tensor(key).to(dtype) for key in handle.keys()
                    if key.startswith(prefix) and not key.startswith(exclude)}
    except (SafetensorError, OSError) as exc:
        reason = str(exc).split(":")[-1].strip()[:120]
        raise ModelLoadError(f"{quote(path.name)} of model {quote(model_name)} cannot be read ({reason}); is the "
                             "file complete? Copy or upload it again") from None


def load_into_meta_module(model: Any, cls: type, config: Any, state: dict[str, torch.Tensor], part: str,
                          what: str, path: Path, strict: bool = True, dtype: torch.dtype | None = None) -> Any:
    """``cls(config)`` built on the meta device and filled with ``state`` (already at the model's dtype), so a
    multi-billion-parameter module is never materialised in fp32 first; ModelLoadError when the file does not
    fit."""
    from dts_util.models.loader import LOAD_LOCK

    with LOAD_LOCK, torch.device("meta"):
        module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    try:
        result = module.load_state_dict(state, strict=strict, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"the {what} file {quote(path.name)} of model {quote(model.name)} does not fit its "
                             f"own shapes ({str(exc)[:200]})") from None
    materialize_buffers(module, cls, config)
    missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(f"the {what} file {quote(path.name)} of model {quote(model.name)} lacks "
                             f"{len(missing)} tensors (e.g. {missing[0]}); is it that kind of file, and complete?")
    return model.prepare_module(module.to(dtype or model.dtype), part)


def materialize_buffers(module: torch.nn.Module, cls: type, config: Any) -> None:
    """Buffers a state dict does not hold (CLIP's position ids, RoPE frequencies) are left on the meta device by
    ``assign``: take them from a real instance of a small module, else from a fresh instance of the buffer's
    owner built from the config (a rotary embedding), never by building a large model in full."""
    if not any(b.is_meta for b in module.buffers()):
        return
    names = {name for name, b in module.named_buffers() if b.is_meta}
    with torch.device("cpu"):
        reference = dict(cls(config).named_buffers()) if sum(p.numel() for p in module.parameters()) < 5e8 else {}
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = reference.get(name)
        if value is None:
            try:
                with torch.device("cpu"):
                    value = dict(type(owner)(config=config).named_buffers())[leaf]
            except (TypeError, KeyError, AttributeError):
                raise ModelLoadError(f"cannot build buffer {name} of {cls.__name__}") from None
        owner.register_buffer(leaf, value, persistent=False)
