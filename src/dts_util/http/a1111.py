"""AUTOMATIC1111's web API (``/sdapi/v1``), as its clients (webuiapi, Open WebUI, SillyTavern) parse it.

Requests become the model layer's ``GenerationRequest`` field for field, so the pixels are GenerateImage's for the
same settings. A1111 runs ``n_iter`` passes one after another; so does this API (one queued generation per pass,
seeds continuing as GenerateImage's ``batch_count`` continues them), which is what makes /skip (end this pass,
go on with the next) and /progress's ``job_no`` mean what they mean in A1111. Fields A1111 has but this server
cannot honour are refused when they would change the picture silently (``tiling``, ``resize_mode`` other than
0), or ignored with a note in ``info`` (styles, scripts, upscalers).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from dts_util import __version__
from dts_util.boundary import GenerationOutput, GenerationRequest
from dts_util.client_text import quote
from dts_util.errors import InvalidRequest
from dts_util.http.common import (ApiContext, HttpApi, HttpError, Stopped, base64_bytes, checked_size, in_pool,
                                  invalid, png_bytes, resolve_model, run_generation)
from dts_util.limits import MAX_HTTP_IMAGE_BODY_BYTES, MAX_INIT_IMAGE_BYTES, MAX_MASK_BYTES
from dts_util.pipeline.params import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_CLIP_SKIP, MAX_SEED
from dts_util.pipeline.samplers import SAMPLERS, find_sampler
from dts_util.request_log import request_log

PREFIX = "/sdapi/v1"
# A1111's seeds for -1: random.randrange(4294967294).
_RANDOM_SEED_RANGE = 4294967294
# A1111's schedulers (1.9+) that name a schedule this server has: the suffix of our sampler names that runs it.
# "uniform" is what A1111's "automatic" picks for these samplers; "sgm_uniform" is diffusers' trailing spacing.
_SCHEDULES = {"automatic": ("Automatic", ""), "uniform": ("Uniform", ""), "karras": ("Karras", " Karras"),
              "sgm_uniform": ("SGM Uniform", " Trailing"), "align_your_steps": ("Align Your Steps", " AYS")}
_SCHEDULE_KEYS = {key.casefold(): name for name, (label, _) in _SCHEDULES.items() for key in (name, label)}
_SCHEDULE_KEYS["sgmuniform"] = "sgm_uniform"
# The upscalers that upscale latents, as this server's high-res fix does.
_LATENT_UPSCALERS = ("", "none", "latent")
DEFAULT_PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps


class _Common(BaseModel):
    """The fields txt2img and img2img share, as A1111's API declares them, with its defaults (512x512, 50 steps,
    Euler, CFG 7); unknown fields are ignored, as A1111's pydantic models ignore them."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: Optional[str] = None


class Txt2ImgRequest(_Common):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Common):
    init_images: Optional[list[str]] = None
    denoising_strength: Optional[float] = 0.75
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: Optional[list[str]] = None
    parameters: dict
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


# -- samplers -----------------------------------------------------------------------------------------------------

def sampler_for(name: str | None, scheduler: str | None) -> str:
    """A1111 1.9+ sends a sampler and a schedule apart ("DPM++ 2M" + "Karras"); this server names the pair as one
    sampler ("DPM++ 2M Karras"). Older clients send the joined name with no scheduler, which is taken as is."""
    key = (scheduler or "automatic").strip().casefold()
    if key not in _SCHEDULE_KEYS:
        accepted = ", ".join(label for label, _ in _SCHEDULES.values())
        raise invalid(f"scheduler {quote(scheduler or '')} is not available here; send one of {accepted}", "scheduler")
    label, suffix = _SCHEDULES[_SCHEDULE_KEYS[key]]
    if not name:
        if suffix:
            raise invalid(f"scheduler {label} needs a sampler_name to go with it", "sampler_name")
        return ""
    joined = name if not suffix or name.casefold().endswith(suffix.casefold()) else name + suffix
    try:
        return find_sampler(joined).name
    except InvalidRequest:
        if joined == name:
            raise
    find_sampler(name)  # an unknown sampler is told as such, with the list
    with_schedule = ", ".join(s.name for s in SAMPLERS if s.name.endswith(suffix))
    raise invalid(f"sampler {quote(name)} has no {label} schedule here; samplers with it: {with_schedule}",
                  "scheduler")


