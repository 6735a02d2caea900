"""The engine registry: every engine's manifest, and whether it may be used here.

A manifest (``<engine>.manifest.json``, written last, atomically) records what an
engine was built from and for: model fingerprint, component, backend and its
version, precision, device fingerprint, exact input shapes, build time and
validation error. The registry rescans the engine dir when its manifests change,
so engines built while the server runs are picked up without a restart. An
engine whose model, backend version or device no longer matches is ignored with
one warning; an unreadable manifest is logged and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dts_util.engines.paths import MANIFEST_SUFFIX
from dts_util.boundary import Shape

log = logging.getLogger(__name__)
MANIFEST_FORMAT = 1
REQUIRED_KEYS = ("model", "model_fingerprint", "component", "backend", "backend_version", "precision",
                 "device_fingerprint", "shape", "input_shapes", "output_name", "engine_file")


@dataclass(frozen=True)
class EngineRecord:
    """One engine as its manifest describes it."""

    manifest_path: Path
    manifest: dict

    @property
    def engine_path(self) -> Path:
        return self.manifest_path.parent / self.manifest["engine_file"]

    @property
    def shape(self) -> Shape:
        return Shape(**self.manifest["shape"])

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(dims) for name, dims in self.manifest["input_shapes"].items()}

    def __getattr__(self, key: str):
        # model, component, backend, precision, ...: read straight from the manifest
        try:
            return self.__dict__["manifest"][key]
        except KeyError:
            raise AttributeError(key) from None


def parse_manifest(path: Path) -> EngineRecord:
    """Read and check one manifest; raises ValueError with the reason when it is not usable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest format {data.get('format') if isinstance(data, dict) else '?'} "
                         f"is not {MANIFEST_FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"manifest lacks {', '.join(missing)}")
    return EngineRecord(path, data)


class EngineRegistry:
    """All manifests under ``engine_dir``, rescanned when they change.

    Args:
        engine_dir: the engine cache root.
    """

    def __init__(self, engine_dir: Path) -> None:
        self.engine_dir = Path(engine_dir)
        self._records: dict[Path, EngineRecord] = {}
        self._stamps: dict[Path, int] = {}
        self._warned: set[tuple[Path, str]] = set()

    def warn_once(self, path: Path, message: str) -> None:
        if (path, message) not in self._warned:
            self._warned.add((path, message))
            log.warning("%s: %s", path, message)

    def refresh(self) -> None:
        """Pick up new, changed and removed manifests (a stat per manifest; cheap).

        Manifests sit at a fixed depth (``paths.py``): globbing only there keeps this from walking the
        compile caches that share the engine dir, on every request."""
        stamps = {}
        pattern = f"*/*/*/*{MANIFEST_SUFFIX}"  # <model>-<fingerprint>/<backend>-<version>/<device>/
        for path in self.engine_dir.glob(pattern) if self.engine_dir.is_dir() else ():
            if path.name.startswith(".") or any(p.startswith(".partial") for p in path.parts):
                continue
            try:
                stamps[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
        for path in set(self._records) - set(stamps):
            del self._records[path]
        for path, stamp in stamps.items():
            if self._stamps.get(path) == stamp:
                continue
            self._records.pop(path, None)
            try:
                self._records[path] = parse_manifest(path)
            except ValueError as exc:
                self.warn_once(path, f"{exc}; engine skipped")
        self._stamps = stamps

    def records(self) -> list[EngineRecord]:
        self.refresh()
        return sorted(self._records.values(), key=lambda r: str(r.manifest_path))

    @staticmethod
    def unusable_reason(record: EngineRecord, fingerprint: str, device_fingerprint: str,
                        backend_versions: dict[str, str]) -> str | None:
        """Why ``record`` must not run here, or None when it may."""
        if record.model_fingerprint != fingerprint:
            return "built for other weights of this model (fingerprint changed); rebuild it"
        if record.device_fingerprint != device_fingerprint:
            return f"built for device {record.device_fingerprint}, this is {device_fingerprint}; rebuild it"
        version = backend_versions.get(record.backend)
        if version is None:
            return f"backend {record.backend} is not available here"
        if record.backend_version != version:
            return f"built with {record.backend} {record.backend_version}, this is {version}; rebuild it"
        if not record.engine_path.is_file():
            return f"engine file {record.engine_path.name} is missing"
        return None

    def matching(self, model: str, component: str, shape: Shape) -> list[EngineRecord]:
        """Engines of ``model`` for exactly this component and shape, usable or not."""
        return [r for r in self.records()
                if r.model == model and r.component == component and r.shape == shape]
