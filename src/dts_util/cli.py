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

# gRPC's core logs TLS handshake details at INFO by default; users see our one-line errors instead.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from dts_util import __version__, limits
from dts_util.config import BUILTIN_MODEL_NAME, DEFAULT_PORT, default_engine_dir, default_model_dir

app = typer.Typer(help="dts-util: a Draw Things gRPC image-generation server with compiled engines.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
engines_app = typer.Typer(help="Manage built engines (list, remove).", no_args_is_help=True)
app.add_typer(engines_app, name="engines")
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
# soft_wrap: long lines (hashes, paths) stay whole when piped into files and scripts.
out = Console(soft_wrap=True)

SERVE, BUILD, CLIENT = "Serve", "Build", "Client"
HostOpt = Annotated[str, typer.Option(help="Server host to connect to.", rich_help_panel=CLIENT)]

PortOpt = Annotated[int, typer.Option(help="Server port.", rich_help_panel=CLIENT)]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the server's answer.", rich_help_panel=CLIENT)]
TokenOpt = Annotated[Optional[str], typer.Option(
    help="Bearer token for a server that needs one. Prefer $DTS_AUTH_TOKEN or --token-file: argv is visible "
         "to other users.", envvar="DTS_AUTH_TOKEN", show_envvar=True, show_default="none",
    rich_help_panel=CLIENT)]
TokenFileOpt = Annotated[Optional[Path], typer.Option(help="File holding the bearer token.", show_default="none",
                                                      rich_help_panel=CLIENT)]
TlsOpt = Annotated[bool, typer.Option(help="Connect with TLS (implied by --ca and --client-cert).",
                                      rich_help_panel=CLIENT)]
CaOpt = Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) that signed the server's certificate.",
                                               show_default="the system's trusted CAs", rich_help_panel=CLIENT)]
ClientCertOpt = Annotated[Optional[Path], typer.Option(help="Client certificate (PEM) for mutual TLS.",
                                                       show_default="none", rich_help_panel=CLIENT)]
ClientKeyOpt = Annotated[Optional[Path], typer.Option(help="Key (PEM) of --client-cert.", show_default="none",
                                                      rich_help_panel=CLIENT)]
ModelDirOpt = Annotated[Optional[Path], typer.Option(
    "--model-path", help="Model store folder.", show_default="$DTS_MODEL_DIR or the user data dir")]
EngineDirOpt = Annotated[Optional[Path], typer.Option(
    help="Engine cache folder.", show_default="$DTS_ENGINE_DIR, engines/ of a checkout, or the user cache dir")]


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

    from dts_util.client import explain_rpc_error

    if isinstance(exc, grpc.RpcError):
        return _fail(explain_rpc_error(exc, target))
    return _fail(str(exc))


def _client(host: str, port: int, timeout: float, token: Optional[str], token_file: Optional[Path], tls: bool,
            ca: Optional[Path], client_cert: Optional[Path], client_key: Optional[Path]):
    """A connected client for the client commands; bad token or TLS files are one-line errors."""
    from dts_util.client import Client, Security
    from dts_util.errors import StartupError
    from dts_util.security.tokens import read_token_file

    if (client_cert is None) != (client_key is None):
        raise _fail("mutual TLS needs both --client-cert and --client-key")
    try:
        if token_file is not None:
            token = read_token_file(token_file)
        security = Security(token=(token or "").strip(), tls=tls, ca=ca, client_cert=client_cert,
                            client_key=client_key)
        return Client(f"{host}:{port}", timeout, security)
    except (StartupError, OSError) as exc:
        raise _fail(str(exc))


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        out.print(f"dts-util {__version__}")
        raise typer.Exit()


SECURITY, LIMITS = "Security", "Limits"