def split_sampler(name: str) -> tuple[str, str]:
    """Our sampler name as A1111 1.9+ reports it: the sampler, and its schedule's label ("" = automatic)."""
    for label, suffix in _SCHEDULES.values():
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)], label
    return name, ""


# -- progress -----------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One A1111 request while it runs: what /progress reports and what /interrupt and /skip act on."""

    kind: str  # A1111's job name: scripts_txt2img or scripts_img2img
    passes: int
    started: float = field(default_factory=time.time)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    pass_no: int = 0
    step: int = 0
    steps: int = 0
    running: bool = False  # the current pass reached the device (it was waiting in the queue before)
    preview: bytes | None = None
    interrupted: bool = False
    skipped: bool = False
    halt: asyncio.Event = field(default_factory=asyncio.Event)  # set by /interrupt and /skip

    def update(self, event: dict, preview: bytes | None) -> None:
        self.running = True
        if "step" in event and "total" in event:
            self.step, self.steps = int(event["step"]), int(event["total"])
        if isinstance(preview, bytes):
            self.preview = preview

    def next_pass(self, pass_no: int) -> None:
        self.pass_no, self.step, self.steps, self.running, self.skipped = pass_no, 0, 0, False, False
        if not self.interrupted:  # an interrupt between two passes still stops the job
            self.halt.clear()


class Progress:
    """The A1111 requests in flight, oldest first. A1111 runs one at a time; here several may wait in the queue,
    and the one on the device (else the oldest) is "the current job"."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def current(self) -> Job | None:
        return next((job for job in self.jobs if job.running), self.jobs[0] if self.jobs else None)

    def report(self, skip_current_image: bool) -> ProgressResponse:
        job = self.current()
        if job is None:
            return ProgressResponse(progress=0, eta_relative=0, state=_state(None))
        progress = 0.01 + job.pass_no / job.passes
        if job.steps > 0:
            progress += job.step / job.steps / job.passes
        elapsed = time.time() - job.started
        image = None
        if job.preview is not None and not skip_current_image:
            image = base64.b64encode(job.preview).decode()
        text = (f"Sampling step {job.step}/{job.steps}" if job.running else "Waiting in the queue")
        return ProgressResponse(progress=min(progress, 1.0), eta_relative=elapsed / progress - elapsed,
                                state=_state(job), current_image=image, textinfo=text)


def _state(job: Job | None) -> dict:
    """A1111's ``shared.state.dict()``."""
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"skipped": job.skipped, "interrupted": job.interrupted, "stopping_generation": False, "job": job.kind,
            "job_count": job.passes, "job_timestamp": job.timestamp, "job_no": job.pass_no,
            "sampling_step": job.step, "sampling_steps": job.steps}


# -- requests -> the model layer ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """A request as the model layer will run it: the first pass's request, the passes, and notes for ``info``."""

    request: GenerationRequest
    passes: int
    notes: list[str]
    model_label: str


def _settings(body: _Common, ctx: ApiContext) -> tuple[str, int]:
    """(model, clip skip) from override_settings, else the /options the client set."""
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint") or ctx.state.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise invalid("override_settings.sd_model_checkpoint must be a model name (a string)", "override_settings")
    model = resolve_model(ctx.generator, checkpoint) if checkpoint else ""
    clip_skip = overrides.get("CLIP_stop_at_last_layers", ctx.state.get("CLIP_stop_at_last_layers", 1))
    if not isinstance(clip_skip, int) or not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise invalid(f"CLIP_stop_at_last_layers is {clip_skip!r}; send a whole number in 1..{MAX_CLIP_SKIP}",
                      "override_settings")
    return model, clip_skip


