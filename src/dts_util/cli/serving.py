"""Serving commands: run the server, and install it (store, token, TLS, a systemd user unit)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dts_util import limits
from dts_util.cli.common import (BUILD, LIMITS, SECURITY, SERVE, EngineDirOpt, LogLevel, ModelDirOpt, app,
                                 default_config_dir, err, fail, out, setup_logging)
from dts_util.config import BUILTIN_MODEL_NAME, DEFAULT_PORT, default_engine_dir, default_model_dir


@app.command()
def serve(
    address: Annotated[Optional[str], typer.Option(
        help="Address to listen on. Without a token only loopback is allowed, unless --no-auth.",
        show_default="0.0.0.0 with a token, 127.0.0.1 without", rich_help_panel=SERVE)] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.", rich_help_panel=SERVE)] = DEFAULT_PORT,
    http_port: Annotated[int, typer.Option(
        help="Also serve HTTP/1.1 on this port of the same address: A1111's /sdapi/v1 and OpenAI's /v1/images APIs, "
             "with the same token, TLS certificate, queue and models (docs at /docs).",
        show_default="off", rich_help_panel=SERVE)] = 0,
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
    max_concurrent_streams: Annotated[int, typer.Option(
        help="Calls one connection may have open at once (advertised to clients; past it a call is refused with "
             "UNAVAILABLE, which a client may retry).",
        rich_help_panel=LIMITS)] = 10_000,
    keepalive_seconds: Annotated[float, typer.Option(
        help="Ping a quiet connection after this many seconds and drop it when the ping goes unanswered as long "
             "again: a vanished client's generation stops.", rich_help_panel=LIMITS)] = 20.0,
    max_generation_seconds: Annotated[float, typer.Option(
        help="Longest one generation may run before it is stopped with DEADLINE_EXCEEDED (0 = no limit).",
        rich_help_panel=LIMITS)] = 0.0,
    max_loaded_models: Annotated[int, typer.Option(help="Models kept in memory at once (least recently used go "
                                                        "first).", rich_help_panel=LIMITS)]
    = limits.DEFAULT_MAX_LOADED_MODELS,
    http_timeout: Annotated[float, typer.Option(
        help="Seconds an HTTP client may take to send its request, or to take a response, before its connection "
             "is closed.", rich_help_panel=LIMITS)] = limits.DEFAULT_HTTP_TIMEOUT_S,
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
    fp8: Annotated[bool, typer.Option(
        help="Run the eager denoiser's linear layers in float8 (torchao; CUDA GPUs of compute capability 8.9+, e.g. "
             "H100). Halves a FLUX transformer's memory; requests with LoRAs are refused.",
        rich_help_panel=BUILD)] = False,
    channels_last: Annotated[bool, typer.Option(
        help="Eager UNet and VAE in channels-last layout (faster convolutions on some GPUs).",
        rich_help_panel=BUILD)] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Log verbosity.")] = LogLevel.info,
) -> None:
    """Start the gRPC server (drawthings.ImageGenerationService, and the Draw Things app's
    ImageGenerationService on the same port), with --http-port the HTTP APIs beside it, and serve until
    Ctrl-C / SIGTERM."""
    setup_logging(log_level, rich=False)
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
            max_concurrent_streams=max_concurrent_streams, keepalive_seconds=keepalive_seconds,
            max_generation_seconds=max_generation_seconds,
            png_compression=png_compression, metrics_port=metrics_port, metrics_address=metrics_address,
            build_missing=build_missing, torch_compile=torch_compile, channels_last=channels_last, fp8=fp8,
            compile_resolutions=_parse_resolutions(compile_resolution), auth_token=token, allow_no_auth=no_auth,
            tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, advertise=advertise,
            advertise_name=advertise_name, http_port=http_port, http_timeout=http_timeout)
        asyncio.run(_serve(config, engines))
    except (StartupError, DtsError, ValueError) as exc:
        raise fail(str(exc))
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
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
    http_port: Annotated[int, typer.Option(help="Also serve the HTTP APIs (A1111, OpenAI Images) on this port.",
                                           show_default="off")] = 0,
    model_path: ModelDirOpt = None,
    engine_dir: EngineDirOpt = None,
    service: Annotated[bool, typer.Option(help="Install and start a systemd user service.")] = True,
    tls: Annotated[bool, typer.Option(help="Also create TLS certificates (`tls init`) and serve with them.")]
    = False,
) -> None:
    """Prepare the model store (with the built-in model), create an auth token, and install a systemd user
    service for `serve`."""
    setup_logging(LogLevel.info, rich=True)
    from dts_util.errors import StartupError
    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.store import ModelStore, prepare_store_folder
    from dts_util.security.tokens import write_new_token

    model_dir, engines = (model_path or default_model_dir()).resolve(), (engine_dir or default_engine_dir()).resolve()
    try:
        store = ModelStore(prepare_store_folder(model_dir, create_parents=model_path is None))
    except StartupError as exc:
        raise fail(str(exc))
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
    if http_port:
        args += ["--http-port", str(http_port)]
    tls_flags = ""
    if tls:
        from dts_util.security.tls import create_tls_files, default_hosts

        tls_files = create_tls_files(config_dir / "tls", default_hosts(), force=True)
        args += ["--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key)]
        tls_flags = f" --ca {tls_files.ca_cert}"
        out.print(f"TLS: certificates in {tls_files.folder}; clients trust {tls_files.ca_cert}")
    out.print(f"clients send the token: DTS_AUTH_TOKEN=$(cat {token_file}) dts-util test --port {port}{tls_flags}")
    if http_port:
        scheme = "https" if tls else "http"
        out.print(f"HTTP APIs: {scheme}://localhost:{http_port}/sdapi/v1 (A1111) and /v1 (OpenAI); the token is the "
                  "bearer token or the basic-auth password")
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
        raise fail(f"systemctl is not available here; {manual}")
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
            raise fail(f"systemctl --user {' '.join(step)} failed ({reason}); the unit was removed again; {manual}")
    out.print(f"wrote {unit}\n[green]started[/] dts-util.service; check it with `dts-util test --port {port}` "
              "and the token")


if __name__ == "__main__":
    app()
