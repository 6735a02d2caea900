"""Client commands: check a server, generate, upload, ask what exists, list samplers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dts_util import limits
from dts_util.cli.common import Connection, app, client_options, err, fail, out, print_table, rpc_error


@app.command()
@client_options(timeout=5.0)
def test(connection: Connection) -> None:
    """Check a running server: calls Echo and exits 0 only when it answers HELLO."""
    try:
        with connection.connect() as client:
            reply = client.echo()
    except Exception as exc:  # grpc.RpcError and friends: report, don't trace
        raise rpc_error(exc, connection.target)
    if reply.message != "HELLO":
        raise fail(f"server at {connection.target} answered {reply.message!r} instead of 'HELLO'")
    out.print(f"[bold green]OK[/] server at {connection.target} answered HELLO (dts-util {reply.server_version or '?'})")
    out.print(f"models: {', '.join(reply.models) or 'none'}; default: {reply.default_model or '?'}")


@app.command()
@client_options(timeout=600.0)
def generate(
    connection: Connection,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative_prompt: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    width: Annotated[int, typer.Option(help="Width (0 = model's native size).")] = 0,
    height: Annotated[int, typer.Option(help="Height (0 = model's native size).")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps (0 = the model's default: 20; FLUX.1 dev 28, "
                                            "schnell 4; Z-Image Turbo 9, Base 28; FLUX.2 klein 4, base "
                                            "50).")] = 0,
    cfg_scale: Annotated[float, typer.Option(help="Guidance scale (0 = the model's default: 7, <= 1 disables CFG; "
                                                  "FLUX.1 dev: its distilled guidance, 3.5; Z-Image Turbo and "
                                                  "klein: 1, Z-Image Base 5, klein base 4).")] = 0.0,
    true_cfg_scale: Annotated[float, typer.Option(help="FLUX.1 dev: true CFG with --negative, > 1 (it doubles the "
                                                       "work; 0 = none).")] = 0.0,
    shift: Annotated[float, typer.Option(help="Flow-matching models: a fixed sigma shift (0 = the model's own, "
                                              "resolution-dependent for FLUX.1 dev).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed (-1 = random); image i uses seed + i.")] = -1,
    sampler: Annotated[str, typer.Option(help="Sampler name, e.g. 'Euler a' ('' = the model's default: DPM++ 2M "
                                              "Karras; flow-matching models: Euler).")] = "",
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
) -> None:
    """Generate images on a running server and write them as PNGs; prints the generation info.

    With --init-image: image to image; with --mask as well: inpainting."""
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                  cfg_scale=cfg_scale, seed=seed, sampler=sampler, batch_size=batch_size,
                  batch_count=batch_count, enable_hr=enable_hr, hr_scale=hr_scale,
                  denoising_strength=denoising_strength, model=model, seed_mode=seed_mode,
                  true_cfg_scale=true_cfg_scale, shift=shift)
    if mask is not None and init_image is None:
        raise fail("--mask needs --init-image: inpainting paints into that image")
    if init_image is not None:
        fields.update(init_image=_read_input(init_image, "--init-image", limits.MAX_INIT_IMAGE_BYTES),
                      mask=_read_input(mask, "--mask", limits.MAX_MASK_BYTES) if mask else b"",
                      mask_blur=mask_blur if mask else 0, mask_outset=mask_outset if mask else 0,
                      skip_mask_overlay=not mask_overlay)
    try:
        with connection.connect() as client:
            images, info_text = _generate_with_progress(client, fields)
    except Exception as exc:
        raise rpc_error(exc, connection.target)
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
        raise fail(f"{option} {path}: {exc.strerror or exc}")
    if len(data) > max_bytes:
        raise fail(f"{option} {path} has {len(data)} bytes; the server takes at most {max_bytes} (send a smaller "
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
@client_options(timeout=3600.0)
def upload(
    connection: Connection,
    path: Annotated[Path, typer.Argument(help="Local file to upload.", exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option("--as", help="Name in the model store.",
                                                show_default="the file's name")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different file of the same name on the server.")] = False,
) -> None:
    """Upload a file into the server's model store (checked by size and SHA-256)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    try:
        with connection.connect() as client, Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
            reply = client.upload(path, name or path.name, lambda n: progress.advance(task, n), overwrite)
    except Exception as exc:
        raise rpc_error(exc, connection.target)
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
    print_table(table)


@app.command("files-exist")
@client_options(timeout=10.0)
def files_exist(
    connection: Connection,
    names: Annotated[list[str], typer.Argument(help="Paths relative to the model store.")],
) -> None:
    """Ask the server whether files exist in its model store. Exits 1 if any is missing or invalid."""
    try:
        with connection.connect() as client:
            reply = client.files_exist(names)
    except Exception as exc:
        raise rpc_error(exc, connection.target)
    for name, exists, error in zip(reply.files, reply.exists, reply.errors):
        verdict = f"[red]invalid[/]: {error}" if error else ("[green]exists[/]" if exists else "[yellow]missing[/]")
        out.print(f"{name}: {verdict}", highlight=False)
    if not all(reply.exists):
        raise typer.Exit(code=1)