@app.command()
def serve(
    address: Annotated[Optional[str], typer.Option(
        help="Address to listen on. Without a token only loopback is allowed, unless --no-auth.",
        show_default="0.0.0.0 with a token, 127.0.0.1 without", rich_help_panel=SERVE)] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.", rich_help_panel=SERVE)] = DEFAULT_PORT,
    model_path: ModelDirOpt = None,
    engine_dir: EngineDirOpt = None,
    default_model: Annotated[str, typer.Option(help="Model used when a request names none.",
                                               rich_help_panel=SERVE)] = BUILTIN_MODEL_NAME,
    devices: Annotated[str, typer.Option(
        "--devices", "--device", help="Where generations run, one worker per device: auto (every CUDA GPU, else "
        "the CPU), cpu, or a list such as cuda:0,cuda:1.", rich_help_panel=SERVE)] = "auto",
    dtype: Annotated[str, typer.Option(help="Eager weights: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16, "
                                            "or bf16 (CPUs with AVX512_BF16/AMX: about 2x fp32).",
                                       rich_help_panel=SERVE)] = "auto",
    metrics_port: Annotated[int, typer.Option(help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics "
                                                    "(0 = off).", rich_help_panel=SERVE)] = 0,
    metrics_address: Annotated[str, typer.Option(help="Address of the metrics endpoint (unauthenticated: keep it "
                                                      "private).", rich_help_panel=SERVE)] = "127.0.0.1",
    advertise: Annotated[bool, typer.Option(
        help="Announce the server over mDNS (_dt-grpc._tcp) so the Draw Things app lists it.",
        rich_help_panel=SERVE)] = False,
    advertise_name: Annotated[str, typer.Option(help="Name the Draw Things app shows for this server.",
                                                show_default="the host name", rich_help_panel=SERVE)] = "",
    png_compression: Annotated[str, typer.Option(
        help="PNG encoding: fast (fpng, lossless, about 10x zlib's speed) or a zlib level 0-9 (smaller files).",
        rich_help_panel=SERVE)] = "fast",
    max_queue: Annotated[int, typer.Option(help="Generations allowed to wait behind the running one.",
                                           rich_help_panel=LIMITS)] = 8,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest file UploadFile accepts, in bytes.",
                                                  rich_help_panel=LIMITS)] = limits.DEFAULT_MAX_UPLOAD_BYTES,
    max_store_bytes: Annotated[int, typer.Option(help="Total size uploads may fill the model store to, in bytes "
                                                      "(0 = no quota).", rich_help_panel=LIMITS)] = 0,
    min_free_disk: Annotated[int, typer.Option(help="Free disk space, in bytes, that uploads must leave.",
                                               rich_help_panel=LIMITS)] = limits.DEFAULT_MIN_FREE_DISK_BYTES,
    max_concurrent_uploads: Annotated[int, typer.Option(help="Uploads allowed at once.", rich_help_panel=LIMITS)]
    = limits.DEFAULT_MAX_CONCURRENT_UPLOADS,
    upload_idle_timeout: Annotated[float, typer.Option(help="Seconds an upload may send nothing before it is "
                                                            "aborted.", rich_help_panel=LIMITS)]
    = limits.DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
    max_loaded_models: Annotated[int, typer.Option(help="Models kept in memory at once (least recently used go "
                                                        "first).", rich_help_panel=LIMITS)]
    = limits.DEFAULT_MAX_LOADED_MODELS,
    auth_token_file: Annotated[Optional[Path], typer.Option(
        help="File (mode 0600) holding the bearer token clients must send; else $DTS_AUTH_TOKEN.",
        show_default="none", rich_help_panel=SECURITY)] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Listen beyond loopback without a token (a trusted "
                                                            "network only).", rich_help_panel=SECURITY)] = False,
    tls_cert: Annotated[Optional[Path], typer.Option(help="Server certificate (PEM); see `dts-util tls init`.",
                                                     show_default="none: plaintext", rich_help_panel=SECURITY)] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Key (PEM) of --tls-cert.", show_default="none",
                                                    rich_help_panel=SECURITY)] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(
        help="CA (PEM) whose client certificates are required (mutual TLS).", show_default="none",
        rich_help_panel=SECURITY)] = None,
    engines: Annotated[bool, typer.Option(help="Use built engines where they match a request.",
                                          rich_help_panel=BUILD)] = True,
    build_missing: Annotated[bool, typer.Option(help="Build engines in the background for requested shapes "
                                                     "that had none.", rich_help_panel=BUILD)] = False,
    torch_compile: Annotated[bool, typer.Option(
        help="torch.compile the eager UNet (CUDA graphs on GPU); compiled kernels are cached in the engine dir, "
             "and the --compile-resolution shapes are compiled before health says SERVING.",
        rich_help_panel=BUILD)] = False,
    compile_resolution: Annotated[Optional[list[str]], typer.Option(
        help="WIDTHxHEIGHT to compile at start-up with --torch-compile; repeatable.",
        show_default="the default model's native size", rich_help_panel=BUILD)] = None,
    channels_last: Annotated[bool, typer.Option(
        help="Eager UNet and VAE in channels-last layout (faster convolutions on some GPUs).",
        rich_help_panel=BUILD)] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Log verbosity.")] = LogLevel.info,
) -> None:
    """Start the gRPC server (drawthings.ImageGenerationService, and the Draw Things app's
    ImageGenerationService on the same port) and serve until Ctrl-C / SIGTERM."""
    _setup_logging(log_level, rich=False)
    import asyncio

    from dts_util.config import ADDRESS_WITH_AUTH, LOOPBACK_ADDRESS, ServerConfig
    from dts_util.errors import DtsError, StartupError
    from dts_util.models.store import prepare_store_folder
    from dts_util.security.tokens import server_token

    try:
        token = server_token(auth_token_file)
        store = prepare_store_folder(model_path or default_model_dir(), create_parents=model_path is None)
        config = ServerConfig(
            model_dir=store, engine_dir=engine_dir or default_engine_dir(), default_model=default_model,
            address=address or (ADDRESS_WITH_AUTH if token or no_auth else LOOPBACK_ADDRESS), port=port,
            max_queue=max_queue, max_upload_bytes=max_upload_bytes, max_store_bytes=max_store_bytes,
            min_free_disk_bytes=min_free_disk, max_concurrent_uploads=max_concurrent_uploads,
            upload_idle_timeout=upload_idle_timeout, max_loaded_models=max_loaded_models, device=devices, dtype=dtype,
            png_compression=png_compression, metrics_port=metrics_port, metrics_address=metrics_address,
            build_missing=build_missing, torch_compile=torch_compile, channels_last=channels_last,
            compile_resolutions=_parse_resolutions(compile_resolution), auth_token=token, allow_no_auth=no_auth,
            tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, advertise=advertise,
            advertise_name=advertise_name)
        asyncio.run(_serve(config, engines))
    except (StartupError, DtsError, ValueError) as exc:
        raise _fail(str(exc))
    except OSError as exc:
        raise _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        pass


