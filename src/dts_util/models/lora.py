"""LoRA files from the model store, applied per request through diffusers' PEFT integration.

A request names LoRAs by store path (the ``loras`` field) or by A1111 tag
(``<lora:name:weight>``, looked up as ``name``, ``name.safetensors``, and the same
under ``loras/``, ``Lora/`` and ``models/Lora/``). Files in the kohya/A1111 format
(and diffusers' own) are read by diffusers' ``lora_state_dict``. A LoRA file is
loaded into the eager modules once, as a named adapter, and stays there: each
request activates its own set with its weights and deactivates it afterwards,
so the next request sees the base weights exactly.

Engines hold base weights; ``lora_set_fingerprint`` keys engines built with a
fixed LoRA set (``build-engines --lora file:weight``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import struct
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from dts_util.client_text import quote
from dts_util.errors import DtsError, ModelLoadError, ModelNotFound

if TYPE_CHECKING:
    from dts_util.families.base import LoraFormat

log = logging.getLogger(__name__)

LORA_FOLDERS = ("", "loras/", "Lora/", "models/Lora/")
# Adapters kept loaded in one module; the least recently used is deleted beyond this.
MAX_CACHED_ADAPTERS = 8
_LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora.down", "lora.up", "lora_A", "lora_B", "lora_unet_", "lora_te")


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file of the store and the weight to apply it with."""

    name: str  # path relative to the store
    path: Path
    sha256: str
    weight: float

    @property
    def adapter(self) -> str:
        return f"dts_{self.sha256[:16]}"


def _candidates(name: str, from_prompt: bool) -> list[str]:
    if not from_prompt:
        return [name]
    stems = [name] if name.endswith(".safetensors") else [name, f"{name}.safetensors"]
    return [f"{folder}{stem}" for folder in LORA_FOLDERS for stem in stems]


def resolve_loras(store: Any, requested: tuple) -> tuple[ResolvedLora, ...]:
    """Store files for the request's LoRAs (``params.LoraRequest``), checked to be LoRA files."""
    resolved = []
    for lora in requested:
        path = None
        for candidate in _candidates(lora.name, lora.from_prompt):
            try:
                found = store.resolve(candidate)
            except DtsError:
                if not lora.from_prompt:
                    raise
                continue
            if found.is_file():
                path = found
                break
        if path is None:
            where = "loras/ (or Lora/) of the model store" if lora.from_prompt else "the model store"
            raise ModelNotFound(f"LoRA {quote(lora.name)} is not in {where}; upload it first")
        _check_lora_file(path, lora.name)
        resolved.append(ResolvedLora(store.relative(path), path, file_sha256(path), lora.weight))
    return tuple(resolved)


def _check_lora_file(path: Path, name: str) -> None:
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"LoRA {quote(name)} is not a .safetensors file; dts-util reads LoRAs in the "
                             "kohya/A1111 or diffusers .safetensors format")
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            keys = json.loads(fh.read(min(length, 100 * 1024 * 1024))).keys()
    except (OSError, ValueError, struct.error, AttributeError):
        raise ModelLoadError(f"LoRA {quote(name)} is not a readable safetensors file") from None
    if not any(marker in key for key in keys for marker in _LORA_KEY_MARKERS):
        raise ModelLoadError(f"{quote(name)} is not a LoRA file (no lora_up/lora_down or lora_A/lora_B tensors)")


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered while its size and modification time stay the same."""
    info = path.stat()
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def lora_set_fingerprint(model_fingerprint: str, loras: tuple[ResolvedLora, ...]) -> str:
    """The fingerprint of a model's weights with ``loras`` fused in: what engines for that set are keyed by."""
    if not loras:
        return model_fingerprint
    # Weights as 4 decimals: a weight sent as a protobuf float (0.800000011920929) is the 0.8 given to build-engines.
    parts = [model_fingerprint] + sorted(f"{lora.sha256}:{lora.weight:.4f}" for lora in loras)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _loader_class(name: str):
    import diffusers.loaders

    return getattr(diffusers.loaders, name)


