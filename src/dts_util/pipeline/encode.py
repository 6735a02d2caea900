"""Turning a GenerationResult into what goes on the wire: PNGs, info JSON and events.

Every PNG carries its parameters in a ``parameters`` tEXt chunk in A1111's infotext
format, so existing PNG-info readers (A1111, ComfyUI, exiftool) show them.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

from PIL import Image, PngImagePlugin

from dts_util import __version__
from dts_util.boundary import LatentPreview
from dts_util.pipeline.params import ResolvedRequest
from dts_util.pipeline.generation import GenerationResult


def infotext(req: ResolvedRequest, seed: int) -> str:
    """A1111's three-part infotext: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs."""
    fields = {
        "Steps": req.steps,
        "Sampler": req.sampler.name,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model": req.model,
    }
    if req.batch_size > 1:
        fields["Batch size"] = req.batch_size
    if req.clip_skip > 1:
        fields["Clip skip"] = req.clip_skip
    if req.loras:
        fields["LoRA"] = ", ".join(f"{lora.name}: {lora.weight:g}" for lora in req.loras)
    if req.enable_hr:
        width, height = req.output_size
        fields.update({"Denoising strength": f"{req.denoising_strength:g}",
                       "Hires upscale": f"{req.hr_scale:g}", "Hires resize": f"{width}x{height}"})
    if req.init is not None:  # as A1111's img2img tab writes them
        fields["Denoising strength"] = f"{req.denoising_strength:g}"
        if req.init.mask is not None and req.init.mask_blur:
            fields["Mask blur"] = req.init.mask_blur
    fields["Version"] = f"dts-util {__version__}"
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


# "fast": fpng (lossless, ~10x zlib's speed); 0-9: Pillow's zlib level (smaller files, slower).
PNG_COMPRESSION_FAST = "fast"


def _fpng():
    try:
        import fpng
    except ImportError:
        return None
    return fpng


def _text_chunk(keyword: str, text: str) -> bytes:
    """A PNG tEXt chunk (Latin-1), or iTXt (UTF-8) when the text needs it, as Pillow writes them."""
    try:
        kind, body = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, body = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


# The signature (8 bytes) and the IHDR chunk (4 length + 4 type + 13 data + 4 CRC) that every PNG starts with.
_PNG_HEADER_BYTES = 8 + 25


def to_png(image: Image.Image, parameters: str, compression: str = PNG_COMPRESSION_FAST) -> bytes:
    """A lossless PNG with A1111's ``parameters`` text chunk before the image data, where Pillow and A1111 put it:
    readers that stop before IDAT (``Image.open(f).info``) find it."""
    fpng = _fpng() if compression == PNG_COMPRESSION_FAST else None
    if fpng is not None:
        import numpy as np

        png = fpng.from_ndarray(np.ascontiguousarray(np.asarray(image.convert("RGB"))))
        if png[12:16] != b"IHDR":
            raise ValueError("fpng wrote a PNG that does not start with IHDR")
        return png[:_PNG_HEADER_BYTES] + _text_chunk("parameters", parameters) + png[_PNG_HEADER_BYTES:]
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("parameters", parameters)
    buffer = io.BytesIO()
    level = 1 if compression == PNG_COMPRESSION_FAST else int(compression)
    image.save(buffer, format="PNG", pnginfo=metadata, compress_level=level)
    return buffer.getvalue()


def to_lossy(image: Image.Image, parameters: str, kind: str, quality: int) -> bytes:
    """WebP or JPEG with the parameters in EXIF UserComment, where A1111 puts them for these formats."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=kind.upper(), quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def encode_images(req: ResolvedRequest, result: GenerationResult,
                  png_compression: str = PNG_COMPRESSION_FAST) -> list[bytes]:
    """Every image in the request's output format, each with its own seed in its parameters."""
    if req.output_format == "png":
        return [to_png(image, infotext(req, seed), png_compression) for image, seed in zip(result.images, result.seeds)]
    return [to_lossy(image, infotext(req, seed), req.output_format, req.quality)
            for image, seed in zip(result.images, result.seeds)]



