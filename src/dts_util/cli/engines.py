"""Engine commands: build engines for a model, list them, remove them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dts_util.cli.common import (BUILD, EngineDirOpt, LogLevel, ModelDirOpt, app, engines_app, err, fail, out,
                                 print_table, setup_logging)
from dts_util.config import BUILTIN_MODEL_NAME, default_engine_dir, default_model_dir
from dts_util.engines.backends import BACKENDS as _BACKENDS  # a small table, no runtime imports

BackendChoice = Enum("BackendChoice", {name: name for name in ("auto", *_BACKENDS)}, type=str)


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class CfgChoice(str, Enum):
    cfg = "cfg"
    no_cfg = "no-cfg"
    both = "both"


class ComponentChoice(str, Enum):
    unet = "unet"
    transformer = "transformer"
    vae_decoder = "vae_decoder"
    vae_encoder = "vae_encoder"


def _open_model(model: str, model_path: Optional[Path], engine_dir: Path):
    """The fp32 CPU model exports come from (the built-in one is created if it is the one asked for)."""
    from dts_util.engines.paths import fingerprint_cache
    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.loader import load_model
    from dts_util.models.store import ModelStore

    from dts_util.models.store import prepare_store_folder

    store = ModelStore(prepare_store_folder(model_path or default_model_dir(), create_parents=model_path is None))
    if model == BUILTIN_MODEL_NAME:
        ensure_builtin_model(store)
    name, path = store.canonical_model(model)
    return load_model(name, path, "cpu", fingerprint_cache=fingerprint_cache(engine_dir))


@app.command("build-engines")
def build_engines(
    model: Annotated[str, typer.Option(help="Model to build engines for.", rich_help_panel=BUILD)] = BUILTIN_MODEL_NAME,
    resolution: Annotated[Optional[list[str]], typer.Option(
        help="WIDTHxHEIGHT; repeat for several.", rich_help_panel=BUILD,
        show_default="the model's native size")] = None,
    batch_size: Annotated[list[int], typer.Option(help="Images per pass; repeatable. The UNet is built at 2x "
                                                       "this with CFG.", rich_help_panel=BUILD)] = [1],
    backend: Annotated[BackendChoice, typer.Option(
        help="auto = on a CUDA machine tensorrt where it imports, else aotinductor; on the CPU openvino when "
             "installed, else onnxruntime.",
        rich_help_panel=BUILD)] = BackendChoice.auto,
    precision: Annotated[PrecisionChoice, typer.Option(
        help="auto = fp16 for tensorrt and for aotinductor on CUDA; bf16 for openvino on CPUs with AVX512_BF16 "
             "or AMX; fp32 otherwise.",
        rich_help_panel=BUILD)] = PrecisionChoice.auto,
    component: Annotated[Optional[list[ComponentChoice]], typer.Option(
        help="Components to build; repeatable (unet for SD models, transformer for FLUX).", rich_help_panel=BUILD,
        show_default="the denoiser, vae_decoder and vae_encoder")] = None,
    cfg: Annotated[CfgChoice, typer.Option(help="UNet batches for guided (cfg_scale > 1), unguided, or both.",
                                           rich_help_panel=BUILD)] = CfgChoice.cfg,
    lora: Annotated[Optional[list[str]], typer.Option(
        help="FILE:WEIGHT of a LoRA in the model store to fuse into the UNet engines; repeatable. Requests "
             "with exactly this LoRA set then run on them.", show_default="none", rich_help_panel=BUILD)] = None,
    prompt_chunks: Annotated[str, typer.Option(
        help="UNet text lengths to build, in 75-token prompt chunks, comma-separated (1 = up to 75 tokens, "
             "2 = up to 150, ...).", rich_help_panel=BUILD)] = "1",
    dry_run: Annotated[bool, typer.Option(help="Print the plan; build nothing.", rich_help_panel=BUILD)] = False,
    engine_dir: EngineDirOpt = None,
    model_path: ModelDirOpt = None,
) -> None:
    """Build engines of a model's UNet, VAE decoder and VAE encoder (img2img, inpainting), one per resolution and
    batch (from an ONNX export, or from the torch module for aotinductor), each validated against PyTorch before
    it is installed."""
    setup_logging(LogLevel.warning, rich=True)
    from dts_util.engines.builder import parse_resolution, plan
    from dts_util.errors import DtsError, StartupError

    engines = engine_dir or default_engine_dir()
    try:
        loaded = _open_model(model, model_path, engines)
        sizes = [parse_resolution(r) for r in resolution] if resolution else \
            [(loaded.info.native_size, loaded.info.native_size)]
        components = tuple(c.value for c in component) if component else None
        if lora:
            loaded = loaded.with_loras(_resolve_build_loras(lora, model_path))
            # LoRAs change the denoiser only: the base VAE engines serve them too
            components = (loaded.family.denoiser,)
        with err.status("fingerprinting model weights…"):
            jobs = plan(loaded, engines, sizes, batch_size, backend.value, precision.value, components, cfg.value,
                        prompt_chunks=_parse_chunks(prompt_chunks))
    except (DtsError, StartupError) as exc:
        raise fail(str(exc))
    if dry_run:
        for job in jobs:
            out.print(f"{job.label}: {job.skip_reason or 'to build'} -> {job.paths.engine}", highlight=False)
        return
    results = _run_builds(jobs, loaded, engines)
    _print_build_table(results, engines)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(code=1)


def _resolve_build_loras(specs: list[str], model_path: Optional[Path]) -> tuple:
    from dts_util.errors import InvalidRequest
    from dts_util.models.lora import resolve_loras
    from dts_util.models.store import ModelStore
    from dts_util.pipeline.params import LoraRequest

    requests = []
    for spec in specs:
        name, _, weight = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        try:
            requests.append(LoraRequest(name, float(weight)))
        except ValueError:
            raise InvalidRequest(f"--lora {spec!r}: give FILE:WEIGHT, e.g. loras/style.safetensors:0.8") from None
    return resolve_loras(ModelStore(model_path or default_model_dir()), tuple(requests))


def _parse_chunks(text: str) -> tuple[int, ...]:
    from dts_util.errors import InvalidRequest

    try:
        chunks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        chunks = ()
    if not chunks or not all(1 <= n <= 8 for n in chunks):
        raise InvalidRequest(f"--prompt-chunks {text!r}: give chunk counts in 1..8, comma-separated (e.g. 1,2)")
    return chunks


def _run_builds(jobs, model, engine_dir: Path):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dts_util.engines.builder import BuildResult, build
    from dts_util.errors import DtsError

    results = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=err) as progress:
        overall = progress.add_task("engines", total=len(jobs))
        for job in jobs:
            step = progress.add_task(f"  {job.label}", total=3)
            stages = {"export": 0, "build": 1, "validate": 2}

            def on_stage(stage: str, step=step, job=job) -> None:
                progress.update(step, completed=stages[stage], description=f"  {job.label}: {stage}")

            try:
                result = build(job, model, engine_dir, on_stage)
            except (DtsError, RuntimeError, OSError, ValueError) as exc:
                result = BuildResult(job, "failed", error=str(exc))
            progress.update(step, completed=3, visible=False)
            progress.advance(overall)
            results.append(result)
    return results


def _print_build_table(results, engine_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"engines in {engine_dir}")
    for column in ("component", "resolution", "batch", "backend", "precision", "size MB", "build s",
                   "rel L2", "status"):
        table.add_column(column, justify="right" if column in ("batch", "size MB", "build s", "rel L2") else "left")
    for r in results:
        job = r.job
        status = {"built": "[green]built[/]", "skipped": "[dim]skipped[/] (valid)"}.get(
            r.status, f"[red]failed[/]: {r.error}")
        table.add_row(job.component.name, job.key.resolution, str(job.shape.batch), job.backend.name, job.precision,
                      f"{r.engine_bytes / 1e6:.1f}" if r.engine_bytes else "-",
                      f"{r.seconds:.1f}" if r.seconds else "-",
                      f"{r.rel_l2:.1e}" if r.rel_l2 is not None else "-", status)
    print_table(table)
    out.print(f"peak memory of this build (export included): {_peak_rss_mb():.0f} MB", highlight=False)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (what an export or build needed at most)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@engines_app.command("list")
def engines_list(engine_dir: EngineDirOpt = None, model_path: ModelDirOpt = None) -> None:
    """List built engines and whether each is usable on this machine."""
    from rich.table import Table

    from dts_util.engines.inventory import engine_status

    from dts_util.engines.manager import failed_builds

    engines = engine_dir or default_engine_dir()
    rows = engine_status(engines, model_path or default_model_dir())
    failures = failed_builds(engines)
    for failure in failures:  # background builds (serve --build-missing) that failed, newest record per engine
        err.print(f"[red]failed build[/] {failure.get('model')} {failure.get('label')} at {failure.get('at')}: "
                  f"{str(failure.get('error', ''))[:300]}", highlight=False)
    if not rows:
        out.print(f"no engines in {engines}; build some with `dts-util build-engines`")
        return
    table = Table(title=f"engines in {engines}")
    for column in ("model", "component", "resolution", "batch", "backend", "precision", "size MB", "rel L2",
                   "status"):
        table.add_column(column)
    for record, status in rows:
        m = record.manifest
        size_mb = m.get("total_bytes", m.get("engine_bytes", 0)) / 1e6
        table.add_row(m["model"], m["component"], m.get("resolution", "?"), str(m["shape"]["batch"]),
                      f"{m['backend']} {m['backend_version']}", m["precision"], f"{size_mb:.1f}",
                      f"{m.get('validation', {}).get('rel_l2', 0):.1e}",
                      _engine_verdict(status))
    print_table(table)


def _engine_verdict(status: Optional[str]) -> str:
    if status is None:
        return "[green]usable[/]"
    if status.startswith("engine file is unreadable"):
        return f"[red]unreadable[/]: {status}"
    if status.startswith("engine file is missing"):
        return f"[red]missing[/]: {status}"
    return f"[yellow]stale[/]: {status}"


@engines_app.command("rm")
def engines_rm(
    model: Annotated[Optional[str], typer.Option(help="Only engines of this model.")] = None,
    resolution: Annotated[Optional[str], typer.Option(help="Only engines at WIDTHxHEIGHT.")] = None,
    component: Annotated[Optional[ComponentChoice], typer.Option(help="Only this component.")] = None,
    stale: Annotated[bool, typer.Option(help="Only engines not usable on this machine.")] = False,
    all_engines: Annotated[bool, typer.Option("--all", help="Every engine (and ONNX export).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    engine_dir: EngineDirOpt = None,
    model_path: ModelDirOpt = None,
) -> None:
    """Remove engines (engine file, data file and manifest) selected by the filters."""
    from dts_util.engines.inventory import engine_status, remove_engine, remove_exports

    if not (model or resolution or component or stale or all_engines):
        raise fail("say which engines to remove: --model, --resolution, --component, --stale or --all")
    engines = engine_dir or default_engine_dir()
    chosen = [record for record, status in engine_status(engines, model_path or default_model_dir())
              if (model is None or record.model == model)
              and (resolution is None or record.manifest.get("resolution") == resolution)
              and (component is None or record.component == component.value)
              and (not stale or status is not None)]
    if not chosen and not all_engines:
        out.print("no engines match")
        return
    if not yes and not typer.confirm(f"remove {len(chosen)} engine(s) from {engines}?"):
        raise typer.Exit(code=1)
    for record in chosen:
        remove_engine(record)
        out.print(f"removed {record.engine_path.name}")
    if all_engines:
        removed = remove_exports(engines, model)
        out.print(f"removed {removed} ONNX export and backend cache folder(s)")