class LoraApplier:
    """Loads LoRA files into a model's eager modules as adapters, and switches them per request.

    Args:
        lora_format: the model family's LoRA loader (which key layouts it reads, which text encoders a LoRA
            may touch).
    """

    def __init__(self, lora_format: "LoraFormat") -> None:
        self.format = lora_format
        self._lock = threading.Lock()

    def _state_dict(self, lora: ResolvedLora) -> tuple[dict, Any]:
        try:
            loader = _loader_class(self.format.loader)
            # FLUX's loader returns the alphas (kohya files carry them) only when asked; SD's always does.
            extra = {"return_alphas": True} if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters \
                else {}
            loaded = loader.lora_state_dict(str(lora.path), **extra)
            state_dict, alphas = loaded[:2] if isinstance(loaded, tuple) else (loaded, None)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
            raise ModelLoadError(f"LoRA {quote(lora.name)} cannot be read as a LoRA for this model "
                                 f"({type(exc).__name__}); is it for another model family?") from None
        return state_dict, alphas

    def _ensure_loaded(self, lora: ResolvedLora, unet: Any | None, text_encoders: list[Any],
                       keep: frozenset[str] = frozenset()) -> None:
        """Load ``lora`` into every given module that does not have it yet."""
        pending = [m for m in [unet, *text_encoders] if m is not None and lora.adapter not in _adapters(m)]
        if not pending:
            return
        cls = _loader_class(self.format.loader)
        state_dict, alphas = self._state_dict(lora)
        with warnings.catch_warnings():
            # Several adapters in one module is the design here (each LoRA file is one, switched per request).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self._load_into(cls, lora, state_dict, alphas, unet, text_encoders, pending, keep)
        log.info("loaded LoRA %r as adapter %s", lora.name, lora.adapter)

    def _load_into(self, cls: Any, lora: ResolvedLora, state_dict: dict, alphas: Any, unet: Any | None,
                   text_encoders: list[Any], pending: list[Any], keep: frozenset[str]) -> None:
        try:
            if unet is not None and unet in pending:
                _evict_if_full(unet, keep)
                method = getattr(cls, self.format.denoiser_method)
                # SD's and FLUX's loaders take the kohya alphas; Z-Image's and FLUX.2's read them from the keys.
                takes_alphas = "network_alphas" in inspect.signature(method).parameters
                method(state_dict, *([alphas] if takes_alphas else []), unet, adapter_name=lora.adapter)
                _adapters(unet)[lora.adapter] = True
            for index, encoder in enumerate(text_encoders):
                if encoder not in pending:
                    continue
                prefixes = self.format.text_encoder_prefixes
                prefix = prefixes[index] if index < len(prefixes) else ""
                has_keys = bool(prefix) and any(k.startswith(f"{prefix}.") for k in state_dict)
                if has_keys:
                    _evict_if_full(encoder, keep)
                    cls.load_lora_into_text_encoder(state_dict, alphas, encoder, prefix=prefix,
                                                    adapter_name=lora.adapter)
                _adapters(encoder)[lora.adapter] = has_keys
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ModelLoadError(f"LoRA {quote(lora.name)} does not fit this model ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None

    def activate(self, loras: tuple[ResolvedLora, ...], unet: Any | None, text_encoders: list[Any]) -> None:
        """Load (once) and switch on ``loras`` with their weights in the given modules."""
        with self._lock:
            keep = frozenset(lora.adapter for lora in loras)  # never evicted to make room for each other
            for lora in loras:
                self._ensure_loaded(lora, unet, text_encoders, keep)
            for module in (unet, *text_encoders):
                if module is not None:
                    _mark_used(module, keep)
            names, weights = [lora.adapter for lora in loras], [lora.weight for lora in loras]
            if unet is not None:
                unet.enable_lora()  # set_adapters alone leaves layers switched off by an earlier request
                unet.set_adapters(names, weights=weights)
            for encoder in text_encoders:
                active = [(n, w) for n, w in zip(names, weights) if _adapters(encoder).get(n)]
                if active:
                    from diffusers.loaders.lora_base import enable_lora_for_text_encoder, set_adapters_for_text_encoder

                    enable_lora_for_text_encoder(encoder)
                    set_adapters_for_text_encoder([n for n, _ in active], encoder, [w for _, w in active])
                elif any(_adapters(encoder).values()):
                    from diffusers.loaders.lora_base import disable_lora_for_text_encoder

                    disable_lora_for_text_encoder(encoder)  # none of this request's LoRAs touch it

    @contextmanager
    def applied(self, loras: tuple[ResolvedLora, ...], text_encoders: list[Any]) -> Iterator[Any]:
        """``loras`` on in the text encoders for the ``with`` block, and in the eager UNet once it is handed
        to the callable this yields; everything is switched off again at the end."""
        unets: list[Any] = []

        def for_unet(unet: Any) -> None:
            self.activate(loras, unet, [])
            unets.append(unet)

        if loras:
            self.activate(loras, None, text_encoders)
        try:
            yield for_unet
        finally:
            if loras:
                deactivate(unets[0] if unets else None, text_encoders)


def deactivate(unet: Any | None, text_encoders: list[Any]) -> None:
    """Base weights again: every adapter of these modules switched off (they stay loaded for later)."""
    if unet is not None and _adapters(unet):
        unet.disable_lora()
    for encoder in text_encoders:
        if any(_adapters(encoder).values()):
            from diffusers.loaders.lora_base import disable_lora_for_text_encoder

            disable_lora_for_text_encoder(encoder)


def _adapters(module: Any) -> dict[str, bool]:
    """Adapters loaded into ``module`` (name -> whether it has any weights there), in load order."""
    if not hasattr(module, "_dts_lora_adapters"):
        module._dts_lora_adapters = {}
    return module._dts_lora_adapters


def _mark_used(module: Any, names: frozenset[str]) -> None:
    """Move ``names`` to the recent end of ``module``'s adapters: eviction takes the least recently used."""
    loaded = _adapters(module)
    for name in [n for n in loaded if n in names]:
        loaded[name] = loaded.pop(name)


def _evict_if_full(module: Any, keep: frozenset[str] = frozenset()) -> None:
    """Delete the least recently used adapters until there is room for one more, never one in ``keep`` (the
    current request's)."""
    loaded = _adapters(module)
    while len(loaded) >= MAX_CACHED_ADAPTERS:
        name = next((n for n in loaded if n not in keep), None)
        if name is None:
            return  # every cached adapter is this request's: room is made by the request's own bound (8)
        if loaded[name]:
            if hasattr(module, "delete_adapters"):
                module.delete_adapters(name)
            else:
                from diffusers.loaders.lora_base import delete_adapter_layers

                delete_adapter_layers(module, name)
        del loaded[name]
