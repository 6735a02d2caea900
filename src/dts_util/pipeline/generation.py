"""Text to image, image to image and inpainting, top to bottom, in one loop shared by every model family.

Encode the prompt; for img2img and inpainting, encode the input image once; then
per pass: start latents (noise, or the image's latents noised to where
``denoising_strength`` starts), denoise, (high-res fix), decode, and for
inpainting paste the input back over what the mask keeps. The semantics are
diffusers' own: ``get_timesteps``' step count, the order in which each seeded
generator is drawn from, latent masking for models without an inpainting input,
so the same weights, seed and sampler give the same image.

What differs between families (prompt encoding, the scheduler and its timesteps,
how a step calls the denoiser and applies guidance) is a subclass in the family's
module (``families/``); ``DenoisingPipeline`` is the loop they share. The loop is
backend-agnostic: the denoiser and the VAE decoder and encoder come from a
``ComponentProvider`` per shape, so the same code runs eager PyTorch, ONNX Runtime,
OpenVINO, AOTInductor or TensorRT, and the high-res second pass may run on another
engine than the first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from dts_util.boundary import Shape
from dts_util.errors import GenerationCancelled
from dts_util.models.loader import LoadedModel
from dts_util.pipeline.components import Component, ComponentProvider, describe_backend
from dts_util.pipeline.images import InputImages
from dts_util.pipeline.noise import initial_noise
from dts_util.pipeline.params import ResolvedRequest
from dts_util.pipeline.samplers import step_accepts_generator


class EventLog:
    """Draw Things-style signposts (textEncoded, sampling, imageDecoded, ...) with elapsed time."""

    def __init__(self, listener: Callable[[dict], None] | None = None) -> None:
        self.start = time.perf_counter()
        self.events: list[dict] = []
        self.listener = listener

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.start) * 1000, 1)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields, "elapsed_ms": self.elapsed_ms()}
        self.events.append(record)
        if self.listener is not None:
            self.listener(record)


@dataclass
class GenerationResult:
    """The images of one request and how they were made."""

    images: list[Image.Image]
    seeds: list[int]
    backends: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    prompt: dict[str, Any] = field(default_factory=dict)  # token counts, chunks, clip skip
    denoising_steps: int = 0  # sampling steps of the first pass, as diffusers counts them


@dataclass
class PromptEmbeddings:
    """Text conditioning for one pass, already repeated to the pass's batch (uncond first with CFG)."""

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # pooled embeddings (SDXL, FLUX)
    token_counts: dict[str, int] = field(default_factory=dict)  # text tokens of prompt and negative prompt
    chunks: int = 1


@dataclass
class EncodedImage:
    """The input image through the VAE encoder, once per request; each image of a pass samples its own latents.

    ``mask`` is diffusers' binarized mask at latent size (1 = repaint); ``masked_moments`` encode the image with the
    repainted area grey, which an inpainting UNet reads beside the latents.
    """

    pixels: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    moments: torch.Tensor  # (1, 2C, h, w): mean and log-variance of the latents
    mask: torch.Tensor | None = None
    masked_moments: torch.Tensor | None = None


@dataclass
class StartState:
    """What a sampling pass starts from, and what each of its steps adds besides the denoiser's prediction."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    denoising_steps: int
    kept_latents: torch.Tensor | None = None  # inpainting without an inpainting model: put back outside the mask
    mask: torch.Tensor | None = None
    condition: torch.Tensor | None = None  # an inpainting model's extra input: the mask and masked image's latents


def never_stop() -> bool:
    return False


def make_pipeline(model: LoadedModel, components: ComponentProvider, should_stop: Callable[[], bool] = never_stop,
                  on_preview: Callable[[int, torch.Tensor], None] | None = None) -> "DenoisingPipeline":
    """The pipeline of ``model``'s family."""
    return model.family.pipeline(model, components, should_stop, on_preview)


