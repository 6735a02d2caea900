"""Text to image, top to bottom: encode the prompt, denoise, (high-res fix), decode.

The loop is backend-agnostic: the UNet and the VAE decoder come from a
``ComponentProvider`` per shape, so the same code runs eager PyTorch, ONNX
Runtime or TensorRT, and the high-res second pass may run on another engine
than the first.
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
from dts_util.pipeline.params import ResolvedRequest
from dts_util.pipeline.prompts import TokenChunks, pad_to_chunks, tokenize_chunks
from dts_util.pipeline.samplers import make_scheduler, step_accepts_generator


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


@dataclass
class PromptEmbeddings:
    """Text conditioning for one pass, already repeated to the pass's batch (uncond first with CFG)."""

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled embeddings
    token_counts: dict[str, int] = field(default_factory=dict)  # text tokens of prompt and negative prompt
    chunks: int = 1


def never_stop() -> bool:
    return False


class Txt2ImgPipeline:
    """Generates a ``ResolvedRequest`` with ``model``'s text encoders and ``components``' UNet/VAE.

    Args:
        model: the loaded model (tokenizers, text encoders, configs).
        components: picks the UNet and VAE decoder runner per shape.
        should_stop: polled between steps; True raises GenerationCancelled.
    """

    def __init__(self, model: LoadedModel, components: ComponentProvider,
                 should_stop: Callable[[], bool] = never_stop,
                 on_preview: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.model, self.components, self.should_stop = model, components, should_stop
        self.on_preview = on_preview  # gets (step, latents) every req.preview_every steps
        self.device, self.dtype = model.device, model.dtype
        self.vae_scale = model.info.vae_scale_factor

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

        # 2. Each of batch_count passes denoises batch_size images, image i seeded with seed + i.
        for index in range(req.batch_count):
            seeds = req.seeds[index * req.batch_size:(index + 1) * req.batch_size]
            result.images += self._one_pass(req, embeddings, seeds, events, timer, result.backends)
        result.timings_ms["total"] = events.elapsed_ms()
        result.events = events.events
        return result

    def _one_pass(self, req: ResolvedRequest, embeddings: PromptEmbeddings, seeds: list[int],
                  events: EventLog, timer: "_Timer", backends: dict[str, str]) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        # 3. First pass at width x height from pure noise.
        with timer("sampling"):
            latents = self.sample(req, embeddings, generators, req.width, req.height, strength=1.0,
                                  events=events, event="sampling", backends=backends, backend_key="unet")
        # 4. High-res fix: upscale the latents, then an img2img pass at denoising_strength.
        if req.enable_hr:
            width, height = req.output_size
            latents = torch.nn.functional.interpolate(
                latents, size=(height // self.vae_scale, width // self.vae_scale), mode="bilinear")
            with timer("second_pass_sampling"):
                latents = self.sample(req, embeddings, generators, width, height, req.denoising_strength,
                                      events=events, event="secondPassSampling", backends=backends,
                                      backend_key="unet_second_pass", initial=latents)
        # 5. Decode to pixels.
        with timer("decode"):
            images = self.decode(latents, backends)
        events.emit("secondPassImageDecoded" if req.enable_hr else "imageDecoded", backend=backends["vae_decoder"])
        return images

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

    def _time_ids(self, width: int, height: int, batch: int) -> torch.Tensor:
        # (original size, crop top-left, target size): no crop, trained-size conditioning.
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return ids.repeat(batch, 1)

    def sample(self, req: ResolvedRequest, embeddings: PromptEmbeddings, generators: list[torch.Generator],
               width: int, height: int, strength: float, *, events: EventLog, event: str,
               backends: dict[str, str], backend_key: str, initial: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler for ``steps`` (x ``strength`` when starting from ``initial`` latents)."""
        scheduler = make_scheduler(req.sampler, self.model.info.scheduler_config)
        scheduler.set_timesteps(req.steps, device=self.device)
        timesteps = scheduler.timesteps
        shape = (len(generators), self.model.info.latent_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
        noise = noise.to(self.device, self.dtype)
        if initial is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            # img2img: skip the first (1 - strength) of the schedule and noise the input to match.
            start = img2img_start_step(req.steps, strength) * scheduler.order
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            latents = scheduler.add_noise(initial, noise, timesteps[:1])

        cfg_batch = 2 if req.use_cfg else 1
        text_length = embeddings.hidden_states.shape[1]
        unet = self.components.unet(Shape(shape[2], shape[3], shape[0] * cfg_batch, text_length))
        backends[backend_key] = describe_backend(unet)
        extra = self._unet_extras(embeddings, width, height)
        step_kwargs = {"generator": generators} if step_accepts_generator(scheduler) else {}
        for i, t in enumerate(timesteps):
            if self.should_stop():
                raise GenerationCancelled("generation cancelled by the client")
            latents = self._step(unet, scheduler, latents, t, embeddings, extra, req, step_kwargs)
            if self.on_preview is not None and req.preview_every and (i + 1) % req.preview_every == 0:
                self.on_preview(i + 1, latents)
            events.emit(event, step=i + 1, total=len(timesteps), backend=backends[backend_key])
        return latents

    def _unet_extras(self, embeddings: PromptEmbeddings, width: int, height: int) -> dict[str, torch.Tensor]:
        if embeddings.text_embeds is None:
            return {}
        batch = embeddings.hidden_states.shape[0]
        return {"text_embeds": embeddings.text_embeds, "time_ids": self._time_ids(width, height, batch)}

    def _step(self, unet: Component, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
              embeddings: PromptEmbeddings, extra: dict, req: ResolvedRequest, step_kwargs: dict) -> torch.Tensor:
        latent_in = torch.cat([latents] * 2) if req.use_cfg else latents
        latent_in = scheduler.scale_model_input(latent_in, t)
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
        scaling = self.model.info.vae_config.get("scaling_factor", 0.18215)
        pixels = decoder(latent=latents / scaling)
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def _apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 emphasis: scale each token's hidden state by its weight, then restore each chunk's mean."""
    if bool((weights == 1.0).all()):
        return states  # no emphasis: leave the encoder's output exactly as it is
    weighted = states * weights[..., None].to(states.dtype)
    original_mean = states.mean(dim=(1, 2), keepdim=True)
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


def img2img_start_step(steps: int, strength: float) -> int:
    """The first step an img2img pass runs, as diffusers' ``get_timesteps`` computes it (the pass runs
    ``int(steps * strength)`` steps), but always at least one step."""
    denoised_steps = min(int(steps * strength), steps)
    return min(steps - denoised_steps, steps - 1)


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
