"""Text to image, image to image and inpainting, top to bottom, in one loop.

Encode the prompt; for img2img and inpainting, encode the input image once; then
per pass: start latents (noise, or the image's latents noised to where
``denoising_strength`` starts), denoise, (high-res fix), decode, and for
inpainting paste the input back over what the mask keeps. The semantics are
diffusers' own (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``
and their SDXL versions): ``get_timesteps``' step count, the order in which each
seeded generator is drawn from, latent masking for text-to-image UNets and the
mask and masked image as extra UNet input for inpainting UNets, so the same
weights, seed and sampler give the same image.

The loop is backend-agnostic: the UNet and the VAE decoder and encoder come
from a ``ComponentProvider`` per shape, so the same code runs eager PyTorch,
ONNX Runtime, OpenVINO, AOTInductor or TensorRT, and the high-res second pass
may run on another engine than the first.
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
from dts_util.pipeline.params import ResolvedRequest, img2img_start_step
from dts_util.pipeline.prompts import TokenChunks, pad_to_chunks, tokenize_chunks
from dts_util.pipeline.samplers import make_scheduler, set_schedule, step_accepts_generator


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
    text_embeds: torch.Tensor | None = None  # SDXL pooled embeddings
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
    """What a sampling pass starts from, and what each of its steps adds besides the UNet's prediction."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    denoising_steps: int
    kept_latents: torch.Tensor | None = None  # inpainting, text-to-image UNet: put back outside the mask each step
    mask: torch.Tensor | None = None
    unet_condition: torch.Tensor | None = None  # inpainting UNet: mask and masked image's latents, per CFG branch


def never_stop() -> bool:
    return False


