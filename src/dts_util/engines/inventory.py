"""Engine-dir housekeeping for the CLI: status of each engine, and removal."""

from __future__ import annotations

import shutil
from pathlib import Path

from dts_util.engines.backends import BACKEND_TABLE, available_backend_versions
from dts_util.engines.device import device_fingerprint, device_info
from dts_util.engines.paths import fingerprint_cache, safe_name
from dts_util.engines.registry import EngineRecord, EngineRegistry
from dts_util.errors import DtsError
from dts_util.models.loader import inspect_model, model_fingerprint
from dts_util.models.store import ModelStore


def engine_status(engine_dir: Path, model_dir: Path) -> list[tuple[EngineRecord, str | None]]:
    """Every engine with None when it is usable here, or the reason it is stale."""
    store = ModelStore(model_dir)
    versions, fingerprints = available_backend_versions(), {}
    rows = []
    for record in EngineRegistry(engine_dir).records():
        if record.model not in fingerprints:
            try:
                fingerprints[record.model] = _fingerprint(store, record.model, engine_dir)
            except DtsError:  # not in the store (or a manifest naming an unsafe path)
                fingerprints[record.model] = None
        fingerprint = fingerprints[record.model]
        if fingerprint is None:
            rows.append((record, f"model {record.model!r} is not in {store.root}"))
            continue
        rows.append((record, unreadable_reason(record.engine_path)
                      or EngineRegistry.unusable_reason(record, fingerprint, _device_here(record), versions)))
    return rows


def _fingerprint(store: ModelStore, name: str, engine_dir: Path) -> str:
    """What the model's engines are keyed by now: its weights, with a single file's companions (FLUX's encoders
    and VAE) where its family names them."""
    path = store.require_model(name)
    companions: tuple[Path, ...] = ()
    if path.is_file():
        try:
            companions = tuple(inspect_model(name, path, engine_dir / "single-file-configs").files.values())
        except DtsError:
            companions = ()
    return model_fingerprint(path, fingerprint_cache(engine_dir), companions)


def unreadable_reason(engine_file: Path) -> str | None:
    """None when the engine file can be opened and read, else why not (a manifest alone is no engine)."""
    try:
        with engine_file.open("rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "engine file is missing"
    except OSError as exc:
        return f"engine file is unreadable ({exc.strerror})"
    return None


def _device_here(record: EngineRecord) -> str:
    """This machine's fingerprint for the kind of device the engine was built for."""
    import torch

    on_gpu = record.manifest.get("device", {}).get("kind") == "cuda" and torch.cuda.is_available()
    return device_fingerprint(device_info("cuda" if on_gpu else "cpu"))


def remove_engine(record: EngineRecord) -> None:
    """Manifest first: from then on no server will pick the engine up, whatever is left."""
    record.manifest_path.unlink(missing_ok=True)
    record.engine_path.unlink(missing_ok=True)
    record.engine_path.with_name(record.engine_path.name + ".data").unlink(missing_ok=True)  # onnxruntime's weights
    if record.engine_path.suffix == ".xml":
        record.engine_path.with_suffix(".bin").unlink(missing_ok=True)  # OpenVINO IR's weights


def remove_exports(engine_dir: Path, model: str | None) -> int:
    """Remove ONNX exports (of one model, or all); returns how many folders went."""
    removed = 0
    for model_root in engine_dir.iterdir() if engine_dir.is_dir() else ():
        if model is not None and model_root.name.rsplit("-", 1)[0] != safe_name(model):
            continue
        # ONNX exports, and the caches each backend keeps beside its engines (BACKEND_TABLE)
        caches = [folder for entry in BACKEND_TABLE for pattern in entry.caches
                  for folder in model_root.glob(f"{entry.name}-*/*/{pattern}")]
        for folder in [*model_root.glob("onnx/*"), *caches]:
            shutil.rmtree(folder)
            removed += 1
    return removed
