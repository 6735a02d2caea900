"""The ``dts-util`` command line.

Each command parses its options, sets up logging, and only then imports the
heavy implementation (torch, diffusers, onnxruntime), so ``dts-util --help``
and the client commands start fast. User errors print one line and exit 1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dts_util import __version__
from dts_util.config import BUILTIN_MODEL_NAME, DEFAULT_PORT, default_engine_dir, default_model_dir

app = typer.Typer(help="dts-util: a Draw Things gRPC image-generation server with compiled engines.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
engines_app = typer.Typer(help="Manage built engines (list, remove).", no_args_is_help=True)
app.add_typer(engines_app, name="engines")
err = Console(stderr=True)
# soft_wrap: long lines (hashes, paths) stay whole when piped into files and scripts.
out = Console(soft_wrap=True)

SERVE, BUILD, CLIENT = "Serve", "Build", "Client"
HostOpt = Annotated[str, typer.Option(help="Server host to connect to.", rich_help_panel=CLIENT)]
PortOpt = Annotated[int, typer.Option(help="Server port.", rich_help_panel=CLIENT)]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the server's answer.", rich_help_panel=CLIENT)]
ModelDirOpt = Annotated[Optional[Path], typer.Option(
    "--model-path", help="Model store folder [default: $DTS_MODEL_DIR or the user data dir].", show_default=False)]
EngineDirOpt = Annotated[Optional[Path], typer.Option(
    help="Engine cache folder [default: $DTS_ENGINE_DIR, engines/ of a checkout, or the user cache dir].",
    show_default=False)]


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"


def _setup_logging(level: LogLevel, rich: bool) -> None:
    if rich:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, rich_tracebacks=True, show_path=False)
        fmt = "%(message)s"
    else:  # the server's logs stay plain text, one line per record, for files and journald
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level.value.upper(), handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_table(table) -> None:
    """Tables print at full width when piped, instead of being cut to 80 columns."""
    (out if out.is_terminal else Console(width=240)).print(table)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


def _rpc_error(exc: Exception, target: str) -> typer.Exit:
    import grpc

    if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
        return _fail(f"nothing is listening at {target} (start it with `dts-util serve`)")
    if isinstance(exc, grpc.RpcError):
        return _fail(f"{exc.code().name}: {exc.details()}")
    return _fail(str(exc))


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        out.print(f"dts-util {__version__}")
        raise typer.Exit()


@app.command()
def serve(
    address: Annotated[str, typer.Option(help="Address to listen on.", rich_help_panel=SERVE)] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.", rich_help_panel=SERVE)] = DEFAULT_PORT,
    model_path: ModelDirOpt = None,
    engine_dir: EngineDirOpt = None,
    default_model: Annotated[str, typer.Option(help="Model used when a request names none.",
                                               rich_help_panel=SERVE)] = BUILTIN_MODEL_NAME,
    device: Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda, cuda:1 ...",
                                        rich_help_panel=SERVE)] = "auto",
    max_queue: Annotated[int, typer.Option(help="Generations allowed to wait behind the running one.",
                                           rich_help_panel=SERVE)] = 8,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest file UploadFile accepts.",
                                                  rich_help_panel=SERVE)] = 16 * 1024**3,
    engines: Annotated[bool, typer.Option(help="Use built engines where they match a request.",
                                          rich_help_panel=BUILD)] = True,
    build_missing: Annotated[bool, typer.Option(help="Build engines in the background for requested shapes "
                                                     "that had none.", rich_help_panel=BUILD)] = False,
    torch_compile: Annotated[bool, typer.Option(help="torch.compile the eager UNet (CUDA graphs on GPU).",
                                                rich_help_panel=BUILD)] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Log verbosity.")] = LogLevel.info,
) -> None:
    """Start the gRPC server (drawthings.ImageGenerationService) and serve until Ctrl-C / SIGTERM."""
    _setup_logging(log_level, rich=False)
    import asyncio

    from dts_util.config import ServerConfig
    from dts_util.errors import DtsError
    from dts_util.grpc.server import serve as run_server
    from dts_util.service import ImageService

    try:
        config = ServerConfig(
            model_dir=model_path or default_model_dir(), engine_dir=engine_dir or default_engine_dir(),
            default_model=default_model, address=address, port=port, max_queue=max_queue,
            max_upload_bytes=max_upload_bytes, device=device, build_missing=build_missing,
            torch_compile=torch_compile)
    except ValueError as exc:
        raise _fail(str(exc))
    manager = None
    if engines:
        from dts_util.engines.manager import EngineManager

        manager = EngineManager(config.engine_dir, build_missing=build_missing)
    try:
        asyncio.run(run_server(config, ImageService(config, manager)))
    except (DtsError, OSError) as exc:
        raise _fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command()
def test(host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 5.0) -> None:
    """Check a running server: calls Echo and exits 0 only when it answers HELLO."""
    from dts_util.client import Client

    target = f"{host}:{port}"
    try:
        with Client(target, timeout) as client:
            reply = client.echo()
    except Exception as exc:  # grpc.RpcError and friends: report, don't trace
        raise _rpc_error(exc, target)
    if reply.message != "HELLO":
        raise _fail(f"server at {target} answered {reply.message!r} instead of 'HELLO'")
    out.print(f"[bold green]OK[/] server at {target} answered HELLO (dts-util {reply.server_version or '?'})")
    out.print(f"models: {', '.join(reply.models) or 'none'}; default: {reply.default_model or '?'}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative_prompt: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    width: Annotated[int, typer.Option(help="Width (0 = model's native size).")] = 0,
    height: Annotated[int, typer.Option(help="Height (0 = model's native size).")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps (0 = 20).")] = 0,
    cfg_scale: Annotated[float, typer.Option(help="Guidance scale (0 = 7; <= 1 disables CFG).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed (-1 = random); image i uses seed + i.")] = -1,
    sampler: Annotated[str, typer.Option(help="Sampler name, e.g. 'Euler a' ('' = DPM++ 2M Karras).")] = "",
    batch_size: Annotated[int, typer.Option(help="Images per pass.")] = 1,
    batch_count: Annotated[int, typer.Option(help="Number of passes.")] = 1,
    enable_hr: Annotated[bool, typer.Option("--hires", help="High-res fix: upscale and refine.")] = False,
    hr_scale: Annotated[float, typer.Option(help="High-res upscale factor (0 = 2).")] = 0.0,
    denoising_strength: Annotated[float, typer.Option(help="High-res second-pass strength (0 = 0.7).")] = 0.0,
    model: Annotated[str, typer.Option(help="Model name ('' = server default).")] = "",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("out"),
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Generate images on a running server and write them as PNGs; prints the generation info."""
    from dts_util.client import Client

    target = f"{host}:{port}"
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                  cfg_scale=cfg_scale, seed=seed, sampler=sampler, batch_size=batch_size,
                  batch_count=batch_count, enable_hr=enable_hr, hr_scale=hr_scale,
                  denoising_strength=denoising_strength, model=model)
    try:
        with Client(target, timeout) as client, err.status("generating…"):
            reply = client.generate(**fields)
    except Exception as exc:
        raise _rpc_error(exc, target)
    info = json.loads(reply.info)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, image_seed in zip(reply.images, info["seeds"]):
        path = out_dir / f"{image_seed}.png"
        path.write_bytes(image)
        out.print(f"wrote {path}")
    out.print_json(data=info)


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="Local file to upload.", exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option("--as", help="Name in the model store [default: file name].",
                                                show_default=False)] = None,
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 3600.0,
) -> None:
    """Upload a file into the server's model store (checked by size and SHA-256)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from dts_util.client import Client

    target = f"{host}:{port}"
    try:
        with Client(target, timeout) as client, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
            reply = client.upload(path, name or path.name, lambda n: progress.advance(task, n))
    except Exception as exc:
        raise _rpc_error(exc, target)
    out.print(reply.message)


@app.command("files-exist")
def files_exist(
    names: Annotated[list[str], typer.Argument(help="Paths relative to the model store.")],
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 10.0,
) -> None:
    """Ask the server whether files exist in its model store. Exits 1 if any is missing or invalid."""
    from dts_util.client import Client

    target = f"{host}:{port}"
    try:
        with Client(target, timeout) as client:
            reply = client.files_exist(names)
    except Exception as exc:
        raise _rpc_error(exc, target)
    for name, exists, error in zip(reply.files, reply.exists, reply.errors):
        verdict = f"[red]invalid[/]: {error}" if error else ("[green]exists[/]" if exists else "[yellow]missing[/]")
        out.print(f"{name}: {verdict}", highlight=False)
    if not all(reply.exists):
        raise typer.Exit(code=1)


class BackendChoice(str, Enum):
    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"


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
    vae_decoder = "vae_decoder"


def _open_model(model: str, model_path: Optional[Path], engine_dir: Path):
    """The fp32 CPU model exports come from (the built-in one is created if it is the one asked for)."""
    from dts_util.engines.paths import fingerprint_cache
    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.loader import load_model
    from dts_util.models.store import ModelStore

    store = ModelStore(model_path or default_model_dir())
    if model == BUILTIN_MODEL_NAME:
        ensure_builtin_model(store)
    return load_model(model, store.require_model(model), "cpu", fingerprint_cache=fingerprint_cache(engine_dir))


@app.command("build-engines")
def build_engines(
    model: Annotated[str, typer.Option(help="Model to build engines for.", rich_help_panel=BUILD)] = BUILTIN_MODEL_NAME,
    resolution: Annotated[Optional[list[str]], typer.Option(
        help="WIDTHxHEIGHT; repeat for several [default: the model's native size].", rich_help_panel=BUILD,
        show_default=False)] = None,
    batch_size: Annotated[list[int], typer.Option(help="Images per pass; repeatable. The UNet is built at 2x "
                                                       "this with CFG.", rich_help_panel=BUILD)] = [1],
    backend: Annotated[BackendChoice, typer.Option(help="auto = tensorrt with a CUDA GPU, else onnxruntime.",
                                                   rich_help_panel=BUILD)] = BackendChoice.auto,
    precision: Annotated[PrecisionChoice, typer.Option(help="auto = fp16 for tensorrt, fp32 for onnxruntime.",
                                                       rich_help_panel=BUILD)] = PrecisionChoice.auto,
    component: Annotated[Optional[list[ComponentChoice]], typer.Option(
        help="Components to build; repeatable [default: unet and vae_decoder].", rich_help_panel=BUILD,
        show_default=False)] = None,
    cfg: Annotated[CfgChoice, typer.Option(help="UNet batches for guided (cfg_scale > 1), unguided, or both.",
                                           rich_help_panel=BUILD)] = CfgChoice.cfg,
    dry_run: Annotated[bool, typer.Option(help="Print the plan; build nothing.", rich_help_panel=BUILD)] = False,
    engine_dir: EngineDirOpt = None,
    model_path: ModelDirOpt = None,
) -> None:
    """Export a model's UNet and VAE decoder to ONNX and build one engine per resolution and batch."""
    _setup_logging(LogLevel.warning, rich=True)
    from dts_util.engines.builder import parse_resolution, plan
    from dts_util.errors import DtsError

    engines = engine_dir or default_engine_dir()
    try:
        loaded = _open_model(model, model_path, engines)
        sizes = [parse_resolution(r) for r in resolution] if resolution else \
            [(loaded.info.native_size, loaded.info.native_size)]
        components = tuple(c.value for c in component) if component else ("unet", "vae_decoder")
        with err.status("fingerprinting model weights…"):
            jobs = plan(loaded, engines, sizes, batch_size, backend.value, precision.value, components, cfg.value)
    except DtsError as exc:
        raise _fail(str(exc))
    if dry_run:
        for job in jobs:
            out.print(f"{job.label}: {job.skip_reason or 'to build'} -> {job.paths.engine}", highlight=False)
        return
    results = _run_builds(jobs, loaded, engines)
    _print_build_table(results, engines)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(code=1)


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
        table.add_row(job.spec.name, job.key.resolution, str(job.shape.batch), job.backend.name, job.precision,
                      f"{r.engine_bytes / 1e6:.1f}" if r.engine_bytes else "-",
                      f"{r.seconds:.1f}" if r.seconds else "-",
                      f"{r.rel_l2:.1e}" if r.rel_l2 is not None else "-", status)
    _print_table(table)


