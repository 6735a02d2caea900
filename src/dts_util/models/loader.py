"""Loading Stable Diffusion 1.x / 2.x and SDXL models: diffusers folders and single-file checkpoints.

This is the one path every model takes, the built-in one included: the real
diffusers/transformers ``from_pretrained`` of each component folder, or, for a
single ``.safetensors``/``.ckpt`` checkpoint, diffusers' ``from_single_file`` with
a config folder built from the checkpoint's shapes (``checkpoint.py``), offline.
Components load lazily and one at a time, because when a compiled engine serves
the UNet the eager UNet must never be resident beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dts_util.errors import ModelLoadError
from dts_util.client_text import for_log, quote
from dts_util.models.store import read_json_file, read_model_index

log = logging.getLogger(__name__)

SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                "OnnxStableDiffusionPipeline"}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
# from_pretrained initialises on the meta device by patching torch.nn.Module globally
# (accelerate's init_empty_weights), so two loads in two threads corrupt each other.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model folder without loading any weights."""

    name: str
    path: Path
    family: str  # "sd" (1.x / 2.x) or "sdxl"
    unet_config: dict
    vae_config: dict
    scheduler_config: dict
    # Single-file checkpoints: the diffusers config folder diffusers loads the file's weights into.
    config_dir: Path | None = None
    prediction_source: str = "model config"

    @property
    def single_file(self) -> bool:
        return self.config_dir is not None

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """Pixel size the UNet was trained at (sample_size is in latent pixels)."""
        return int(self.unet_config["sample_size"]) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents: what the sampler denoises."""
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def unet_in_channels(self) -> int:
        """The UNet's input channels: the latents, and for an inpainting UNet also the mask and the masked
        image's latents (4 + 1 + 4 = 9)."""
        return int(self.unet_config.get("in_channels", 4))

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting model, conditioned on a mask and the masked image besides the latents."""
        return self.unet_in_channels == 2 * self.latent_channels + 1


def inspect_checkpoint(name: str, path: Path, config_cache: Path) -> ModelInfo:
    """Decide a single-file checkpoint's family, architecture and prediction type from its shapes and
    sidecars, and build its config folder; reads no tensor data (a ``.ckpt`` is unpickled safely)."""
    from dataclasses import replace

    from dts_util.models import checkpoint

    architecture = checkpoint.detect(checkpoint.cached_shapes(path), name)
    kind, source, variant = checkpoint.prediction_type(path, architecture)
    overrides = {**architecture.overrides, "scheduler": {"prediction_type": kind}}
    folder = checkpoint.config_folder(replace(architecture, variant=variant, overrides=overrides), config_cache)
    info = ModelInfo(
        name=name, path=path, family="sdxl" if architecture.family == "sdxl" else "sd",
        unet_config=read_json_file(folder / "unet" / "config.json", f"{name} (unet config)"),
        vae_config=read_json_file(folder / "vae" / "config.json", f"{name} (vae config)"),
        scheduler_config=read_json_file(folder / "scheduler" / "scheduler_config.json", f"{name} (scheduler)"),
        config_dir=folder, prediction_source=source,
    )
    _check_sizes(info)
    return info


def inspect_model(name: str, path: Path, config_cache: Path | None = None) -> ModelInfo:
    """Read a model's configs and decide its family; loads no weights."""
    if path.is_file():
        if config_cache is None:
            raise ModelLoadError(f"model {quote(name)} is a single file, and no config cache was given")
        return inspect_checkpoint(name, path, config_cache)
    index = read_model_index(path, name)
    class_name = index.get("_class_name", "")
    if class_name in SDXL_PIPELINES or "text_encoder_2" in index:
        family = "sdxl"
    elif class_name in SD_PIPELINES or "text_encoder" in index:
        family = "sd"
    else:
        raise ModelLoadError(f"model {quote(name)} is a {for_log(class_name or 'unknown', 80)} pipeline; "
                             "dts-util serves "
                             "Stable Diffusion 1.x/2.x and SDXL models in the diffusers layout")
    for part in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
        if not (path / part).is_dir():
            raise ModelLoadError(f"model {quote(name)} has no {part}/ folder; is the diffusers layout complete?")
    info = ModelInfo(
        name=name, path=path, family=family,
        unet_config=read_json_file(path / "unet" / "config.json", f"{name}/unet/config.json"),
        vae_config=read_json_file(path / "vae" / "config.json", f"{name}/vae/config.json"),
        scheduler_config=read_json_file(path / "scheduler" / "scheduler_config.json",
                                        f"{name}/scheduler/scheduler_config.json"),
    )
    _check_sizes(info)
    return info