def _parse_resolutions(texts: Optional[list[str]]) -> tuple[tuple[int, int], ...]:
    if not texts:
        return ()
    from dts_util.engines.builder import parse_resolution

    return tuple(parse_resolution(text) for text in texts)


async def _serve(config, use_engines: bool) -> None:
    from dts_util.grpc.bootstrap import serve as run_server
    from dts_util.workers import WorkerPool

    await run_server(config, WorkerPool.for_devices(config, use_engines))


@app.command()
def test(
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 5.0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, tls: TlsOpt = False, ca: CaOpt = None,
    client_cert: ClientCertOpt = None, client_key: ClientKeyOpt = None,
) -> None:
    """Check a running server: calls Echo and exits 0 only when it answers HELLO."""
    target = f"{host}:{port}"
    try:
        with _client(host, port, timeout, token, token_file, tls, ca, client_cert, client_key) as client:
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
    denoising_strength: Annotated[float, typer.Option(
        "--strength", "--denoising-strength",
        help="How much of an --init-image is repainted, or the high-res second-pass strength, in (0, 1] "
             "(0 = 0.7).")] = 0.0,
    init_image: Annotated[Optional[Path], typer.Option(
        help="Input image (PNG, JPEG or WebP) for img2img; with --mask, inpainting. Width and height default "
             "to its size.", dir_okay=False, show_default="none (txt2img)")] = None,
    mask: Annotated[Optional[Path], typer.Option(
        help="Inpainting mask of the --init-image's size: white is repainted, black kept.", dir_okay=False,
        show_default="none")] = None,
    mask_blur: Annotated[int, typer.Option(help="Blur radius of the mask's edge in pixels (0 = none).")] = 4,
    mask_outset: Annotated[int, typer.Option(
        help="Pixels the repainted area grows by before the blur (negative: shrinks), -64..64.")] = 0,
    seed_mode: Annotated[str, typer.Option(
        help="How the starting noise is drawn from the seed: torch_cpu, scale_alike, nvidia_gpu or legacy (the Draw "
             "Things app's seed modes).")] = "torch_cpu",
    mask_overlay: Annotated[bool, typer.Option(
        help="Inpainting: paste the input back over the kept pixels (--no-mask-overlay: the model's output as "
             "it is).")] = True,
    model: Annotated[str, typer.Option(help="Model name ('' = server default).")] = "",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("out"),
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT,
    timeout: TimeoutOpt = 600.0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, tls: TlsOpt = False, ca: CaOpt = None,
    client_cert: ClientCertOpt = None, client_key: ClientKeyOpt = None,
) -> None:
    """Generate images on a running server and write them as PNGs; prints the generation info.

    With --init-image: image to image; with --mask as well: inpainting."""
    target = f"{host}:{port}"
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                  cfg_scale=cfg_scale, seed=seed, sampler=sampler, batch_size=batch_size,
                  batch_count=batch_count, enable_hr=enable_hr, hr_scale=hr_scale,
                  denoising_strength=denoising_strength, model=model, seed_mode=seed_mode)
    if mask is not None and init_image is None:
        raise _fail("--mask needs --init-image: inpainting paints into that image")
    if init_image is not None:
        fields.update(init_image=_read_input(init_image, "--init-image", limits.MAX_INIT_IMAGE_BYTES),
                      mask=_read_input(mask, "--mask", limits.MAX_MASK_BYTES) if mask else b"",
                      mask_blur=mask_blur if mask else 0, mask_outset=mask_outset if mask else 0,
                      skip_mask_overlay=not mask_overlay)
    try:
        with _client(host, port, timeout, token, token_file, tls, ca, client_cert, client_key) as client:
            images, info_text = _generate_with_progress(client, fields)
    except Exception as exc:
        raise _rpc_error(exc, target)
    info = json.loads(info_text)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, image_seed in zip(images, info["seeds"]):
        path = out_dir / f"{image_seed}.png"
        path.write_bytes(image)
        out.print(f"wrote {path}")
    out.print_json(data=info)