class DenoisingPipeline:
    """Generates a ``ResolvedRequest`` (txt2img, img2img or inpainting) with ``model``'s text encoders and
    ``components``' denoiser and VAE; a family's subclass fills in the family-specific steps.

    Args:
        model: the loaded model (tokenizers, text encoders, configs).
        components: picks the denoiser and VAE decoder/encoder runner per shape.
        should_stop: polled between steps; True raises GenerationCancelled.
    """

    # diffusers' inpainting pipelines of this family sample the masked image's latents (drawing from the generators)
    # even for models without an inpainting input.
    samples_masked_image = True

    def __init__(self, model: LoadedModel, components: ComponentProvider,
                 should_stop: Callable[[], bool] = never_stop,
                 on_preview: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.model, self.components, self.should_stop = model, components, should_stop
        self.on_preview = on_preview  # gets (step, latents) every req.preview_every steps
        self.device, self.dtype = model.device, model.dtype
        # The latents the sampler denoises: the VAE's (a family may sample a transform of them, FLUX.2 its 2x2
        # patches, and converts in ``decode``).
        self.vae_scale, self.latent_channels = model.info.vae_scale_factor, model.info.latent_channels
        self.scaling = float(model.info.vae_config.get("scaling_factor", 0.18215))
        self.shift = float(model.info.vae_config.get("shift_factor") or 0.0)  # FLUX's VAE centres its latents
        self.denoiser_name = model.family.denoiser

    def __call__(self, req: ResolvedRequest, events: EventLog | None = None) -> GenerationResult:
        events = events or EventLog()
        result = GenerationResult(images=[], seeds=req.seeds)
        timer = _Timer(result.timings_ms)

        # 1. Encode the prompts once; every pass reuses them.
        with timer("text_encode"):
            embeddings = self.encode_prompt(req)
        result.prompt = {"tokens": embeddings.token_counts, "chunks": embeddings.chunks,
                         "text_length": embeddings.hidden_states.shape[1], "clip_skip": req.clip_skip}
        events.emit("textEncoded")

        # 2. img2img and inpainting: the input image (and the masked image) through the VAE encoder, once.
        image = None
        if req.init is not None:
            with timer("vae_encode"):
                image = self.encode_image(req.init, result.backends)
            events.emit("imageEncoded", backend=result.backends["vae_encoder"])

        # 3. Each of batch_count passes denoises batch_size images, image i seeded with seed + i.
        for index in range(req.batch_count):
            seeds = req.seeds[index * req.batch_size:(index + 1) * req.batch_size]
            result.images += self._one_pass(req, embeddings, image, seeds, events, timer, result)
        result.timings_ms["total"] = events.elapsed_ms()
        result.events = events.events
        return result

    def _one_pass(self, req: ResolvedRequest, embeddings: PromptEmbeddings, image: EncodedImage | None,
                  seeds: list[int], events: EventLog, timer: "_Timer", result: GenerationResult) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        backends = result.backends
        # 4. First pass at width x height: from noise, or from the input image at denoising_strength.
        strength = req.denoising_strength if image is not None else 1.0
        with timer("sampling"):
            latents = self.sample(req, embeddings, seeds, generators, req.width, req.height, strength, events=events,
                                  event="sampling", backends=backends, backend_key=self.denoiser_name, image=image,
                                  result=result)
        # 5. High-res fix: upscale the latents, then an img2img pass at denoising_strength.
        if req.enable_hr:
            width, height = req.output_size
            latents = torch.nn.functional.interpolate(
                latents, size=(height // self.vae_scale, width // self.vae_scale), mode="bilinear")
            with timer("second_pass_sampling"):
                latents = self.sample(req, embeddings, seeds, generators, width, height, req.denoising_strength,
                                      events=events, event="secondPassSampling", backends=backends,
                                      backend_key=f"{self.denoiser_name}_second_pass", initial=latents)
        # 6. Decode to pixels.
        with timer("decode"):
            images = self.decode(latents, backends)
        events.emit("secondPassImageDecoded" if req.enable_hr else "imageDecoded", backend=backends["vae_decoder"])
        # 7. Inpainting: the input shows again wherever the mask keeps it (A1111's and Draw Things' output).
        if req.mode == "inpaint" and not req.skip_mask_overlay:
            images = [paste_kept_pixels(req.init, decoded) for decoded in images]
        return images

    def encode_image(self, init: InputImages, backends: dict[str, str]) -> EncodedImage:
        """The input image (at the generation size) to latent moments; with a mask, the mask at latent size
        and, for an inpainting UNet, the moments of the image with the repainted area grey."""
        pixels = image_to_tensor(init.image).to(self.device)
        encoded = EncodedImage(pixels, self._encode(pixels, backends))
        if init.mask is not None:
            pixel_mask = mask_to_tensor(init.mask).to(self.device)
            latent_size = (pixels.shape[2] // self.vae_scale, pixels.shape[3] // self.vae_scale)
            encoded.mask = torch.nn.functional.interpolate(pixel_mask, size=latent_size).to(self.dtype)
            if self.model.info.inpainting:  # a dedicated inpainting model reads the masked image
                encoded.masked_moments = self._encode(pixels * (pixel_mask < 0.5), backends)
        return encoded

    def _encode(self, pixels: torch.Tensor, backends: dict[str, str]) -> torch.Tensor:
        shape = Shape(pixels.shape[2] // self.vae_scale, pixels.shape[3] // self.vae_scale, pixels.shape[0])
        encoder = self.components.vae_encoder(shape)
        backends["vae_encoder"] = describe_backend(encoder)
        return encoder(image=pixels).float()

    def encode_prompt(self, req: ResolvedRequest) -> PromptEmbeddings:
        """The request's prompts as the family's denoiser reads them (negative branch first when it runs one)."""
        raise NotImplementedError

    def make_scheduler(self, req: ResolvedRequest, width: int, height: int) -> Any:
        """A fresh scheduler for one pass, its timesteps set for ``req.steps`` steps at this size."""
        raise NotImplementedError

    def first_step(self, steps: int, strength: float) -> int:
        """The first of ``steps`` steps an image-to-image pass at ``strength`` runs (the family's pipelines'
        ``get_timesteps``)."""
        raise NotImplementedError

    def noise_to(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                 timestep: torch.Tensor) -> torch.Tensor:
        """Clean ``latents`` noised to ``timestep``'s level with ``noise``, as the family's scheduler defines it."""
        raise NotImplementedError

    def denoiser_shape(self, req: ResolvedRequest, latents: torch.Tensor, embeddings: PromptEmbeddings) -> Shape:
        """The static shape the denoiser runs at for these latents: the engine key."""
        raise NotImplementedError

    def step_inputs(self, req: ResolvedRequest, embeddings: PromptEmbeddings, start: "StartState", width: int,
                    height: int) -> dict[str, Any]:
        """What every step of a pass passes to ``denoise`` besides the latents and timestep."""
        return {}

    def denoise(self, denoiser: Component, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
                inputs: dict[str, Any], req: ResolvedRequest) -> torch.Tensor:
        """The guided model prediction at ``t`` (what ``scheduler.step`` takes)."""
        raise NotImplementedError

    def inpainting_condition(self, image: "EncodedImage | None", generators: list[torch.Generator], width: int,
                             height: int, backends: dict[str, str]) -> torch.Tensor:
        """A dedicated inpainting model's extra input (the mask and the masked image)."""
        raise NotImplementedError

    def sample(self, req: ResolvedRequest, embeddings: PromptEmbeddings, seeds: list[int],
               generators: list[torch.Generator], width: int, height: int, strength: float, *, events: EventLog,
               event: str, backends: dict[str, str], backend_key: str, initial: torch.Tensor | None = None,
               image: EncodedImage | None = None, result: GenerationResult | None = None) -> torch.Tensor:
        """Run the sampler for ``steps`` (x ``strength`` when starting from ``initial`` latents or an input image)."""
        scheduler = self.make_scheduler(req, width, height)
        start = self._start(scheduler, req, strength, seeds, generators, width, height, initial, image, backends)
        if result is not None:
            result.denoising_steps = start.denoising_steps
        latents = start.latents
        denoiser = self.components.denoiser(self.denoiser_shape(req, latents, embeddings))
        backends[backend_key] = describe_backend(denoiser)
        inputs = self.step_inputs(req, embeddings, start, width, height)
        step_kwargs = {"generator": generators} if step_accepts_generator(scheduler) else {}
        for i, t in enumerate(start.timesteps):
            if self.should_stop():
                raise GenerationCancelled("generation cancelled by the client")
            prediction = self.denoise(denoiser, scheduler, latents, t, inputs, req)
            latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
            if start.kept_latents is not None:
                latents = self._keep_unmasked(scheduler, latents, start, i)
            if self.on_preview is not None and _preview_step(req, i, len(start.timesteps)):
                self.on_preview(i + 1, latents)
            events.emit(event, step=i + 1, total=len(start.timesteps), backend=backends[backend_key])
        return latents

    def _start(self, scheduler: Any, req: ResolvedRequest, strength: float, seeds: list[int],
               generators: list[torch.Generator], width: int, height: int, initial: torch.Tensor | None,
               image: EncodedImage | None, backends: dict[str, str]) -> StartState:
        """Start latents and timesteps of a pass, drawing from each generator in diffusers' order: the input
        image's latents, then the noise, then (inpainting) the masked image's latents."""
        timesteps = scheduler.timesteps
        inpaint = image is not None and image.mask is not None
        inpainting_model = self.model.info.inpainting
        # diffusers' inpainting starts from pure noise at strength 1; img2img always noises the image.
        from_image = initial is not None or (image is not None and not (inpaint and strength >= 1.0))
        begin = 0
        if initial is not None or image is not None:  # diffusers' get_timesteps
            begin = self.first_step(req.steps, strength)
            timesteps = timesteps[begin * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin * scheduler.order)
        image_latents = None
        if image is not None and (from_image or (inpaint and not inpainting_model)):
            image_latents = self.image_latents(image.moments, generators)
        shape = (len(generators), self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.cat([initial_noise(req.seed_mode, seed, shape[1:], g)
                           for seed, g in zip(seeds, generators)]).to(self.device, self.dtype)
        source = initial if initial is not None else image_latents
        latents = self.noise_to(scheduler, source, noise, timesteps[:1]) if from_image \
            else noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at sigma 1
        start = StartState(latents, timesteps, noise, req.steps - begin)
        if inpaint and not inpainting_model:
            # Latent masking; where the family's diffusers pipeline still encodes and samples the masked image, its
            # draws are made too.
            if self.samples_masked_image:
                _advance(generators, shape)
            start.kept_latents, start.mask = image_latents, image.mask.repeat(len(generators), 1, 1, 1)
        elif inpainting_model:
            start.condition = self.inpainting_condition(image, generators, width, height, backends)
        return start

    def _keep_unmasked(self, scheduler: Any, latents: torch.Tensor, start: StartState, index: int) -> torch.Tensor:
        """Latent masking after step ``index``: outside the mask, the input's latents noised to the next step's
        level (un-noised after the last step), as diffusers' inpainting pipelines do for models without a
        dedicated inpainting input."""
        kept = start.kept_latents
        if index < len(start.timesteps) - 1:
            kept = self.noise_to(scheduler, kept, start.noise, start.timesteps[index + 1:index + 2])
        return (1 - start.mask) * kept + start.mask * latents

    def image_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The input image's latents for each image of a pass (diffusers' SD pipelines: each its own sample)."""
        return self._sample_latents(moments, generators)

    def _sample_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One latent sample per image, each from its own generator, shifted and scaled as the denoiser expects."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        distribution = DiagonalGaussianDistribution(moments)
        sampled = torch.cat([distribution.sample(generator=g) for g in generators])
        return ((sampled - self.shift) * self.scaling).to(self.dtype)

    def decode(self, latents: torch.Tensor, backends: dict[str, str]) -> list[Image.Image]:
        """Latents -> PIL images, through the VAE decoder runner for this shape."""
        decoder = self.components.vae_decoder(Shape(latents.shape[2], latents.shape[3], latents.shape[0]))
        backends["vae_decoder"] = describe_backend(decoder)
        pixels = decoder(latent=latents / self.scaling + self.shift)
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def _preview_step(req: ResolvedRequest, index: int, total: int) -> bool:
    """Whether step ``index`` (0-based) of ``total`` sends a preview: every ``preview_every`` steps, or at the Draw
    Things app's cadence (odd steps in the first half, then every step), which keeps the copies off the device few
    while sampling is far from its result."""
    if req.latent_previews:
        return index % 2 == 1 or index > total // 2
    return bool(req.preview_every) and (index + 1) % req.preview_every == 0


def _advance(generators: list[torch.Generator], shape: tuple[int, ...]) -> None:
    """Draw from each generator what sampling one image's latents would, without encoding anything."""
    for generator in generators:
        torch.randn((1, *shape[1:]), generator=generator)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) in [-1, 1], computed as diffusers' image processor does."""
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """A greyscale mask as (1, 1, H, W) of 0 (keep) and 1 (repaint), binarized at 50% as diffusers does."""
    array = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def paste_kept_pixels(init: InputImages, image: Image.Image) -> Image.Image:
    """The input image over the result wherever the (blurred) mask keeps it: diffusers' ``apply_overlay``."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().apply_overlay(init.mask, init.image, image)


class _Timer:
    """Adds the wall time of each ``with timer(name)`` block to ``timings[name_ms]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, name: str) -> "_Timer":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        key = f"{self._name}_ms"
        self.timings[key] = round(self.timings.get(key, 0.0) + (time.perf_counter() - self._start) * 1000, 1)
