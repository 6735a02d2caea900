"""Planning and building engines: export (once), compile per shape, validate, record.

A build is described before it runs (``plan`` returns ``BuildJob`` objects that
``build-engines --dry-run`` can print), and every step writes into a temporary
folder that is renamed into place, with the manifest written last. An engine is
therefore either complete with its manifest, or absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from dts_util import __version__
from dts_util.atomic_files import write_text_atomic
from dts_util.engines.backends import default_build_device, get_backend, resolve_backend, resolve_precision
from dts_util.engines.backends.base import Backend
from dts_util.engines.device import device_fingerprint, device_info, device_tag
from dts_util.engines.export import export_component, relative_l2
from dts_util.engines.paths import EngineKey, EnginePaths, engine_paths
from dts_util.engines.registry import MANIFEST_FORMAT, EngineRegistry, parse_manifest
from dts_util.engines.components import ComponentDescriptor, get_component
from dts_util.errors import EngineBuildError, InvalidRequest
from dts_util.models.loader import LoadedModel
from dts_util.boundary import TOKENS_PER_CHUNK, Shape

log = logging.getLogger(__name__)
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}  # relative L2 against PyTorch fp32


@dataclass
class BuildJob:
    """One engine to build: what, for which shape, with which backend, and where it goes."""

    component: ComponentDescriptor
    shape: Shape
    backend: Backend
    precision: str
    device: str
    key: EngineKey
    paths: EnginePaths
    skip_reason: str = ""  # non-empty when a valid engine already exists

    @property
    def label(self) -> str:
        text = f" t{self.shape.text_length}" if self.shape.text_length != TOKENS_PER_CHUNK else ""
        return f"{self.component.name} {self.key.resolution} b{self.shape.batch}{text}"


@dataclass
class BuildResult:
    job: BuildJob
    status: str  # "built", "skipped" or "failed"
    seconds: float = 0.0
    engine_bytes: int = 0
    rel_l2: float | None = None
    error: str = ""
    export_seconds: float = 0.0
    manifest: dict = field(default_factory=dict)


def parse_resolution(text: str) -> tuple[int, int]:
    """"512x768" -> (512, 768) as (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidRequest(f"resolution {text!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
    if width % 8 or height % 8 or min(width, height) < 64 or max(width, height) > 2048:
        raise InvalidRequest(f"resolution {text!r}: width and height must be multiples of 8 in 64..2048")
    return width, height


def unet_batches(batch_size: int, cfg: str) -> list[int]:
    """UNet batch sizes for ``batch_size`` images: x2 with classifier-free guidance, x1 without."""
    return {"cfg": [batch_size * 2], "no-cfg": [batch_size], "both": [batch_size * 2, batch_size]}[cfg]


def plan(model: LoadedModel, engine_dir: Path, resolutions: list[tuple[int, int]], batch_sizes: list[int],
         backend_name: str = "auto", precision: str = "auto", components: tuple[str, ...] | None = None,
         cfg: str = "cfg", device: str | None = None, prompt_chunks: tuple[int, ...] = (1,)) -> list[BuildJob]:
    """Every engine the request asks for, each marked with whether it already exists and is valid.

    ``components``: names of the model family's components (default: all of them).
    ``prompt_chunks``: UNet engines are built for prompts of each of these many 75-token chunks
    (text length 77 per chunk); longer prompts run eagerly unless their length has an engine.
    """
    backend = get_backend(resolve_backend(backend_name))
    device = device or default_build_device(backend.name)
    precision = resolve_precision(backend.name, precision, device)
    backend.check_precision(precision, device)
    info = device_info(device)
    scale = model.info.vae_scale_factor
    jobs, seen = [], set()
    descriptors = [get_component(name, model.info) for name in (components or model.family.components())]
    for width, height in resolutions:
        for batch_size in batch_sizes:
            for component in descriptors:
                batches = unet_batches(batch_size, cfg) if component.guided else [component.fixed_batch or batch_size]
                lengths = component.text_lengths(model.info, prompt_chunks)
                for batch, text_length in ((b, t) for b in batches for t in lengths):
                    shape = Shape(height // scale, width // scale, batch, text_length)
                    if (component.name, shape) in seen:
                        continue
                    seen.add((component.name, shape))
                    component_precision = component.build_precision(model.info, precision)
                    key = EngineKey(model.name, model.fingerprint, component.name, component_precision, backend.name,
                                    backend.version(), device_tag(info), shape, scale)
                    job = BuildJob(component, shape, backend, component_precision, device, key,
                                   engine_paths(engine_dir, key))
                    job.skip_reason = existing_engine(job, device_fingerprint(info))
                    jobs.append(job)
    return jobs


def existing_engine(job: BuildJob, device_fp: str) -> str:
    """"valid engine exists" when the job's engine is already built and its manifest matches, else ""."""
    if not job.paths.manifest.is_file():
        return ""
    try:
        record = parse_manifest(job.paths.manifest)
    except ValueError:
        return ""
    versions = {job.backend.name: job.backend.version()}
    if EngineRegistry.unusable_reason(record, job.key.fingerprint, device_fp, versions) is None \
            and record.engine_path.stat().st_size == record.manifest.get("engine_bytes"):
        return "valid engine exists"
    return ""


def build(job: BuildJob, model: LoadedModel, engine_dir: Path,
          on_stage: Callable[[str], None] = lambda stage: None) -> BuildResult:
    """Export (cached), compile, validate against PyTorch, then move the engine and manifest into place.

    ``model`` is the fp32 CPU model that exports and reference outputs come from.
    """
    if job.skip_reason:
        return BuildResult(job, "skipped", error=job.skip_reason)
    with _current_device(job.device):
        return _build(job, model, engine_dir, on_stage)


def _current_device(device: str):
    """Make ``device`` current while building: TensorRT and AOTInductor build and time on the current GPU."""
    return torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext()


def _build(job: BuildJob, model: LoadedModel, engine_dir: Path, on_stage: Callable[[str], None]) -> BuildResult:
    start = time.perf_counter()
    onnx_path, export_record = None, None
    if job.backend.builds_from == "onnx":
        on_stage("export")
        onnx_path, export_record = export_component(model, job.component, engine_dir, shape=job.shape)
    on_stage("build")
    folder = job.paths.engine.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        input_shapes = job.component.input_shapes(model.info, job.shape)
        build_start = time.perf_counter()
        if onnx_path is not None:
            written = job.backend.build(onnx_path, input_shapes, job.component.free_dimensions(model.info, job.shape),
                                        job.precision, tmp / job.paths.engine.name, job.device, cache_dir=folder)
        else:
            written = job.backend.build_from_module(
                job.component.export_module(model), job.component.sample_inputs(model.info, job.shape, seed=1),
                job.precision, tmp / job.paths.engine.name, job.device, cache_dir=folder)
        build_seconds = time.perf_counter() - build_start
        on_stage("validate")
        rel_l2 = validate_engine(job, model, written[0])
        tolerance = ENGINE_TOLERANCE[job.precision]
        if rel_l2 > tolerance:
            raise EngineBuildError(f"{job.label}: engine output differs from PyTorch by relative L2 "
                                   f"{rel_l2:.2e} > {tolerance:.0e}; not installed")
        manifest = _manifest(job, model, written, input_shapes, build_seconds, rel_l2,
                             export_record.rel_l2 if export_record else None)
        for path in reversed(written):  # data files before the engine that names them
            path.replace(folder / path.name)
        _write_json_atomic(job.paths.manifest, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s engine %s in %.1fs (rel L2 %.2e)", job.backend.name, job.label,
             time.perf_counter() - start, rel_l2)
    return BuildResult(job, "built", time.perf_counter() - start, manifest["total_bytes"], rel_l2,
                       export_seconds=export_record.seconds if export_record else 0.0, manifest=manifest)


def validate_engine(job: BuildJob, model: LoadedModel, engine_path: Path, seed: int = 2) -> float:
    """Relative L2 between the engine and eager PyTorch fp32 at the engine's exact shape."""
    inputs = job.component.sample_inputs(model.info, job.shape, seed=seed)
    with torch.inference_mode():
        expected = job.component.export_module(model)(**inputs)
    runner = job.backend.load(engine_path, job.component.input_shapes(model.info, job.shape),
                              job.component.output_name, job.device)
    with runner:
        actual = runner(**{name: value.to(job.device) for name, value in inputs.items()})
    return relative_l2(actual.float().cpu(), expected)


def _manifest(job: BuildJob, model: LoadedModel, files: list[Path], input_shapes: dict, build_seconds: float,
              rel_l2: float, export_rel_l2: float | None) -> dict:
    info = device_info(job.device)
    return {
        "format": MANIFEST_FORMAT,
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "component": job.component.name,
        "backend": job.backend.name,
        "backend_version": job.backend.version(),
        "precision": job.precision,
        "device": info,
        "device_fingerprint": device_fingerprint(info),
        "shape": asdict(job.shape),
        "resolution": job.key.resolution,
        "input_shapes": {name: list(dims) for name, dims in input_shapes.items()},
        "output_name": job.component.output_name,
        "engine_file": job.paths.engine.name,
        "engine_bytes": files[0].stat().st_size,  # checked against the file to catch truncation
        "total_bytes": sum(f.stat().st_size for f in files),  # with external weights
        "build_seconds": round(build_seconds, 2),
        "validation": {"rel_l2": rel_l2, "tolerance": ENGINE_TOLERANCE[job.precision],
                       "export_rel_l2": export_rel_l2},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dts_util_version": __version__,
        "torch_version": torch.__version__,
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
