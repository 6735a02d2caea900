"""Generation parameters: the request as the client sent it, and as it will run.

``GenerationRequest`` mirrors the protocol fields (0 = "use the default", since
proto3 cannot tell unset from 0). ``resolve`` checks every value and fills the
defaults, failing early with a message that names the bad value and the range.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from dts_util.boundary import GenerationRequest
from dts_util.client_text import quote
from dts_util.errors import FeatureUnavailable, InvalidRequest
from dts_util.limits import MAX_PATH_CHARS, MAX_PROMPT_CHARS, MAX_SAMPLER_CHARS
from dts_util.pipeline.images import (InputImages, default_size, fit_input_images, given_input_images,
                                     read_input_images, sha256_hex)
from dts_util.pipeline.noise import find_seed_mode
from dts_util.pipeline.prompts import extract_lora_tags
from dts_util.pipeline.samplers import Sampler, find_sampler

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 16
MAX_CFG = 100.0
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
DEFAULT_STRENGTH = 0.7
DEFAULT_HR_SCALE = 2.0
MAX_HR_SCALE = 4.0
MAX_SEED = 2**63 - 1 - MAX_BATCH_SIZE * MAX_BATCH_COUNT
MAX_CLIP_SKIP = 12
OUTPUT_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
MAX_LORAS = 8
MAX_LORA_WEIGHT = 10.0
MAX_SHIFT = 100.0


@dataclass(frozen=True)
class FamilyDefaults:
    """What a request that leaves a value at 0 gets for a model (its family decides: ``families/``)."""

    size: int  # pixels per side
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG  # the request's cfg_scale: CFG, or the distilled guidance (distilled_guidance)
    sampler: str = ""  # "" = DEFAULT_SAMPLER
    size_multiple: int = 8  # pixels: width and height must be multiples of this
    strength: float = DEFAULT_STRENGTH  # img2img and inpainting
    # cfg_scale is a guidance-distilled model's guidance embedding; true CFG is true_cfg_scale with the negative
    # prompt.
    distilled_guidance: bool = False
    flow_matching: bool = False  # the sigma shift applies


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA as the request names it: a store path (or an A1111 tag's name) and a weight."""

    name: str
    weight: float
    from_prompt: bool = False


MAX_MASK_OUTSET = 64
MAX_CONDITIONING_SIZE = 8192  # SDXL size conditioning, pixels


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning of one guidance branch, in pixels; 0 = the pass's own size (or no crop)."""

    original: tuple[int, int] = (0, 0)  # (height, width)
    crop: tuple[int, int] = (0, 0)  # (top, left)
    target: tuple[int, int] = (0, 0)  # (height, width)

    def time_ids(self, width: int, height: int) -> list[int]:
        """diffusers' ``add_time_ids``: original size, crop top-left, target size, with 0s filled in."""
        original = self.original if all(self.original) else (height, width)
        target = self.target if all(self.target) else (height, width)
        return [*original, *self.crop, *target]