def _common(body: _Common, ctx: ApiContext, notes: list[str]) -> dict[str, Any]:
    """GenerationRequest fields of what txt2img and img2img share."""
    if body.tiling:
        raise invalid("tiling is not available on this server; send tiling: false", "tiling")
    if body.script_name:
        raise HttpError(422, f"Script {quote(body.script_name)} not found: this server runs no scripts",
                        param="script_name", code="script_not_found")
    if not 1 <= body.n_iter <= MAX_BATCH_COUNT:
        raise invalid(f"n_iter is {body.n_iter}; it must be in 1..{MAX_BATCH_COUNT} passes", "n_iter")
    if not 1 <= body.batch_size <= MAX_BATCH_SIZE:
        raise invalid(f"batch_size is {body.batch_size}; it must be in 1..{MAX_BATCH_SIZE} images per pass",
                      "batch_size")
    if body.seed < -1 or body.seed > MAX_SEED:
        raise invalid(f"seed is {body.seed}; send -1 for a random seed or a value in 0..{MAX_SEED}", "seed")
    _note_ignored(body, notes)
    model, clip_skip = _settings(body, ctx)
    seed = body.seed if body.seed != -1 else _random_seed()
    return dict(prompt=body.prompt, negative_prompt=body.negative_prompt, width=checked_size(body.width, "width"),
                height=checked_size(body.height, "height"), steps=_positive(body.steps, "steps"),
                cfg_scale=body.cfg_scale or 0.0, seed=seed,
                sampler=sampler_for(body.sampler_name or body.sampler_index, body.scheduler),
                restore_faces=bool(body.restore_faces), batch_size=body.batch_size, batch_count=1, model=model,
                clip_skip=clip_skip, denoising_strength=body.denoising_strength or 0.0,
                preview_every=_preview_every(ctx))


def _random_seed() -> int:
    import random

    return random.randrange(_RANDOM_SEED_RANGE)


def _positive(value: int | None, name: str) -> int:
    if value is None:
        return 0  # the model's default
    if value < 1:
        raise invalid(f"{name} is {value}; send at least 1 (or leave it out for the model's default)", name)
    return value


def _preview_every(ctx: ApiContext) -> int:
    every = ctx.state.get("show_progress_every_n_steps", DEFAULT_PREVIEW_EVERY)
    return every if ctx.state.get("live_previews_enable", True) and isinstance(every, int) and every > 0 else 0


def _note_ignored(body: _Common, notes: list[str]) -> None:
    """What A1111 would do and this server does not, said in info rather than done differently in silence."""
    if body.styles:
        notes.append(f"styles {', '.join(quote(s, 40) for s in body.styles[:8])} ignored: this server has no "
                     "prompt styles")
    if body.subseed_strength:
        notes.append("subseed and subseed_strength ignored: variation seeds are not available here")
    for script in list(body.alwayson_scripts)[:16]:
        notes.append(f"alwayson_scripts {quote(script, 60)} ignored: this server runs no scripts")
    if body.refiner_checkpoint:
        notes.append("refiner_checkpoint ignored: refiners are not available here")


def _hires(body: Txt2ImgRequest, notes: list[str]) -> dict[str, Any]:
    """The high-res fix: a scale (or the size it implies) for the latents, upscaled as A1111's Latent upscaler."""
    if not body.enable_hr:
        return {}
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        if not (body.width and body.height and body.hr_resize_x and body.hr_resize_y):
            raise invalid("hr_resize_x and hr_resize_y need each other and width and height; or send hr_scale",
                          "hr_resize_x")
        scale = body.hr_resize_x / body.width
        if abs(body.hr_resize_y / body.height - scale) > 0.01:
            raise invalid("hr_resize_x/width and hr_resize_y/height differ; this server scales both sides alike: "
                          "send hr_scale", "hr_resize_x")
    upscaler = (body.hr_upscaler or "").strip()
    if upscaler.casefold().split(" (")[0] not in _LATENT_UPSCALERS:
        notes.append(f"hr_upscaler {quote(upscaler, 60)} is not installed here; the latents were upscaled (Latent)")
    if body.hr_second_pass_steps and body.hr_second_pass_steps != (body.steps or 0):
        notes.append("hr_second_pass_steps ignored: the second pass runs the last denoising_strength of the steps")
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        if getattr(body, name):
            notes.append(f"{name} ignored: the second pass uses the first pass's settings")
    return dict(enable_hr=True, hr_scale=scale)


def plan_txt2img(body: Txt2ImgRequest, ctx: ApiContext) -> Plan:
    """Runs on the image pool: naming a model reads the store."""
    notes: list[str] = []
    fields = _common(body, ctx, notes)
    fields.update(_hires(body, notes))
    if not body.enable_hr:
        fields["denoising_strength"] = 0.0  # A1111 ignores it without the high-res fix
    return Plan(GenerationRequest(**fields), body.n_iter, notes, fields["model"])