@engines_app.command("list")
def engines_list(engine_dir: EngineDirOpt = None, model_path: ModelDirOpt = None) -> None:
    """List built engines and whether each is usable on this machine."""
    from rich.table import Table

    from dts_util.engines.inventory import engine_status

    engines = engine_dir or default_engine_dir()
    rows = engine_status(engines, model_path or default_model_dir())
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
                      "[green]usable[/]" if status is None else f"[yellow]stale[/]: {status}")
    _print_table(table)


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
        raise _fail("say which engines to remove: --model, --resolution, --component, --stale or --all")
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
        out.print(f"removed {removed} ONNX export(s)")


SYSTEMD_UNIT = """[Unit]
Description=dts-util Draw Things gRPC server
After=network-online.target

[Service]
ExecStart={exe} serve --port {port} --model-path {model_dir} --engine-dir {engine_dir}
Restart=on-failure

[Install]
WantedBy=default.target
"""


@app.command()
def install(
    port: Annotated[int, typer.Option(help="Port the installed server listens on.")] = DEFAULT_PORT,
    model_path: ModelDirOpt = None,
    engine_dir: EngineDirOpt = None,
    service: Annotated[bool, typer.Option(help="Install and start a systemd user service.")] = True,
) -> None:
    """Prepare the model store (with the built-in model) and install a systemd user service for `serve`."""
    _setup_logging(LogLevel.info, rich=True)
    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.store import ModelStore

    model_dir, engines = (model_path or default_model_dir()).resolve(), (engine_dir or default_engine_dir()).resolve()
    with err.status("creating the built-in model…"):
        folder = ensure_builtin_model(ModelStore(model_dir))
    engines.mkdir(parents=True, exist_ok=True)
    out.print(f"model store: {model_dir} (built-in model at {folder.name}/)\nengine dir: {engines}")
    if not service:
        out.print(f"run the server with: dts-util serve --port {port} --model-path {model_dir}")
        return
    exe = shutil.which("dts-util") or f"{sys.executable} -m dts_util"
    unit = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd/user/dts-util.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(SYSTEMD_UNIT.format(exe=exe, port=port, model_dir=model_dir, engine_dir=engines))
    out.print(f"wrote {unit}")
    if shutil.which("systemctl") is None:
        raise _fail("systemctl is not available here; start the server with "
                    f"`dts-util serve --port {port}` (or pass --no-service)")
    result = subprocess.run(["systemctl", "--user", "enable", "--now", "dts-util.service"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise _fail(f"systemctl could not start the service: {result.stderr.strip()}; "
                    f"start it by hand with `dts-util serve --port {port}`")
    out.print(f"[green]started[/] dts-util.service; check it with `dts-util test --port {port}`")


if __name__ == "__main__":
    app()
