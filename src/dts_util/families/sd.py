"""Stable Diffusion 1.x, 2.x and XL: CLIP-conditioned UNets with an SD VAE.

Recognised from a diffusers folder's ``model_index.json`` (``StableDiffusion*Pipeline``, or a
``unet`` with CLIP text encoders) or from a single ``.safetensors``/``.ckpt`` in the original
Stable Diffusion key layout (``models/checkpoint.py`` decides SD1/SD2/SDXL from its shapes).
Prompts are read as A1111 reads them (75-token chunks with emphasis, ``pipeline/prompts.py``),
guidance is classifier-free guidance as a doubled batch, and SDXL adds pooled text embeddings
and size conditioning. The pipeline matches diffusers' ``StableDiffusion(XL)(Img2Img|Inpaint)Pipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from dts_util.boundary import Shape
from dts_util.client_text import for_log, quote
from dts_util.errors import ModelLoadError
from dts_util.families.base import FamilyDefaults, LoraFormat, ModelFamily
from dts_util.pipeline.generation import DenoisingPipeline, EncodedImage, PromptEmbeddings, StartState
from dts_util.pipeline.params import ResolvedRequest, img2img_start_step
from dts_util.pipeline.prompts import TokenChunks, pad_to_chunks, tokenize_chunks
from dts_util.pipeline.samplers import make_scheduler, set_schedule

if TYPE_CHECKING:
    from dts_util.engines.components import ComponentDescriptor
    from dts_util.models.loader import LoadedModel, ModelInfo, PromptEncoders
    from dts_util.pipeline.components import Component, ComponentProvider

SD_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                          "StableDiffusionInpaintPipeline", "OnnxStableDiffusionPipeline"})
SDXL_PIPELINES = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                            "StableDiffusionXLInpaintPipeline"})
# The Draw Things app's model versions.
APP_VERSIONS = {"sd1": "v1", "sd2": "v2", "sdxl": "sdxl_base_v0.9"}
# Linear latent -> RGB approximations (the factors ComfyUI and A1111 use for fast previews).
SD_LATENT_RGB = (((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                  (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0))
SDXL_LATENT_RGB = (((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                    (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011))


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x (``xl=False``, family "sd") or SDXL (``xl=True``, family "sdxl")."""

    denoiser = "unet"

    def __init__(self, xl: bool) -> None:
        self.xl = xl
        self.name = "sdxl" if xl else "sd"
        self.pipelines = SDXL_PIPELINES if xl else SD_PIPELINES
        self.latent_rgb = SDXL_LATENT_RGB if xl else SD_LATENT_RGB

    # -- recognising and inspecting files ----------------------------------------------------------

    def recognizes(self, index: Mapping[str, Any]) -> bool:
        if index.get("_class_name", "") in self.pipelines:
            return True
        # An unnamed or custom pipeline class with SD's components: SDXL's has a second text encoder.
        return "unet" in index and "text_encoder" in index and ("text_encoder_2" in index) == self.xl

    def recognizes_file(self, keys: Mapping[str, tuple[int, ...]]) -> bool:
        from dts_util.models.checkpoint import is_stable_diffusion

        return is_stable_diffusion(keys)

    def inspect_folder(self, name: str, path: Path, index: Mapping[str, Any]) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        for part in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
            if not (path / part).is_dir():
                raise ModelLoadError(f"model {quote(name)} has no {part}/ folder; is the diffusers layout complete?")
        info = ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(path / "unet" / "config.json", f"{name}/unet/config.json"),
            vae_config=read_json_file(path / "vae" / "config.json", f"{name}/vae/config.json"),
            scheduler_config=read_json_file(path / "scheduler" / "scheduler_config.json",
                                            f"{name}/scheduler/scheduler_config.json"),
        )
        _check_sizes(info)
        return info

    def inspect_file(self, name: str, path: Path, config_cache: Path) -> "ModelInfo":
        """Decide a checkpoint's SD version, architecture and prediction type from its shapes and sidecars, and
        build its config folder; reads no tensor data (a ``.ckpt`` is unpickled safely)."""
        from dataclasses import replace

        from dts_util.models import checkpoint
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        architecture = checkpoint.detect(checkpoint.cached_shapes(path), name)
        kind, source, variant = checkpoint.prediction_type(path, architecture)
        overrides = {**architecture.overrides, "scheduler": {"prediction_type": kind}}
        folder = checkpoint.config_folder(replace(architecture, variant=variant, overrides=overrides), config_cache)
        info = ModelInfo(
            name=name, path=path, family="sdxl" if architecture.family == "sdxl" else "sd",
            denoiser_config=read_json_file(folder / "unet" / "config.json", f"{name} (unet config)"),
            vae_config=read_json_file(folder / "vae" / "config.json", f"{name} (vae config)"),
            scheduler_config=read_json_file(folder / "scheduler" / "scheduler_config.json", f"{name} (scheduler)"),
            config_dir=folder, prediction_source=source,
        )
        _check_sizes(info)
        return info

    # -- what clients see ---------------------------------------------------------------------------

    def label(self, info: "ModelInfo") -> str:
        if self.xl:
            return "sdxl"
        return "sd2" if info.denoiser_config.get("use_linear_projection") else "sd1"

    def app_spec(self, info: "ModelInfo") -> dict[str, Any]:
        spec: dict[str, Any] = {"version": APP_VERSIONS[self.label(info)], "upcast_attention": False}
        if self.inpainting(info):
            spec["modifier"] = "inpainting"
        return spec

    def native_size(self, info: "ModelInfo") -> int:
        """Pixel size the UNet was trained at (sample_size is in latent pixels)."""
        return int(info.denoiser_config["sample_size"]) * info.vae_scale_factor

    def inpainting(self, info: "ModelInfo") -> bool:
        """A dedicated inpainting UNet: latents, mask and masked image's latents in (4 + 1 + 4 channels)."""
        return _in_channels(info) == 2 * info.latent_channels + 1

    def defaults(self, info: "ModelInfo") -> FamilyDefaults:
        return FamilyDefaults(self.native_size(info))  # 20 steps of DPM++ 2M Karras at CFG 7

    # -- loading -------------------------------------------------------------------------------------

    def load_denoiser(self, model: "LoadedModel") -> Any:
        from diffusers import UNet2DConditionModel

        return model.from_pretrained(UNet2DConditionModel, "unet")

    def load_vae(self, model: "LoadedModel") -> Any:
        from diffusers import AutoencoderKL

        return model.from_pretrained(AutoencoderKL, "vae", model.vae_dtype)

    def load_prompt_encoders(self, model: "LoadedModel") -> "PromptEncoders":
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        from dts_util.models.loader import PromptEncoders

        folder = model.info.config_dir or model.info.path  # tokenizers: shipped with the configs, or the model's
        subfolders = ["tokenizer", "tokenizer_2"] if self.xl else ["tokenizer"]
        tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True) for sub in subfolders]
        if model.info.single_file:
            return PromptEncoders(tokenizers, self._single_file_text_encoders(model))
        encoders = [model.from_pretrained(CLIPTextModel, "text_encoder")]
        if self.xl:
            encoders.append(model.from_pretrained(CLIPTextModelWithProjection, "text_encoder_2"))
        return PromptEncoders(tokenizers, encoders)

    def _single_file_text_encoders(self, model: "LoadedModel") -> list[Any]:
        """A checkpoint's text encoders, through the pipeline-level loader (the models themselves have no
        single-file loader); the UNet and VAE are skipped here and load on their own when needed."""
        import diffusers

        from dts_util.models.loader import LOAD_LOCK, quiet_hf_progress

        quiet_hf_progress()
        pipeline_class = diffusers.StableDiffusionXLPipeline if self.xl else diffusers.StableDiffusionPipeline
        skip: dict[str, Any] = {"unet": None, "vae": None, "scheduler": None}
        if not self.xl:
            skip.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        with LOAD_LOCK:
            pipeline = pipeline_class.from_single_file(str(model.info.path), config=str(model.info.config_dir),
                                                       torch_dtype=model.dtype, local_files_only=True, **skip)
        names = ["text_encoder", "text_encoder_2"] if self.xl else ["text_encoder"]
        return [getattr(pipeline, n).to(model.device).eval().requires_grad_(False) for n in names]

    def eager_denoiser(self, module: Any, reason: str = "") -> "Component":
        from dts_util.pipeline.components import EagerUNet

        return EagerUNet(module, reason)

    # -- generation, engines, LoRA -------------------------------------------------------------------

    def pipeline(self, model: "LoadedModel", components: "ComponentProvider", should_stop: Callable[[], bool],
                 on_preview: Callable[[int, Any], None] | None) -> Callable:
        return StableDiffusionPipeline(model, components, should_stop, on_preview)

    def components(self) -> Mapping[str, "ComponentDescriptor"]:
        from dts_util.engines.components import UNET, VAE_DECODER, VAE_ENCODER

        return {c.name: c for c in (UNET, VAE_DECODER, VAE_ENCODER)}

    def lora_format(self, info: "ModelInfo") -> LoraFormat:
        if self.xl:
            return LoraFormat("StableDiffusionXLLoraLoaderMixin", "load_lora_into_unet",
                              ("text_encoder", "text_encoder_2"))
        return LoraFormat("StableDiffusionLoraLoaderMixin", "load_lora_into_unet", ("text_encoder",))


