"""Every engine-cache path comes from here, and each path encodes its full key.

Layout under the engine dir::

    <model>-<fingerprint[:12]>/
        onnx/<component>-<precision>/model.onnx (+ model.onnx.data, export.json)
        <backend>-<backend version>/<device tag>/<component>-<precision>-<W>x<H>-b<batch>.<ext>
                                                 ... .manifest.json beside each engine

Changing the weights, the backend version or the device changes the folder, so a
stale engine is never found where a fresh one is expected; the manifest then
records the same key in full for the registry to check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dts_util.boundary import TOKENS_PER_CHUNK, Shape

MANIFEST_SUFFIX = ".manifest.json"


def safe_name(text: str) -> str:
    """A path component that is safe on any filesystem (model names may hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


_safe = safe_name


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    model: str
    fingerprint: str
    component: str
    precision: str
    backend: str
    backend_version: str
    device_tag: str
    shape: Shape
    vae_scale: int = 8

    @property
    def resolution(self) -> str:
        return f"{self.shape.latent_width * self.vae_scale}x{self.shape.latent_height * self.vae_scale}"


@dataclass(frozen=True)
class EnginePaths:
    engine: Path
    manifest: Path


def fingerprint_cache(engine_dir: Path) -> Path:
    """Cached SHA-256 of model weights, keyed by file size and mtime (see models.loader.model_fingerprint)."""
    return engine_dir / "fingerprints.json"


def model_root(engine_dir: Path, model: str, fingerprint: str) -> Path:
    return engine_dir / f"{_safe(model)}-{fingerprint[:12]}"


def onnx_dir(engine_dir: Path, model: str, fingerprint: str, component: str, precision: str) -> Path:
    """Folder of one ONNX export (exports are shared by every backend and resolution)."""
    return model_root(engine_dir, model, fingerprint) / "onnx" / f"{component}-{precision}"


def engine_paths(engine_dir: Path, key: EngineKey) -> EnginePaths:
    folder = (model_root(engine_dir, key.model, key.fingerprint)
              / f"{key.backend}-{_safe(key.backend_version)}" / _safe(key.device_tag))
    text = f"-t{key.shape.text_length}" if key.shape.text_length != TOKENS_PER_CHUNK else ""
    stem = f"{key.component}-{key.precision}-{key.resolution}-b{key.shape.batch}{text}"
    from dts_util.engines.backends import ENTRIES

    suffix = ENTRIES[key.backend].engine_suffix
    return EnginePaths(folder / f"{stem}{suffix}", folder / f"{stem}{MANIFEST_SUFFIX}")