async def plan_img2img(body: Img2ImgRequest, ctx: ApiContext) -> Plan:
    notes: list[str] = []
    fields = await in_pool(_common, body, ctx, notes)  # naming a model reads the store
    if not body.init_images:
        raise invalid("img2img needs init_images: a list with one base64 image", "init_images")
    if len(body.init_images) > 1:
        raise invalid(f"init_images has {len(body.init_images)} images; send one", "init_images")
    if body.resize_mode != 0:
        raise invalid(f"resize_mode {body.resize_mode} is not available here; send 0 (just resize: the image is "
                      "stretched to width x height)", "resize_mode")
    ctx.generator.check_room(fields["model"])  # a full queue refuses before any image is decoded
    fields["init_image"] = await in_pool(base64_bytes, body.init_images[0], "init_images[0]", MAX_INIT_IMAGE_BYTES)
    if body.mask:
        fields.update(await in_pool(_mask_fields, body, notes))
    return Plan(GenerationRequest(**fields), body.n_iter, notes, fields["model"])


def _mask_fields(body: Img2ImgRequest, notes: list[str]) -> dict[str, Any]:
    """The mask as the model layer reads it (white repainted), inverted first for inpainting_mask_invert."""
    mask = base64_bytes(body.mask or "", "mask", MAX_MASK_BYTES)
    if body.inpainting_mask_invert:
        from PIL import ImageOps

        from dts_util.pipeline.images import decode_image

        mask = png_bytes(ImageOps.invert(decode_image(mask, "mask", MAX_MASK_BYTES).convert("L")))
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
    if body.mask_blur is None and body.mask_blur_y != body.mask_blur_x:
        notes.append("mask_blur_y ignored: the mask is blurred alike in both directions, by mask_blur_x")
    if body.inpaint_full_res:
        notes.append("inpaint_full_res (only masked) is not done here: the whole image was inpainted at its size")
    if body.inpainting_fill != 1:
        notes.append("inpainting_fill: the masked area starts from the original image (A1111's 'original')")
    return dict(mask=mask, mask_blur=blur)


# -- running ------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    outputs: list[GenerationOutput]
    seeds: list[int]
    stopped: str = ""


async def run_passes(plan: Plan, job: Job, ctx: ApiContext, client: Request) -> Outcome:
    """One queued generation per pass; /skip ends the current pass, /interrupt the whole job."""
    loop = asyncio.get_running_loop()

    def on_update(event: dict, preview: Any) -> None:  # from the generation thread
        loop.call_soon_threadsafe(job.update, event, preview)

    outcome = Outcome([], [])
    size = plan.request.batch_size
    for pass_no in range(plan.passes):
        if job.interrupted:
            outcome.stopped = "interrupted"
            break
        job.next_pass(pass_no)
        request = replace(plan.request, seed=plan.request.seed + pass_no * size)
        try:
            outcome.outputs.append(await run_generation(ctx.generator, request, client, on_update, job.halt))
            outcome.seeds += [request.seed + i for i in range(size)]
        except Stopped as stop:
            if stop.why != "interrupted":
                raise  # the client went away: nobody is left to answer
            if job.interrupted:
                outcome.stopped = "interrupted"
                break
            plan.notes.append(f"pass {pass_no + 1} of {plan.passes} skipped (/sdapi/v1/skip)")
    return outcome