def _in_channels(info: "ModelInfo") -> int:
    return int(info.denoiser_config.get("in_channels", 4))


def _check_sizes(info: "ModelInfo") -> None:
    """The config values every request needs, checked once here rather than failing mid-request."""
    try:
        if info.native_size <= 0 or info.latent_channels <= 0:
            raise ValueError
        if _in_channels(info) not in (info.latent_channels, 2 * info.latent_channels + 1):
            raise ModelLoadError(f"model {quote(info.name)}: its UNet takes {_in_channels(info)} input channels; "
                                 f"dts-util serves text-to-image UNets ({info.latent_channels}) and inpainting "
                                 f"UNets ({2 * info.latent_channels + 1})")
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"model {quote(info.name)}: {for_log(info.name)}/unet/config.json needs a positive "
                             f"sample_size and {for_log(info.name)}/vae/config.json a block_out_channels list; "
                             "fix those files") from None


class StableDiffusionPipeline(DenoisingPipeline):
    """diffusers' SD and SDXL pipelines' semantics: CLIP chunks with emphasis, CFG as a doubled batch, SDXL's
    pooled embeddings and time ids, and an inpainting UNet's mask and masked image."""

    @property
    def xl(self) -> bool:
        return self.model.info.family == "sdxl"

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
        text_embeds = torch.cat([p.repeat(req.batch_size, 1) for p in pooled]) if self.xl else None
        return PromptEmbeddings(hidden_states, text_embeds, counts, chunks)

    @torch.inference_mode()
    def _encode_chunks(self, encoders: Any, tokenized: list[TokenChunks],
                       clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt's chunks through every text encoder: (1, 77 x chunks, width) and SDXL's pooled vector."""
        widths, pooled = [], None
        for chunks, encoder in zip(tokenized, encoders.text_encoders):
            ids = torch.tensor(chunks.ids, device=self.device)
            out = encoder(ids, output_hidden_states=True)
            if self.xl:
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
            widths.append(apply_weights(states, torch.tensor(chunks.weights, device=self.device)))
        hidden = torch.cat(widths, dim=-1)  # (chunks, 77, width)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(self.dtype), pooled

    def make_scheduler(self, req: ResolvedRequest, width: int, height: int) -> Any:
        scheduler = make_scheduler(req.sampler, self.model.info.scheduler_config)
        set_schedule(scheduler, req.sampler, req.steps, self.model.info.family, self.device)
        return scheduler

    def first_step(self, steps: int, strength: float) -> int:
        return img2img_start_step(steps, strength)

    def noise_to(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                 timestep: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(latents, noise, timestep)

    def denoiser_shape(self, req: ResolvedRequest, latents: torch.Tensor, embeddings: PromptEmbeddings) -> Shape:
        cfg_batch = 2 if req.use_cfg else 1
        return Shape(latents.shape[2], latents.shape[3], latents.shape[0] * cfg_batch,
                     embeddings.hidden_states.shape[1])

    def step_inputs(self, req: ResolvedRequest, embeddings: PromptEmbeddings, start: StartState, width: int,
                    height: int) -> dict[str, Any]:
        inputs: dict[str, Any] = {"encoder_hidden_states": embeddings.hidden_states}
        if embeddings.text_embeds is not None:
            inputs.update(text_embeds=embeddings.text_embeds, time_ids=self._time_ids(req, width, height))
        condition = start.condition
        if condition is not None and req.use_cfg:
            condition = torch.cat([condition] * 2)
        return {"unet": inputs, "condition": condition}

    def _time_ids(self, req: ResolvedRequest, width: int, height: int) -> torch.Tensor:
        """SDXL's (original size, crop top-left, target size) per image, negative branch first with CFG."""
        branches = [req.negative_size_conditioning, req.size_conditioning] if req.use_cfg \
            else [req.size_conditioning]
        ids = torch.tensor([b.time_ids(width, height) for b in branches], dtype=self.dtype, device=self.device)
        return ids.repeat_interleave(req.batch_size, dim=0)

    def denoise(self, denoiser: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
                inputs: dict[str, Any], req: ResolvedRequest) -> torch.Tensor:
        latent_in = torch.cat([latents] * 2) if req.use_cfg else latents
        latent_in = scheduler.scale_model_input(latent_in, t)
        if inputs["condition"] is not None:  # an inpainting UNet reads the mask and masked image beside them
            latent_in = torch.cat([latent_in, inputs["condition"]], dim=1)
        timestep = t.to(torch.float32).expand(latent_in.shape[0]).to(self.device)
        noise_pred = denoiser(sample=latent_in, timestep=timestep, **inputs["unet"])
        if req.use_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + req.cfg_scale * (cond - uncond)
        return noise_pred

    def inpainting_condition(self, image: EncodedImage | None, generators: list[torch.Generator], width: int,
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




def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 emphasis: scale each token's hidden state by its weight, then restore each chunk's mean."""
    if bool((weights == 1.0).all()):
        return states  # no emphasis: leave the encoder's output exactly as it is
    weighted = states * weights[..., None].to(states.dtype)
    original_mean = states.mean(dim=(1, 2), keepdim=True)
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