def _read_input(path: Path, option: str, max_bytes: int) -> bytes:
    """An input image's bytes, refused here when the server would refuse them for their size."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"{option} {path}: {exc.strerror or exc}")
    if len(data) > max_bytes:
        raise _fail(f"{option} {path} has {len(data)} bytes; the server takes at most {max_bytes} (send a smaller "
                    "image, or JPEG/WebP)")
    return data


def _generate_with_progress(client, fields: dict) -> tuple[list[bytes], str]:
    """Generate through the streaming RPC with a progress bar (any size arrives, in pieces); a server
    without it gets the unary call."""
    import grpc
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("encoding the prompt", total=None)

        def on_event(event: dict, preview: bytes) -> None:
            name = event.get("event", "")
            if "total" in event:
                label = "second pass" if name == "secondPassSampling" else "sampling"
                progress.update(task, description=label, completed=event.get("step", 0), total=event["total"])
            elif name in ("imageDecoded", "secondPassImageDecoded"):
                progress.update(task, description="decoding")
            elif name == "imageEncoded":
                progress.update(task, description="encoding the image")

        try:
            return client.generate_stream(on_event=on_event, **fields)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
    reply = client.generate(**fields)
    return list(reply.images), reply.info


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="Local file to upload.", exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option("--as", help="Name in the model store.",
                                                show_default="the file's name")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different file of the same name on the server.")] = False,
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 3600.0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, tls: TlsOpt = False, ca: CaOpt = None,
    client_cert: ClientCertOpt = None, client_key: ClientKeyOpt = None,
) -> None:
    """Upload a file into the server's model store (checked by size and SHA-256)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    target = f"{host}:{port}"
    try:
        with _client(host, port, timeout, token, token_file, tls, ca, client_cert, client_key) as client, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
            reply = client.upload(path, name or path.name, lambda n: progress.advance(task, n), overwrite)
    except Exception as exc:
        raise _rpc_error(exc, target)
    out.print(reply.message)