def _infotext(png: bytes) -> str:
    """The ``parameters`` chunk a PNG carries (read from its header chunks, no pixels decoded)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return str(image.info.get("parameters", ""))


def _inpainting_model(ctx: ApiContext, name: str) -> bool:
    """Whether ``name`` is a dedicated inpainting model (its UNet takes the mask: A1111's inpainting conditioning)."""
    return any(model.inpainting for model in ctx.generator.describe_models() if model.name == name)


def a1111_info(body: _Common, plan: Plan, outcome: Outcome, job: Job, infotexts: list[str],
               inpainting_model: bool = False) -> dict:
    """A1111's ``Processed.js()``: its keys, filled from what this server ran; ``dts_util`` has the server's own
    info of the first pass (backends, timings, the model's fingerprint)."""
    ours = json.loads(outcome.outputs[0].info) if outcome.outputs else {}
    count = len(outcome.seeds)
    prompt = ours.get("prompt", body.prompt)
    sampler, schedule = split_sampler(ours.get("sampler", plan.request.sampler))
    extra: dict[str, Any] = {"Schedule type": schedule} if schedule else {}
    if plan.notes or outcome.stopped:
        extra["Notes"] = "; ".join(plan.notes + ([outcome.stopped] if outcome.stopped else []))
    info = {
        "prompt": body.prompt, "all_prompts": [prompt] * count, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * count,
        "seed": outcome.seeds[0] if outcome.seeds else plan.request.seed, "all_seeds": outcome.seeds,
        "subseed": body.subseed, "all_subseeds": [body.subseed] * count, "subseed_strength": 0,
        "width": ours.get("width", plan.request.width), "height": ours.get("height", plan.request.height),
        "sampler_name": sampler, "cfg_scale": ours.get("cfg_scale", plan.request.cfg_scale),
        "steps": ours.get("steps", plan.request.steps), "batch_size": plan.request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": ours.get("model", plan.model_label),
        "sd_model_hash": (ours.get("model_fingerprint") or "")[:10] or None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": ours.get("denoising_strength"), "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": infotexts, "styles": body.styles or [],
        "job_timestamp": job.timestamp, "clip_skip": ours.get("clip_skip", 1),
        "is_using_inpainting_conditioning": inpainting_model and ours.get("mode") != "txt2img", "version": f"dts-util {__version__}",
        "notes": plan.notes, "interrupted": outcome.stopped == "interrupted", "dts_util": ours,
    }
    return info


async def generate(body: _Common, plan: Plan, kind: str, ctx: ApiContext, client: Request) -> GenerationResponse:
    progress: Progress = ctx.state["progress"]
    job = Job(kind, plan.passes)
    progress.jobs.append(job)
    try:
        outcome = await run_passes(plan, job, ctx, client)
    finally:
        progress.jobs.remove(job)
    images = [png for output in outcome.outputs for png in output.images]
    infotexts = await in_pool(lambda: [_infotext(png) for png in images])
    summary = "; ".join(output.summary for output in outcome.outputs[:1])
    request_log().update(summary=summary + (f" passes={len(outcome.outputs)}/{plan.passes}"
                                            + (" interrupted" if outcome.stopped else "")))
    encoded = await in_pool(lambda: [base64.b64encode(png).decode() for png in images])
    parameters = body.model_dump(mode="json")
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)  # as A1111 does
    inpainting = bool(outcome.outputs) and await in_pool(_inpainting_model, ctx,
                                                         json.loads(outcome.outputs[0].info).get("model", ""))
    info = a1111_info(body, plan, outcome, job, infotexts, inpainting)
    return GenerationResponse(images=encoded if body.send_images else [], parameters=parameters,
                              info=json.dumps(info))


# -- listings and options -----------------------------------------------------------------------------------------

def _sampler_item(name: str) -> dict:
    sampler = find_sampler(name)
    _, schedule = split_sampler(sampler.name)
    key = next((k for k, (label, _) in _SCHEDULES.items() if label == schedule), None)
    return {"name": sampler.name, "aliases": list(sampler.aliases) + ([sampler.app_name] if sampler.app_name else []),
            "options": {"scheduler": key} if key else {}}


def _scheduler_items() -> list[dict]:
    return [{"name": name, "label": label, "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
             "default_rho": 7.0 if name == "karras" else -1.0, "need_inner_model": name in ("uniform", "sgm_uniform")}
            for name, (label, _) in _SCHEDULES.items()]


def _lora_items(ctx: ApiContext) -> list[dict]:
    """LoRA files where prompt tags look for them (loras/, Lora/, models/Lora/ of the store), by store path."""
    from dts_util.models.lora import LORA_FOLDERS

    root, items = ctx.generator.store.root, []
    for folder in LORA_FOLDERS[1:]:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.safetensors"))[:1000]:
            name = path.relative_to(base).with_suffix("").as_posix()
            items.append({"name": name, "alias": name, "path": path.relative_to(root).as_posix(), "metadata": {}})
    return items


def _model_items(ctx: ApiContext) -> list[dict]:
    from dts_util.http.common import _stem

    return [{"title": name, "model_name": _stem(name).rsplit("/", 1)[-1], "hash": None, "sha256": None,
             "filename": name, "config": None} for name in ctx.generator.model_names()]


def _options(ctx: ApiContext) -> dict:
    state = ctx.state
    return {"sd_model_checkpoint": state.get("sd_model_checkpoint") or ctx.generator.default_model,
            "sd_checkpoint_hash": None, "sd_vae": "Automatic", "CLIP_stop_at_last_layers":
            state.get("CLIP_stop_at_last_layers", 1), "samples_format": "png",
            "show_progress_every_n_steps": state.get("show_progress_every_n_steps", DEFAULT_PREVIEW_EVERY),
            "live_previews_enable": state.get("live_previews_enable", True), "eta_noise_seed_delta": 0}


