"""Engine-dir housekeeping for the CLI: status of each engine, and removal."""

from __future__ import annotations

import shutil
from pathlib import Path

from dts_util.engines.backends import available_backend_versions
from dts_util.engines.device import device_fingerprint, device_info
from dts_util.engines.registry import EngineRecord, EngineRegistry
from dts_util.models.loader import model_fingerprint
from dts_util.models.store import ModelStore


def engine_status(engine_dir: Path, model_dir: Path) -> list[tuple[EngineRecord, str | None]]:
    """Every engine with None when it is usable here, or the reason it is stale."""
    store = ModelStore(model_dir)
    versions, fingerprints = available_backend_versions(), {}
    rows = []
    for record in EngineRegistry(engine_dir).records():
        if record.model not in fingerprints:
            folder = store.model_path(record.model) if record.model in store.model_names() else None
            fingerprints[record.model] = model_fingerprint(folder, engine_dir / "fingerprints.json") \
                if folder else None
        fingerprint = fingerprints[record.model]
        if fingerprint is None:
            rows.append((record, f"model {record.model!r} is not in {store.root}"))
            continue
        kind = record.manifest.get("device", {}).get("kind", "cpu")
        here = device_fingerprint(device_info("cuda" if kind == "cuda" and "tensorrt" in versions else "cpu"))
        rows.append((record, EngineRegistry.unusable_reason(record, fingerprint, here, versions)))
    return rows


def remove_engine(record: EngineRecord) -> None:
    """Manifest first: from then on no server will pick the engine up, whatever is left."""
    record.manifest_path.unlink(missing_ok=True)
    record.engine_path.unlink(missing_ok=True)
    record.engine_path.with_name(record.engine_path.name + ".data").unlink(missing_ok=True)


def remove_exports(engine_dir: Path, model: str | None) -> int:
    """Remove ONNX exports (of one model, or all); returns how many folders went."""
    removed = 0
    for model_root in engine_dir.iterdir() if engine_dir.is_dir() else ():
        if model is not None and model_root.name.rsplit("-", 1)[0] != model:
            continue
        # ONNX exports, and the onnxruntime backend's fused copies of them
        for folder in [*model_root.glob("onnx/*"), *model_root.glob("*/*/fused/*")]:
            shutil.rmtree(folder)
            removed += 1
    return removed