@app.command()
def samplers() -> None:
    """List the sampler names requests may send (A1111 and Draw Things spellings) and what each runs."""
    from rich.table import Table

    from dts_util.pipeline.samplers import SAMPLERS

    table = Table("sampler", "Draw Things app", "aliases", "diffusers scheduler", "schedule")
    for sampler in SAMPLERS:
        overrides = ", ".join(f"{key}={value}" for key, value in sampler.config.items())
        table.add_row(sampler.name, sampler.app_name or "-", ", ".join(sampler.aliases) or "-", sampler.scheduler,
                      sampler.schedule or overrides or "the model's spacing")
    _print_table(table)


@app.command("files-exist")
def files_exist(
    names: Annotated[list[str], typer.Argument(help="Paths relative to the model store.")],
    host: HostOpt = "localhost", port: PortOpt = DEFAULT_PORT, timeout: TimeoutOpt = 10.0,
    token: TokenOpt = None, token_file: TokenFileOpt = None, tls: TlsOpt = False, ca: CaOpt = None,
    client_cert: ClientCertOpt = None, client_key: ClientKeyOpt = None,
) -> None:
    """Ask the server whether files exist in its model store. Exits 1 if any is missing or invalid."""
    target = f"{host}:{port}"
    try:
        with _client(host, port, timeout, token, token_file, tls, ca, client_cert, client_key) as client:
            reply = client.files_exist(names)
    except Exception as exc:
        raise _rpc_error(exc, target)
    for name, exists, error in zip(reply.files, reply.exists, reply.errors):
        verdict = f"[red]invalid[/]: {error}" if error else ("[green]exists[/]" if exists else "[yellow]missing[/]")
        out.print(f"{name}: {verdict}", highlight=False)
    if not all(reply.exists):
        raise typer.Exit(code=1)


from dts_util.engines.backends import BACKENDS as _BACKENDS  # noqa: E402 - a small table, no runtime imports

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
    _setup_logging(LogLevel.warning, rich=True)
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
        raise _fail(str(exc))
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
    _print_table(table)
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
                      _engine_verdict(status))
    _print_table(table)


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
        out.print(f"removed {removed} ONNX export and backend cache folder(s)")


tls_app = typer.Typer(help="TLS certificates: a private CA, a server certificate, client certificates.",
                      no_args_is_help=True)
app.add_typer(tls_app, name="tls")


def default_config_dir() -> Path:
    """Where install keeps the token and TLS files: $DTS_CONFIG_DIR, else the user config dir."""
    if env := os.environ.get("DTS_CONFIG_DIR"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("dts-util"))


@tls_app.command("init")
def tls_init(
    out_dir: Annotated[Optional[Path], typer.Option("--dir", help="Folder for the PEM files.",
                                                    show_default="<config dir>/tls")] = None,
    host: Annotated[Optional[list[str]], typer.Option(help="Host name or IP address the server certificate is "
                                                           "valid for; repeatable.",
                                                      show_default="localhost, 127.0.0.1, ::1, this host's names")]
    = None,
    client: Annotated[bool, typer.Option(help="Also make a client certificate for mutual TLS.")] = False,
    force: Annotated[bool, typer.Option(help="Replace existing server (and client) certificates.")] = False,
) -> None:
    """Create a private CA and a server certificate (plus a client one with --client) using `cryptography`."""
    from dts_util.security.tls import create_tls_files, default_hosts

    folder = out_dir or default_config_dir() / "tls"
    hosts = list(dict.fromkeys([*(host or []), *default_hosts()]))
    try:
        files = create_tls_files(folder, hosts, client=client, force=force)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc))
    out.print(f"wrote a CA and a server certificate for {', '.join(hosts)} to {folder}")
    out.print(f"server:  dts-util serve --tls-cert {files.server_cert} --tls-key {files.server_key}"
              + (f" --tls-client-ca {files.ca_cert}" if client else ""))
    mutual = f" --client-cert {files.client_cert} --client-key {files.client_key}" if client else ""
    out.print(f"clients: dts-util test --host <server> --ca {files.ca_cert}{mutual}  (copy ca.pem to each client)")