def _check_sizes(info: ModelInfo) -> None:
    """The config values every request needs, checked once here rather than failing mid-request."""
    try:
        if info.native_size <= 0 or info.latent_channels <= 0:
            raise ValueError
        if info.unet_in_channels not in (info.latent_channels, 2 * info.latent_channels + 1):
            raise ModelLoadError(f"model {quote(info.name)}: its UNet takes {info.unet_in_channels} input channels; "
                                 f"dts-util serves text-to-image UNets ({info.latent_channels}) and inpainting "
                                 f"UNets ({2 * info.latent_channels + 1})")
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"model {quote(info.name)}: {info.name}/unet/config.json needs a positive sample_size "
                             f"and {info.name}/vae/config.json a block_out_channels list; fix those files") from None


def model_stamp(path: Path) -> tuple:
    """Names, sizes and modification times of a model's config and weight files: cheap to take, and
    different whenever a file was replaced, so a loaded model can tell it is out of date."""
    if path.is_file():  # a checkpoint and its sidecars
        files = [path, path.with_suffix(".yaml"), path.with_name(path.name + ".dts.json")]
        return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    stamp = []
    for file in sorted(path.rglob("*")):
        if file.suffix in (*WEIGHT_SUFFIXES, ".json") and not file.name.startswith("."):
            try:
                info = file.stat()
            except OSError:
                continue
            stamp.append((str(file.relative_to(path)), info.st_size, info.st_mtime_ns))
    return tuple(stamp)


def weight_files(path: Path) -> list[Path]:
    """Every weight file of a model folder (or the checkpoint itself), in a stable order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and not p.name.startswith("."))


def model_fingerprint(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 over a model's weight files (names and bytes); of a single-file checkpoint, the file's SHA-256.

    Hashing SD1.5's 4 GB takes seconds, so results are cached in ``cache_file``
    keyed by each file's size and modification time; a changed file is rehashed.
    """
    files = weight_files(path)
    stamp = [[f.name if path.is_file() else str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
             for f in files]
    key = str(path.resolve())
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    if cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    for f in files:
        if not path.is_file():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    result = digest.hexdigest()
    if cache_file is not None:
        cache[key] = {"stamp": stamp, "sha256": result}
        _save_fingerprints(cache_file, cache)
    return result


def _save_fingerprints(cache_file: Path, cache: dict) -> None:
    """Write the cache under a temporary name of its own and rename it into place: servers sharing an
    engine dir save it at the same moments. A cache that cannot be saved is only a slower next start."""
    from dts_util.atomic_files import write_text_atomic

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, json.dumps(cache))
    except OSError as exc:
        log.warning("could not save the weights-fingerprint cache %s: %s", cache_file, exc.strerror or exc)


@dataclass
class PromptEncoders:
    """Tokenizers and text encoders: one pair for SD, two for SDXL."""

    tokenizers: list[Any]
    text_encoders: list[Any]