_OPTION_TYPES = {"show_progress_every_n_steps": int, "live_previews_enable": bool, "CLIP_stop_at_last_layers": int}


def _set_options(changes: dict[str, Any], ctx: ApiContext) -> None:
    """A1111 stores what it is sent; this server keeps the options that change what it does, checked, and ignores
    the rest as A1111 ignores unknown keys."""
    checkpoint = changes.get("sd_model_checkpoint")
    if checkpoint is not None:
        if not isinstance(checkpoint, str):
            raise invalid("sd_model_checkpoint must be a model name (a string)", "sd_model_checkpoint")
        resolved = resolve_model(ctx.generator, checkpoint)
    for key, kind in _OPTION_TYPES.items():
        if key in changes and (type(changes[key]) is not kind):
            raise invalid(f"{key} must be {'true or false' if kind is bool else 'a whole number'}", key)
    clip = changes.get("CLIP_stop_at_last_layers", 1)
    if not 1 <= clip <= MAX_CLIP_SKIP:
        raise invalid(f"CLIP_stop_at_last_layers is {clip}; send 1..{MAX_CLIP_SKIP}", "CLIP_stop_at_last_layers")
    if checkpoint is not None:
        ctx.state["sd_model_checkpoint"] = resolved
    ctx.state.update({key: changes[key] for key in _OPTION_TYPES if key in changes})


# -- routes -------------------------------------------------------------------------------------------------------

def router(ctx: ApiContext) -> APIRouter:
    ctx.state.setdefault("progress", Progress())
    routes = APIRouter(tags=["A1111 (/sdapi/v1)"])

    @routes.post(f"{PREFIX}/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
        return await generate(body, await in_pool(plan_txt2img, body, ctx), "scripts_txt2img", ctx, request)

    @routes.post(f"{PREFIX}/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
        return await generate(body, await plan_img2img(body, ctx), "scripts_img2img", ctx, request)

    @routes.get(f"{PREFIX}/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = Query(False)) -> ProgressResponse:
        return ctx.state["progress"].report(skip_current_image)

    @routes.post(f"{PREFIX}/interrupt")
    async def interrupt() -> dict:
        job = ctx.state["progress"].current()
        if job is not None:
            job.interrupted = True
            job.halt.set()
        return {}

    @routes.post(f"{PREFIX}/skip")
    async def skip() -> dict:
        job = ctx.state["progress"].current()
        if job is not None:
            job.skipped = True
            job.halt.set()
        return {}

    @routes.get(f"{PREFIX}/options")
    async def get_options() -> dict:
        return _options(ctx)

    @routes.post(f"{PREFIX}/options")
    async def set_options(changes: dict[str, Any]) -> None:
        await in_pool(_set_options, changes, ctx)  # the model lookup reads the store

    @routes.get(f"{PREFIX}/sd-models")
    async def sd_models() -> list[dict]:
        return await in_pool(_model_items, ctx)

    @routes.get(f"{PREFIX}/samplers")
    async def samplers() -> list[dict]:
        return [_sampler_item(s.name) for s in SAMPLERS]

    @routes.get(f"{PREFIX}/schedulers")
    async def schedulers() -> list[dict]:
        return _scheduler_items()

    @routes.get(f"{PREFIX}/loras")
    async def loras() -> list[dict]:
        return await in_pool(_lora_items, ctx)

    @routes.get(f"{PREFIX}/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @routes.get(f"{PREFIX}/upscalers")
    async def upscalers() -> list[dict]:
        return [{"name": "Latent", "model_name": None, "model_path": None, "model_url": None, "scale": 2.0}]

    @routes.get(f"{PREFIX}/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict]:
        return [{"name": "Latent"}]

    @routes.get(f"{PREFIX}/sd-vae")
    async def sd_vae() -> list[dict]:
        return []

    @routes.get("/internal/ping")
    async def ping() -> dict:  # SillyTavern's reachability check
        return {}

    return routes


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    """A1111's error JSON (its api_middleware): the kind, the message as ``detail``, ``errors`` the same."""
    kind = "HTTPException" if status < 500 else "InternalError"
    return {"error": kind, "detail": message, "body": "", "errors": message}


API = HttpApi(name="A1111", prefix=PREFIX, router=router, error_body=error_body,
              body_limits={f"{PREFIX}/img2img": MAX_HTTP_IMAGE_BODY_BYTES}, auth_challenge='Basic realm="dts-util"')