SYSTEMD_UNIT = """[Unit]
Description=dts-util Draw Things gRPC server

[Service]
ExecStart={exec_start}
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
    tls: Annotated[bool, typer.Option(help="Also create TLS certificates (`tls init`) and serve with them.")]
    = False,
) -> None:
    """Prepare the model store (with the built-in model), create an auth token, and install a systemd user
    service for `serve`."""
    _setup_logging(LogLevel.info, rich=True)
    from dts_util.errors import StartupError
    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.store import ModelStore, prepare_store_folder
    from dts_util.security.tokens import write_new_token

    model_dir, engines = (model_path or default_model_dir()).resolve(), (engine_dir or default_engine_dir()).resolve()
    try:
        store = ModelStore(prepare_store_folder(model_dir, create_parents=model_path is None))
    except StartupError as exc:
        raise _fail(str(exc))
    with err.status("creating the built-in model…"):
        folder = ensure_builtin_model(store)
    engines.mkdir(parents=True, exist_ok=True)
    out.print(f"model store: {model_dir} (built-in model at {folder.name}/)\nengine dir: {engines}")
    config_dir = default_config_dir()
    token_file = config_dir / "auth-token"
    new_token = not token_file.exists()
    if new_token:
        write_new_token(token_file)
    out.print(f"auth token: {token_file} (mode 0600){'' if new_token else ', kept'}")
    args = ["serve", "--port", str(port), "--model-path", str(model_dir), "--engine-dir", str(engines),
            "--auth-token-file", str(token_file)]
    tls_flags = ""
    if tls:
        from dts_util.security.tls import create_tls_files, default_hosts

        tls_files = create_tls_files(config_dir / "tls", default_hosts(), force=True)
        args += ["--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key)]
        tls_flags = f" --ca {tls_files.ca_cert}"
        out.print(f"TLS: certificates in {tls_files.folder}; clients trust {tls_files.ca_cert}")
    out.print(f"clients send the token: DTS_AUTH_TOKEN=$(cat {token_file}) dts-util test --port {port}{tls_flags}")
    beside_python = Path(sys.executable).with_name("dts-util")
    exe = shutil.which("dts-util") or (str(beside_python) if beside_python.exists()
                                       else f"{sys.executable} -m dts_util")
    if not service:
        out.print(f"run the server with: {exe} {' '.join(args)}")
        return
    _install_unit(exe, args, port)


def _install_unit(exe: str, args: list[str], port: int) -> None:
    """Write and start the user unit; on failure remove the unit again and say how to run by hand (the
    model store and token stay: the command printed for that needs them)."""
    unit = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd/user/dts-util.service"
    manual = f"start the server by hand: {exe} {' '.join(args)} (or pass --no-service)"
    if shutil.which("systemctl") is None:
        raise _fail(f"systemctl is not available here; {manual}")
    previous = unit.read_text() if unit.exists() else None
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(SYSTEMD_UNIT.format(exec_start=" ".join([exe, *args])))
    steps = (["daemon-reload"], ["enable", "--now", "dts-util.service"])
    for step in steps:
        result = subprocess.run(["systemctl", "--user", *step], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["systemctl", "--user", "disable", "dts-util.service"], capture_output=True)
            if previous is None:
                unit.unlink(missing_ok=True)
            else:
                unit.write_text(previous)
            subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True)
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            raise _fail(f"systemctl --user {' '.join(step)} failed ({reason}); the unit was removed again; {manual}")
    out.print(f"wrote {unit}\n[green]started[/] dts-util.service; check it with `dts-util test --port {port}` "
              "and the token")


if __name__ == "__main__":
    app()