def _seed_mode_note(mode: str) -> dict[str, str]:
    """A mode without a public definition is generated with the nearest one; info says which."""
    from dts_util.pipeline.noise import effective_seed_mode

    used = effective_seed_mode(mode)
    if used == mode:
        return {}
    return {"seed_mode_used": used, "seed_mode_note": f"{mode} noise has no public definition; the noise was "
                                                      f"drawn as {used}"}


def info_json(req: ResolvedRequest, result: GenerationResult, model_fingerprint: str = "",
              model_details: dict | None = None) -> str:
    """Every effective parameter of the request, plus which backend ran what and how long it took.

    ``model_details``: how the model was read (prediction type and where it came from, file kind), and
    the LoRAs applied.
    """
    width, height = req.output_size
    info = {
        "model": req.model,
        "model_fingerprint": model_fingerprint,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "output_width": width,
        "output_height": height,
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "guidance": req.use_cfg,
        "sampler": req.sampler.name,
        "scheduler": req.sampler.scheduler,
        "seed": req.seed,
        "seeds": result.seeds,
        "seed_mode": req.seed_mode,
        **_seed_mode_note(req.seed_mode),
        "batch_size": req.batch_size,
        "batch_count": req.batch_count,
        "enable_hr": req.enable_hr,
        "hr_scale": req.hr_scale if req.enable_hr else None,
        "denoising_strength": req.denoising_strength if req.enable_hr or req.init is not None else None,
        "mode": req.mode,
        "denoising_steps": result.denoising_steps,
        **_input_image_info(req),
        "restore_faces": False,
        "clip_skip": req.clip_skip,
        "output_format": req.output_format,
        "prompt_tokens": result.prompt.get("tokens", {}),
        "prompt_chunks": result.prompt.get("chunks", 1),
        "text_length": result.prompt.get("text_length", 77),
        **(model_details or {}),
        "backends": {"text_encoder": "eager", **result.backends},
        "timings_ms": result.timings_ms,
        "version": __version__,
    }
    return json.dumps(info)


def _input_image_info(req: ResolvedRequest) -> dict:
    """What info says about an img2img/inpainting input: sizes as sent and as used, its hash, the mask's settings."""
    if req.init is None:
        return {}
    width, height = req.init.source_size
    info = {"init_image": {"width": width, "height": height, "sha256": req.init.sha256,
                           "resized": req.init.source_size != (req.width, req.height)}}
    if req.init.mask is not None:
        info.update(mask_blur=req.init.mask_blur, mask_outset=req.init.mask_outset,
                    mask_overlay=not req.skip_mask_overlay)
    return info


def event_strings(result: GenerationResult) -> list[str]:
    return [json.dumps(event) for event in result.events]


def latent_preview(latents) -> LatentPreview:
    """The first image's latents as they are (fp16, NHWC): a bounded copy off the device, no decode."""
    import torch

    latent = latents[0].detach().to("cpu", dtype=torch.float16).permute(1, 2, 0).contiguous()
    height, width, channels = latent.shape
    return LatentPreview(height, width, channels, latent.numpy().astype("<f2").tobytes())


def latent_preview_png(latents, latent_rgb: tuple | None) -> bytes | None:
    """A small PNG (latent resolution) of the first image's current latents through the family's linear
    latent -> RGB factors (a matrix product instead of a VAE decode); None without factors for this width."""
    import torch

    if latent_rgb is None:
        return None
    factors, bias = latent_rgb
    latent = latents[0].detach().float().cpu()
    if latent.shape[0] != len(factors):
        return None
    rgb = latent.permute(1, 2, 0) @ torch.tensor(factors) + torch.tensor(bias)
    pixels = (((rgb + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