class GenerationPipeline:
    """Generates a ``ResolvedRequest`` (txt2img, img2img or inpainting) with ``model``'s text encoders and
    ``components``' UNet and VAE.

    Args:
        model: the loaded model (tokenizers, text encoders, configs).
        components: picks the UNet and VAE decoder/encoder runner per shape.
        should_stop: polled between steps; True raises GenerationCancelled.
    """

    def __init__(self, model: LoadedModel, components: ComponentProvider,
                 should_stop: Callable[[], bool] = never_stop,
                 on_preview: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.model, self.components, self.should_stop = model, components, should_stop
        self.on_preview = on_preview  # gets (step, latents) every req.preview_every steps
        self.device, self.dtype = model.device, model.dtype
        self.vae_scale = model.info.vae_scale_factor
        self.scaling = float(model.info.vae_config.get("scaling_factor", 0.18215))

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
                                  event="sampling", backends=backends, backend_key="unet", image=image,
                                  result=result)
        # 5. High-res fix: upscale the latents, then an img2img pass at denoising_strength.
        if req.enable_hr:
            width, height = req.output_size
            latents = torch.nn.functional.interpolate(
                latents, size=(height // self.vae_scale, width // self.vae_scale), mode="bilinear")
            with timer("second_pass_sampling"):
                latents = self.sample(req, embeddings, seeds, generators, width, height, req.denoising_strength,
                                      events=events, event="secondPassSampling", backends=backends,
                                      backend_key="unet_second_pass", initial=latents)
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
            if self.model.info.inpainting:
                encoded.masked_moments = self._encode(pixels * (pixel_mask < 0.5), backends)
        return encoded

    def _encode(self, pixels: torch.Tensor, backends: dict[str, str]) -> torch.Tensor:
        shape = Shape(pixels.shape[2] // self.vae_scale, pixels.shape[3] // self.vae_scale, pixels.shape[0])
        encoder = self.components.vae_encoder(shape)
        backends["vae_encoder"] = describe_backend(encoder)
        return encoder(image=pixels).float()

    def encode_prompt(self, req: ResolvedRequest) -> PromptEmbeddings:
        """Prompts -> hidden states (and SDXL's pooled embeddings), uncond stacked before cond for CFG.

        Each prompt is read in 75-token chunks with A1111 emphasis (``prompts.py``); a prompt
        and its negative are padded to the same number of chunks.
        """
        encoders = self.model.prompt_encoders()
        texts = [req.negative_prompt, req.prompt] if req.use_cfg else [req.prompt]
        per_encoder = [[tokenize_chunks(tok, text) for text in texts] for tok in encoders.tokenizers]
        chunks = max(len(c.ids) for tokenized in per_encoder for c in tokenized)
        hidden, pooled = [], []
        for index in range(len(texts)):
            states, text_pooled = self._encode_chunks(
                encoders, [pad_to_chunks(t[index], chunks, tokenize_chunks(tok, "")) for t, tok in
                           zip(per_encoder, encoders.tokenizers)], req.clip_skip)
            hidden.append(states)
            pooled.append(text_pooled)
        counts = {"prompt": per_encoder[0][-1].token_count}
        if req.use_cfg:
            counts["negative_prompt"] = per_encoder[0][0].token_count
        dropped = max(t.dropped for t in per_encoder[0])
        if dropped:
            counts["not_read"] = dropped  # past MAX_CHUNKS chunks
        if req.use_cfg and req.zero_negative_prompt and not req.negative_prompt.strip():
            # diffusers' force_zeros_for_empty_prompt: an empty negative prompt conditions on zeros
            hidden[0] = torch.zeros_like(hidden[0])
            pooled[0] = None if pooled[0] is None else torch.zeros_like(pooled[0])
        hidden_states = torch.cat([h.repeat(req.batch_size, 1, 1) for h in hidden])
        text_embeds = None
        if self.model.info.family == "sdxl":
            text_embeds = torch.cat([p.repeat(req.batch_size, 1) for p in pooled])
        return PromptEmbeddings(hidden_states, text_embeds, counts, chunks)

    @torch.inference_mode()
    def _encode_chunks(self, encoders: Any, tokenized: list[TokenChunks],
                       clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt's chunks through every text encoder: (1, 77 x chunks, width) and SDXL's pooled vector."""
        widths, pooled = [], None
        for chunks, encoder in zip(tokenized, encoders.text_encoders):
            ids = torch.tensor(chunks.ids, device=self.device)
            out = encoder(ids, output_hidden_states=True)
            if self.model.info.family == "sdxl":
                # SDXL conditions on the penultimate layer of both encoders (clip skip counts on from
                # there), pooled from the second encoder's first chunk.
                states = out.hidden_states[-1 - clip_skip]
                pooled = out[0][:1]
            elif clip_skip > 1:
                # transformers 5 flattened CLIPTextModel: the final norm may sit on the model itself
                final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
                states = final_norm(out.hidden_states[-clip_skip])
            else:
                states = out[0]
            widths.append(_apply_weights(states, torch.tensor(chunks.weights, device=self.device)))
        hidden = torch.cat(widths, dim=-1)  # (chunks, 77, width)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(self.dtype), pooled

    def _time_ids(self, req: ResolvedRequest, width: int, height: int) -> torch.Tensor:
        """SDXL's (original size, crop top-left, target size) per image, negative branch first with CFG."""
        branches = [req.negative_size_conditioning, req.size_conditioning] if req.use_cfg else [req.size_conditioning]
        ids = torch.tensor([b.time_ids(width, height) for b in branches], dtype=self.dtype, device=self.device)
        return ids.repeat_interleave(req.batch_size, dim=0)

    def sample(self, req: ResolvedRequest, embeddings: PromptEmbeddings, seeds: list[int],
               generators: list[torch.Generator], width: int, height: int, strength: float, *, events: EventLog, event: str,
               backends: dict[str, str], backend_key: str, initial: torch.Tensor | None = None,
               image: EncodedImage | None = None, result: GenerationResult | None = None) -> torch.Tensor:
        """Run the sampler for ``steps`` (x ``strength`` when starting from ``initial`` latents or an input image)."""
        scheduler = make_scheduler(req.sampler, self.model.info.scheduler_config)
        set_schedule(scheduler, req.sampler, req.steps, self.model.info.family, self.device)
        start = self._start(scheduler, req, strength, seeds, generators, width, height, initial, image, backends)
        if result is not None:
            result.denoising_steps = start.denoising_steps
        latents = start.latents

        cfg_batch = 2 if req.use_cfg else 1
        text_length = embeddings.hidden_states.shape[1]
        unet = self.components.unet(Shape(latents.shape[2], latents.shape[3], latents.shape[0] * cfg_batch,
                                          text_length))
        backends[backend_key] = describe_backend(unet)
        extra = self._unet_extras(req, embeddings, width, height)
        condition = start.unet_condition
        if condition is not None and req.use_cfg:
            condition = torch.cat([condition] * 2)
        step_kwargs = {"generator": generators} if step_accepts_generator(scheduler) else {}
        for i, t in enumerate(start.timesteps):
            if self.should_stop():
                raise GenerationCancelled("generation cancelled by the client")
            latents = self._step(unet, scheduler, latents, t, embeddings, extra, req, step_kwargs, condition)
            if start.kept_latents is not None:
                latents = _keep_unmasked(scheduler, latents, start, i)
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
        # diffusers' inpainting starts from pure noise at strength 1; img2img always noises the image.
        from_image = initial is not None or (image is not None and not (inpaint and strength >= 1.0))
        begin = 0
        if initial is not None or image is not None:  # diffusers' get_timesteps
            begin = img2img_start_step(req.steps, strength)
            timesteps = timesteps[begin * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin * scheduler.order)
        image_latents = None
        if image is not None and (from_image or (inpaint and not self.model.info.inpainting)):
            image_latents = self._sample_latents(image.moments, generators)
        shape = (len(generators), self.model.info.latent_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.cat([initial_noise(req.seed_mode, seed, shape[1:], g)
                           for seed, g in zip(seeds, generators)]).to(self.device, self.dtype)
        source = initial if initial is not None else image_latents
        latents = scheduler.add_noise(source, noise, timesteps[:1]) if from_image else noise * scheduler.init_noise_sigma
        start = StartState(latents, timesteps, noise, req.steps - begin)
        if inpaint and not self.model.info.inpainting:
            # Latent masking; the masked image is still encoded and sampled by diffusers, so its draws are made too.
            _advance(generators, shape)
            start.kept_latents, start.mask = image_latents, image.mask.repeat(len(generators), 1, 1, 1)
        elif self.model.info.inpainting:
            start.unet_condition = self._inpainting_condition(image, generators, width, height, backends)
        return start

    def _sample_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One latent sample per image, each from its own generator, scaled as the UNet expects."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        distribution = DiagonalGaussianDistribution(moments)
        return (torch.cat([distribution.sample(generator=g) for g in generators]) * self.scaling).to(self.dtype)

    def _inpainting_condition(self, image: EncodedImage | None, generators: list[torch.Generator], width: int,
                              height: int, backends: dict[str, str]) -> torch.Tensor:
        """An inpainting UNet's extra input: the mask and the masked image's latents. Without a mask
        (txt2img, img2img) everything is repainted: a mask of ones and a grey image, as A1111 does."""
        batch = len(generators)
        if image is not None and image.mask is not None:
            masked = self._sample_latents(image.masked_moments, generators)
            mask = image.mask.repeat(batch, 1, 1, 1)
        else:
            grey = torch.zeros((1, 3, height, width), device=self.device)
            mean = self._encode(grey, backends)[:, :self.model.info.latent_channels]
            masked = (mean * self.scaling).to(self.dtype).repeat(batch, 1, 1, 1)
            mask = torch.ones((batch, 1, *masked.shape[2:]), device=self.device, dtype=self.dtype)
        return torch.cat([mask, masked], dim=1)

    def _unet_extras(self, req: ResolvedRequest, embeddings: PromptEmbeddings, width: int,
                     height: int) -> dict[str, torch.Tensor]:
        if embeddings.text_embeds is None:
            return {}
        return {"text_embeds": embeddings.text_embeds, "time_ids": self._time_ids(req, width, height)}

    def _step(self, unet: Component, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
              embeddings: PromptEmbeddings, extra: dict, req: ResolvedRequest, step_kwargs: dict,
              condition: torch.Tensor | None = None) -> torch.Tensor:
        latent_in = torch.cat([latents] * 2) if req.use_cfg else latents
        latent_in = scheduler.scale_model_input(latent_in, t)
        if condition is not None:  # an inpainting UNet reads the mask and the masked image beside the latents
            latent_in = torch.cat([latent_in, condition], dim=1)
        timestep = t.to(torch.float32).expand(latent_in.shape[0]).to(self.device)
        noise_pred = unet(sample=latent_in, timestep=timestep,
                          encoder_hidden_states=embeddings.hidden_states, **extra)
        if req.use_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + req.cfg_scale * (cond - uncond)
        return scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, backends: dict[str, str]) -> list[Image.Image]:
        """Latents -> PIL images, through the VAE decoder runner for this shape."""
        decoder = self.components.vae_decoder(Shape(latents.shape[2], latents.shape[3], latents.shape[0]))
        backends["vae_decoder"] = describe_backend(decoder)
        pixels = decoder(latent=latents / self.scaling)
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def _preview_step(req: ResolvedRequest, index: int, total: int) -> bool:
    """Whether step ``index`` (0-based) of ``total`` sends a preview: every ``preview_every`` steps, or at the Draw
    Things app's cadence (odd steps in the first half, then every step), which keeps the copies off the device few
    while sampling is far from its result."""
    if req.latent_previews:
        return index % 2 == 1 or index > total // 2
    return bool(req.preview_every) and (index + 1) % req.preview_every == 0


def _apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 emphasis: scale each token's hidden state by its weight, then restore each chunk's mean."""
    if bool((weights == 1.0).all()):
        return states  # no emphasis: leave the encoder's output exactly as it is
    weighted = states * weights[..., None].to(states.dtype)
    original_mean = states.mean(dim=(1, 2), keepdim=True)
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


def _keep_unmasked(scheduler: Any, latents: torch.Tensor, start: StartState, index: int) -> torch.Tensor:
    """Latent masking after step ``index``: outside the mask, the input's latents noised to the next step's level
    (un-noised after the last step), as diffusers' inpainting pipeline does for text-to-image UNets."""
    kept = start.kept_latents
    if index < len(start.timesteps) - 1:
        kept = scheduler.add_noise(kept, start.noise, start.timesteps[index + 1:index + 2])
    return (1 - start.mask) * kept + start.mask * latents


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