@dataclass
class LoadedModel:
    """A model whose components load on first use.

    Args:
        info: configs and family, from ``inspect_model``.
        device: torch device string.
        dtype: torch dtype of the weights (fp16 on CUDA, fp32 on CPU).
    """

    info: ModelInfo
    device: str
    dtype: Any
    fingerprint_cache: Path | None = None
    # LoRAs fused into this model's UNet for good (a view for building and finding LoRA engines).
    loras: tuple = ()
    # UNet and VAE in channels-last memory layout (faster convolutions on some GPUs: measure).
    channels_last: bool = False
    _parts: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    # Weights (e.g. "vae") -> the components that have run on them eagerly.
    _eager_users: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def fingerprint(self) -> str:
        """What engines are keyed by: the weights' SHA-256, combined with the LoRA set when there is one."""
        from dts_util.models.lora import lora_set_fingerprint

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.info.path, self.fingerprint_cache)
        return lora_set_fingerprint(self._fingerprint, self.loras)

    def with_loras(self, loras: tuple) -> "LoadedModel":
        """This model with ``loras`` applied to its UNet: its own components, its own fingerprint."""
        from dataclasses import replace

        return replace(self, loras=tuple(loras), _parts={}, _lock=threading.RLock(), _eager_users={})

    @property
    def lora_applier(self):
        from dts_util.models.lora import LoraApplier

        with self._lock:
            if "lora_applier" not in self._parts:
                self._parts["lora_applier"] = LoraApplier(self.info.family)
            return self._parts["lora_applier"]

    def _load(self, key: str, loader) -> Any:
        with self._lock:
            if key not in self._parts:
                log.info("loading %s of %r on %s", key, self.name, self.device)
                try:
                    self._parts[key] = loader()
                except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                    # Loader messages name absolute paths; clients see the model's own name instead.
                    detail = str(exc).replace(str(self.info.path), self.name)
                    raise ModelLoadError(f"cannot load {key} of model {quote(self.name)}: "
                                         f"{for_log(detail)}") from exc
            return self._parts[key]

    def _from_pretrained(self, cls, subfolder: str, dtype: Any = None) -> Any:
        _quiet_hf_progress()
        dtype = dtype or self.dtype
        with _LOAD_LOCK:
            if self.info.single_file:
                module = cls.from_single_file(str(self.info.path), config=str(self.info.config_dir),
                                              subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
            else:
                module = cls.from_pretrained(self.info.path, subfolder=subfolder, torch_dtype=dtype,
                                             local_files_only=True)
        module = module.to(self.device).eval().requires_grad_(False)
        if self.channels_last and subfolder in ("unet", "vae"):
            import torch

            module = module.to(memory_format=torch.channels_last)
        return module

    def _single_file_text_encoders(self) -> list[Any]:
        """A checkpoint's text encoders, through the pipeline-level loader (the models themselves have no
        single-file loader); the UNet and VAE are skipped here and load on their own when needed."""
        import diffusers

        _quiet_hf_progress()
        pipeline_class = diffusers.StableDiffusionXLPipeline if self.info.family == "sdxl" \
            else diffusers.StableDiffusionPipeline
        skip = {"unet": None, "vae": None, "scheduler": None}
        if self.info.family != "sdxl":
            skip.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        with _LOAD_LOCK:
            pipeline = pipeline_class.from_single_file(str(self.info.path), config=str(self.info.config_dir),
                                                       torch_dtype=self.dtype, local_files_only=True, **skip)
        names = ["text_encoder", "text_encoder_2"] if self.info.family == "sdxl" else ["text_encoder"]
        return [getattr(pipeline, n).to(self.device).eval().requires_grad_(False) for n in names]

    def unet(self) -> Any:
        from diffusers import UNet2DConditionModel

        def load() -> Any:
            module = self._from_pretrained(UNet2DConditionModel, "unet")
            if self.loras:
                self.lora_applier.activate(self.loras, module, [])
            return module

        return self._load("unet", load)

    @property
    def vae_dtype(self) -> Any:
        """The VAE's dtype: fp32 where the weights are fp16 and the VAE's config asks for ``force_upcast``
        (diffusers' default, and SDXL's VAE overflows in fp16 into NaN, i.e. black, images)."""
        import torch

        if self.dtype == torch.float16 and self.info.vae_config.get("force_upcast", True):
            return torch.float32
        return self.dtype

    def vae(self) -> Any:
        from diffusers import AutoencoderKL

        return self._load("vae", lambda: self._from_pretrained(AutoencoderKL, "vae", self.vae_dtype))

    def note_eager(self, component: str, weights: str) -> None:
        """``component`` ran eagerly on ``weights``: an engine of another component must not unload them."""
        with self._lock:
            self._eager_users.setdefault(weights, set()).add(component)

    def note_engine(self, component: str, weights: str) -> bool:
        """``component`` runs on an engine now; True when no other component still runs on ``weights`` eagerly,
        so they may be unloaded."""
        with self._lock:
            users = self._eager_users.setdefault(weights, set())
            users.discard(component)
            return not users

    def is_loaded(self, component: str) -> bool:
        return component in self._parts

    def unload(self, component: str) -> None:
        """Drop an eager component (e.g. once an engine serves it) so its memory is freed."""
        with self._lock:
            if self._parts.pop(component, None) is not None:
                log.info("unloaded eager %s of %r", component, self.name)
                _empty_device_cache(self.device)

    def unload_all(self) -> None:
        """Drop every loaded component (the model left the server's cache)."""
        with self._lock:
            self._parts = {}
            _empty_device_cache(self.device)

    def prompt_encoders(self) -> PromptEncoders:
        def load() -> PromptEncoders:
            from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

            folder = self.info.config_dir or self.info.path  # tokenizers: shipped with the configs, or the model's
            subfolders = ["tokenizer", "tokenizer_2"] if self.info.family == "sdxl" else ["tokenizer"]
            tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
                          for sub in subfolders]
            if self.info.single_file:
                return PromptEncoders(tokenizers, self._single_file_text_encoders())
            encoders = [self._from_pretrained(CLIPTextModel, "text_encoder")]
            if self.info.family == "sdxl":
                encoders.append(self._from_pretrained(CLIPTextModelWithProjection, "text_encoder_2"))
            return PromptEncoders(tokenizers, encoders)

        return self._load("text_encoders", load)


def _quiet_hf_progress() -> None:
    """Weight-loading progress bars belong in a terminal, not in the server's one-line-per-record log."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


DTYPES = ("auto", "fp32", "fp16", "bf16")


def default_dtype(device: str, dtype: str = "auto") -> Any:
    """The torch dtype of eager weights: ``auto`` is fp16 on CUDA and fp32 on the CPU."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def load_model(name: str, path: Path, device: str, fingerprint_cache: Path | None = None,
               config_cache: Path | None = None, dtype: str = "auto", channels_last: bool = False) -> LoadedModel:
    """Inspect a diffusers model folder or a checkpoint file; components load on first use.

    Args:
        config_cache: where config folders of single-file checkpoints are built (default: beside the
            fingerprint cache).
    """
    if config_cache is None:
        import tempfile

        config_cache = (fingerprint_cache.parent if fingerprint_cache is not None
                        else Path(tempfile.gettempdir()) / "dts-util") / "single-file-configs"
    return LoadedModel(inspect_model(name, path, config_cache), device, default_dtype(device, dtype), fingerprint_cache,
                       channels_last=channels_last)