@dataclass(frozen=True)
class ResolvedRequest:
    """Every effective parameter of one generation, after defaults and checks."""

    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: Sampler
    batch_size: int
    batch_count: int
    enable_hr: bool
    hr_scale: float
    denoising_strength: float
    clip_skip: int = 1
    # Non-zero LoRAs, as named (resolved to store files by the service); the prompt has its tags removed.
    loras: tuple[LoraRequest, ...] = ()
    preview_every: int = 0  # streaming: a latent preview every this many steps (0 = none)
    output_format: str = "png"
    quality: int = 90
    # img2img / inpainting: the input image (and mask) at width x height; None for txt2img.
    init: InputImages | None = None
    skip_mask_overlay: bool = False
    seed_mode: str = "torch_cpu"
    latent_previews: bool = False  # the app's previews: raw latents at its cadence
    zero_negative_prompt: bool = False
    size_conditioning: SizeConditioning = SizeConditioning()
    negative_size_conditioning: SizeConditioning = SizeConditioning()
    # Guidance-distilled models (FLUX.1 [dev]): cfg_scale is the guidance embedding; true CFG runs a negative
    # branch at true_cfg_scale (> 1).
    distilled_guidance: bool = False
    true_cfg_scale: float = 1.0
    shift: float = 0.0  # flow-matching models: the sigma shift (0 = the model's own, by resolution where it has one)
    size_multiple: int = 8
    raw_output: bool = False  # the result as pixels, not encoded files (a protocol that sends tensors)

    @property
    def mode(self) -> str:
        """"txt2img", "img2img" or "inpaint"."""
        return self.init.mode if self.init is not None else "txt2img"

    @property
    def use_cfg(self) -> bool:
        """Whether a negative branch runs: classifier-free guidance (true CFG for guidance-distilled models)."""
        if self.distilled_guidance:
            return self.true_cfg_scale > 1.0
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """Image i of the request uses seed + i."""
        return [self.seed + i for i in range(self.batch_size * self.batch_count)]

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the PNGs: upscaled by the high-res fix when it is on."""
        if not self.enable_hr:
            return self.width, self.height
        return (hr_dimension(self.width, self.hr_scale, self.size_multiple),
                hr_dimension(self.height, self.hr_scale, self.size_multiple))


def hr_dimension(size: int, scale: float, multiple: int = 8) -> int:
    """Size after the high-res upscale, rounded to the model's size grid (8 pixels: SD's latents)."""
    return int(round(size * scale / multiple)) * multiple


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequest(f"{name} is {value}; send a finite number")
    return value


def _check_size(name: str, value: int, multiple: int = 8) -> None:
    if value % multiple or not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidRequest(f"{name} is {value}; it must be a multiple of {multiple} in {MIN_SIZE}..{MAX_SIZE} "
                             "for this model (or 0 for the model's native size)")


def _in_range(name: str, value: int, low: int, high: int, hint: str = "") -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{name} is {value}; it must be in {low}..{high}{hint}")


def img2img_start_step(steps: int, strength: float) -> int:
    """The first step an img2img pass runs, as diffusers' ``get_timesteps`` computes it (the pass runs
    ``int(steps * strength)`` steps), but always at least one step."""
    denoised_steps = min(int(steps * strength), steps)
    return min(steps - denoised_steps, steps - 1)


def client_strength(value: float) -> float:
    """A strength as the client meant it: clients send float32, so 0.7 arrives as 0.69999998, which would make
    int(10 x strength) 6 steps, not 7."""
    return round(value, 6)


def check_text_fields(req: GenerationRequest) -> None:
    """Bound every string of the request before anything uses, logs or echoes it."""
    limits = (("prompt", MAX_PROMPT_CHARS), ("negative_prompt", MAX_PROMPT_CHARS),
              ("sampler", MAX_SAMPLER_CHARS), ("model", MAX_PATH_CHARS))
    for name, limit in limits:
        length = len(getattr(req, name))
        if length > limit:
            raise InvalidRequest(f"{name} has {length} characters; send at most {limit}")
    if len(req.loras) > MAX_LORAS:
        raise InvalidRequest(f"loras has {len(req.loras)} entries; send at most {MAX_LORAS}")
    for file, _ in req.loras:
        if len(file) > MAX_PATH_CHARS:
            raise InvalidRequest(f"a LoRA file name has {len(file)} characters; send at most {MAX_PATH_CHARS}")


def _loras(req: GenerationRequest) -> tuple[str, tuple[LoraRequest, ...]]:
    """The prompt without its <lora:...> tags, and every LoRA of the request with a non-zero weight
    (weight 0 changes nothing, so it is not applied at all: the image is exactly the base model's)."""
    prompt, tags = extract_lora_tags(req.prompt)
    loras = [LoraRequest(file, weight) for file, weight in req.loras]
    loras += [LoraRequest(tag.name, tag.weight, from_prompt=True) for tag in tags]
    if len(loras) > MAX_LORAS:
        raise InvalidRequest(f"the request names {len(loras)} LoRAs (field and prompt tags); at most {MAX_LORAS}")
    for lora in loras:
        if not math.isfinite(lora.weight) or abs(lora.weight) > MAX_LORA_WEIGHT:
            raise InvalidRequest(f"LoRA {quote(lora.name)} has weight {lora.weight}; send a number in "
                                 f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}")
        if not lora.name.strip():
            raise InvalidRequest("a LoRA has an empty file name")
    return prompt, tuple(lora for lora in loras if lora.weight != 0)


def _check_size_from_image(name: str, value: int, image_size: tuple[int, int], multiple: int) -> None:
    if value % multiple or not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidRequest(f"init_image is {image_size[0]}x{image_size[1]}, which makes the output {name} {value}; "
                             f"send {name} as a multiple of {multiple} in {MIN_SIZE}..{MAX_SIZE} to resize the image "
                             "to it")


def _sizes(req: GenerationRequest, defaults: FamilyDefaults) -> tuple[int, int, tuple | None]:
    """(width, height, decoded input images or None): the image's own size is the default when one is sent."""
    multiple = defaults.size_multiple
    if not (req.init_image or req.mask or req.init_pixels is not None):
        width, height = req.width or defaults.size, req.height or defaults.size
        _check_size("width", width, multiple)
        _check_size("height", height, multiple)
        return width, height, None
    if req.init_pixels is not None:
        image, mask = given_input_images(req.init_pixels, req.mask_pixels, req.mask_blur)
    else:
        image, mask = read_input_images(req.init_image, req.mask, req.mask_blur)
    implied_width, implied_height = default_size(image.size, multiple)
    for name, sent, implied in (("width", req.width, implied_width), ("height", req.height, implied_height)):
        if sent:
            _check_size(name, sent, multiple)
        else:
            _check_size_from_image(name, implied, image.size, multiple)
    return req.width or implied_width, req.height or implied_height, (image, mask)


def _size_conditioning(req: GenerationRequest) -> tuple[SizeConditioning, SizeConditioning]:
    """SDXL's positive and negative size conditioning; each negative value defaults to the positive one."""
    names = ("original_width", "original_height", "crop_top", "crop_left", "target_width", "target_height")
    for name in names:
        for field in (name, f"negative_{name}"):
            _in_range(field, getattr(req, field), 0, MAX_CONDITIONING_SIZE, " pixels (0 = the image's size, no crop)")

    def branch(prefix: str) -> SizeConditioning:
        def value(name: str) -> int:  # a negative value of 0 falls back to the positive one
            return getattr(req, prefix + name) or getattr(req, name)

        return SizeConditioning((value("original_height"), value("original_width")),
                                (value("crop_top"), value("crop_left")), (value("target_height"), value("target_width")))

    return branch(""), branch("negative_")


def resolve(req: GenerationRequest, model: str, defaults: FamilyDefaults | int) -> ResolvedRequest:
    """Check ``req`` and fill its defaults for a model with these ``defaults`` (an int: an SD model of that native
    size). Without a width and height, an input image's own size is the default."""
    if isinstance(defaults, int):
        defaults = FamilyDefaults(defaults)
    check_text_fields(req)
    if req.restore_faces:
        raise FeatureUnavailable("restore_faces was requested, but no face-restoration model is installed "
                                 "on this server; send restore_faces=false")
    width, height, decoded = _sizes(req, defaults)
    if decoded is not None and req.enable_hr:
        raise InvalidRequest("enable_hr (the high-res fix) is for txt2img; with init_image, send the size you want "
                             "as width and height instead")
    steps = req.steps or defaults.steps
    _in_range("steps", steps, 1, MAX_STEPS, f" (or 0 for this model's default of {defaults.steps})")
    cfg = _finite("cfg_scale", req.cfg_scale) or defaults.cfg_scale
    if defaults.distilled_guidance and req.guidance_embed > 0:  # the app's guidance embedding
        cfg = _finite("guidance_embed", req.guidance_embed)
    if not 0 <= cfg <= MAX_CFG:
        raise InvalidRequest(f"cfg_scale is {cfg}; it must be in 0..{MAX_CFG:g} (<= 1 turns guidance off)")
    true_cfg = _finite("true_cfg_scale", req.true_cfg_scale) or 1.0
    if not 0 <= true_cfg <= MAX_CFG:
        raise InvalidRequest(f"true_cfg_scale is {true_cfg}; it must be in 0..{MAX_CFG:g} (<= 1: no true CFG)")
    shift = _finite("shift", req.shift)
    if not 0 <= shift <= MAX_SHIFT:
        raise InvalidRequest(f"shift is {shift}; it must be in 0..{MAX_SHIFT:g} (0 = the model's own)")
    if shift not in (0.0, 1.0) and not defaults.flow_matching:
        raise FeatureUnavailable(f"shift {shift:g} applies to flow-matching models (FLUX); this model samples "
                                 "its own noise schedule: send shift 0")
    batch_size, batch_count = req.batch_size or 1, req.batch_count or 1
    _in_range("batch_size", batch_size, 1, MAX_BATCH_SIZE, " images per pass")
    _in_range("batch_count", batch_count, 1, MAX_BATCH_COUNT, " passes")
    if req.seed < -1 or req.seed > MAX_SEED:
        raise InvalidRequest(f"seed is {req.seed}; send -1 for a random seed or a value in 0..{MAX_SEED}")
    seed = random.randint(0, 2**32 - 1) if req.seed == -1 else req.seed
    strength = client_strength(_finite("denoising_strength", req.denoising_strength)) or defaults.strength
    if not 0 < strength <= 1:
        raise InvalidRequest(f"denoising_strength is {strength}; it must be in (0, 1] (or 0 for this model's "
                             f"{defaults.strength:g})")
    hr_scale = _finite("hr_scale", req.hr_scale) or DEFAULT_HR_SCALE
    if not 1 <= hr_scale <= MAX_HR_SCALE:
        raise InvalidRequest(f"hr_scale is {hr_scale}; it must be in 1..{MAX_HR_SCALE:g} (or 0 for 2)")
    if req.enable_hr:
        for name, size in (("width", width), ("height", height)):
            if hr_dimension(size, hr_scale, defaults.size_multiple) > MAX_SIZE:
                raise InvalidRequest(f"high-res fix would make {name} "
                                     f"{hr_dimension(size, hr_scale, defaults.size_multiple)} "
                                     f"(> {MAX_SIZE}); lower hr_scale or {name}")
    _in_range("clip_skip", req.clip_skip, 0, MAX_CLIP_SKIP, " (0 or 1 = the model's default layer)")
    _in_range("preview_every", req.preview_every, 0, MAX_STEPS, " steps (0 = no previews)")
    output_format = OUTPUT_FORMATS.get((req.output_format or "png").lower())
    if output_format is None:
        raise InvalidRequest(f"output_format {quote(req.output_format, 20)} is not png, webp or jpeg")
    _in_range("quality", req.quality, 0, 100, " (0 = 90)")
    prompt, loras = _loras(req)
    seed_mode = find_seed_mode(req.seed_mode)
    _in_range("mask_outset", req.mask_outset, -MAX_MASK_OUTSET, MAX_MASK_OUTSET, " pixels (0 = none)")
    size_conditioning, negative_size_conditioning = _size_conditioning(req)
    init = None
    if decoded is not None:
        # Of the bytes as sent; of the RGB pixels when a protocol sent decoded pixels.
        digest = sha256_hex(req.init_image if req.init_pixels is None else decoded[0].tobytes())
        init = fit_input_images(*decoded, width, height, req.mask_blur, digest, req.mask_outset)
    return ResolvedRequest(
        model=model, prompt=prompt, negative_prompt=req.negative_prompt, width=width, height=height,
        steps=steps, cfg_scale=cfg, seed=seed, sampler=find_sampler(req.sampler or defaults.sampler),
        batch_size=batch_size, batch_count=batch_count, enable_hr=req.enable_hr,
        hr_scale=hr_scale, denoising_strength=strength, clip_skip=max(1, req.clip_skip), loras=loras,
        preview_every=req.preview_every, output_format=output_format, quality=req.quality or 90,
        init=init, skip_mask_overlay=req.skip_mask_overlay, seed_mode=seed_mode, latent_previews=req.latent_previews,
        zero_negative_prompt=req.zero_negative_prompt, size_conditioning=size_conditioning,
        negative_size_conditioning=negative_size_conditioning, distilled_guidance=defaults.distilled_guidance,
        true_cfg_scale=true_cfg, shift=shift, size_multiple=defaults.size_multiple, raw_output=req.raw_output,
    )
