"""Loading models: diffusers folders and single files, for every family in ``families/``.

This is the one path every model takes, the built-in one included: the model's family
(``families.family_for_index`` / ``family_for_file``) reads its configs, and loads each
component with the real diffusers/transformers ``from_pretrained``, or, for single files,
``from_single_file`` with a local config folder, offline. Components load lazily and one at
a time, because when a compiled engine serves the denoiser the eager one must never be
resident beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from dts_util.errors import DeviceOutOfMemory, ModelLoadError
from dts_util.client_text import for_log, quote
from dts_util.models.store import read_model_index

if TYPE_CHECKING:
    from dts_util.families import ModelFamily

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
# from_pretrained initialises on the meta device by patching torch.nn.Module globally
# (accelerate's init_empty_weights), so two loads in two threads corrupt each other.
LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model without loading any weights."""

    name: str
    path: Path
    family: str  # a key of families.FAMILIES: "sd" (1.x / 2.x), "sdxl", "flux", ...
    denoiser_config: dict  # the UNet's or transformer's config.json
    vae_config: dict
    scheduler_config: dict
    # Single files: the diffusers config folder their weights load into.
    config_dir: Path | None = None
    prediction_source: str = "model config"
    # Single files: every component's file (a family whose parts live in separate files, e.g. ComfyUI's FLUX).
    files: Mapping[str, Path] = field(default_factory=dict)
    # The dtype of the denoiser's weights as stored ("bf16", "fp8_e4m3fn", ...; "" where unknown).
    stored_dtype: str = ""
    # Facts a family reads from model_index.json or a sidecar that no component config holds (klein's is_distilled).
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_family(self) -> "ModelFamily":
        from dts_util.families import get_family

        return get_family(self.family)

    @property
    def unet_config(self) -> dict:
        """The denoiser's config under the name SD code knows it by."""
        return self.denoiser_config

    @property
    def single_file(self) -> bool:
        return self.config_dir is not None

    @property
    def prediction_type(self) -> str:
        if str(self.scheduler_config.get("_class_name", "")).startswith("FlowMatch"):
            return "flow_prediction"  # the model predicts the velocity from noise to image
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """Pixel size the model was trained at."""
        return self.model_family.native_size(self)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents: what the sampler denoises."""
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def unet_in_channels(self) -> int:
        """The denoiser's input channels as its config states them."""
        return int(self.denoiser_config.get("in_channels", self.latent_channels))

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting model, conditioned on a mask and the masked image besides the latents."""
        return self.model_family.inpainting(self)


def inspect_model(name: str, path: Path, config_cache: Path | None = None) -> ModelInfo:
    """Read a model's configs and decide its family; loads no weights."""
    from dts_util.families import family_for_file, family_for_index, served_pipelines

    if path.is_file():
        if config_cache is None:
            raise ModelLoadError(f"model {quote(name)} is a single file, and no config cache was given")
        from dts_util.models.checkpoint import cached_shapes, refuse_unknown_file

        shapes = cached_shapes(path)
        family = family_for_file(shapes)
        if family is None:
            refuse_unknown_file(shapes, name)
        return family.inspect_file(name, path, config_cache)
    index = read_model_index(path, name)
    family = family_for_index(index)
    if family is None:
        class_name = index.get("_class_name", "") or "unknown"
        raise ModelLoadError(f"model {quote(name)} is a {for_log(class_name, 80)} pipeline; dts-util serves "
                             f"{', '.join(served_pipelines())} models in the diffusers layout")
    return family.inspect_folder(name, path, index)


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


def model_fingerprint(path: Path, cache_file: Path | None = None, companions: tuple[Path, ...] = ()) -> str:
    """SHA-256 over a model's weight files (names and bytes); of a single-file checkpoint, the file's SHA-256;
    of a single file with ``companions`` (FLUX's text encoders and VAE), over all of them with their names.

    Hashing SD1.5's 4 GB takes seconds, so results are cached in ``cache_file``
    keyed by each file's size and modification time; a changed file is rehashed.
    """
    companions = tuple(sorted({c for c in companions if c != path}))
    files = weight_files(path) + list(companions)
    named = not path.is_file() or bool(companions)
    stamp = [[_weight_name(path, f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = "|".join(str(f.resolve()) for f in (path, *companions))
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
        if named:
            digest.update(_weight_name(path, f).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    result = digest.hexdigest()
    if cache_file is not None:
        cache[key] = {"stamp": stamp, "sha256": result}
        _save_fingerprints(cache_file, cache)
    return result


def _weight_name(path: Path, file: Path) -> str:
    """A weight file's name in a fingerprint: relative to its model folder, else its own name."""
    return str(file.relative_to(path)) if not path.is_file() and path in file.parents else file.name


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
    """Tokenizers and text encoders, in the order the family's pipeline reads them (SD: one pair; SDXL, FLUX:
    two)."""

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
    # The denoiser's linear layers quantized to float8 after loading (serve --fp8).
    fp8: bool = False
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
            self._fingerprint = model_fingerprint(self.info.path, self.fingerprint_cache,
                                                  tuple(self.info.files.values()))
        return lora_set_fingerprint(self._fingerprint, self.loras)

    def with_loras(self, loras: tuple) -> "LoadedModel":
        """This model with ``loras`` applied to its UNet: its own components, its own fingerprint."""
        from dataclasses import replace

        return replace(self, loras=tuple(loras), _parts={}, _lock=threading.RLock(), _eager_users={})

    @property
    def family(self) -> "ModelFamily":
        return self.info.model_family

    @property
    def lora_applier(self):
        from dts_util.models.lora import LoraApplier

        with self._lock:
            if "lora_applier" not in self._parts:
                self._parts["lora_applier"] = LoraApplier(self.family.lora_format(self.info))
            return self._parts["lora_applier"]

    def _load(self, key: str, loader) -> Any:
        with self._lock:
            if key not in self._parts:
                log.info("loading %s of %r on %s", key, self.name, self.device)
                try:
                    self._parts[key] = loader()
                except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                    raise_if_out_of_memory(exc, f"loading {key} of model {quote(self.name)}", self.device)
                    # Loader messages name absolute paths; clients see the model's own name instead.
                    detail = str(exc)
                    for path in {self.info.path, *self.info.files.values()}:
                        detail = detail.replace(str(path), self.name)
                    raise ModelLoadError(f"cannot load {key} of model {quote(self.name)}: "
                                         f"{for_log(detail)}") from exc
            return self._parts[key]

    def from_pretrained(self, cls, subfolder: str, dtype: Any = None, file: Path | None = None) -> Any:
        """Component ``subfolder`` of this model: from its diffusers folder, or from a single file (this model's,
        or ``file``) with the config in ``config_dir/subfolder``; on this model's device, for inference."""
        quiet_hf_progress()
        dtype = dtype or self.dtype
        with LOAD_LOCK:
            if self.info.single_file:
                source = file or self.info.path
                module = cls.from_single_file(str(source), config=str(self.info.config_dir),
                                              subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
            else:
                module = cls.from_pretrained(self.info.path, subfolder=subfolder, torch_dtype=dtype,
                                             local_files_only=True)
        return self.prepare_module(module, subfolder)

    def prepare_module(self, module: Any, part: str) -> Any:
        """A freshly loaded module on this model's device, in inference mode (channels-last for convolutions)."""
        module = module.to(self.device).eval().requires_grad_(False)
        if self.channels_last and part in ("unet", "vae"):
            import torch

            module = module.to(memory_format=torch.channels_last)
        return module

    def denoiser(self) -> Any:
        """The eager denoiser (UNet or transformer), with this model's fused LoRA set switched on."""
        def load() -> Any:
            module = self.family.load_denoiser(self)
            if self.fp8:
                module = quantize_fp8(module)
            if self.loras:
                self.lora_applier.activate(self.loras, module, [])
            return module

        return self._load(self.family.denoiser, load)

    def unet(self) -> Any:
        """The denoiser under the name SD code and tools know it by."""
        return self.denoiser()

    @property
    def vae_dtype(self) -> Any:
        """The VAE's dtype: fp32 where the weights are fp16 and the VAE's config asks for ``force_upcast``
        (diffusers' default, and SDXL's VAE overflows in fp16 into NaN, i.e. black, images)."""
        import torch

        if self.dtype == torch.float16 and self.info.vae_config.get("force_upcast", True):
            return torch.float32
        return self.dtype

    def vae(self) -> Any:
        return self._load("vae", lambda: self.family.load_vae(self))

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
        return self._load("text_encoders", lambda: self.family.load_prompt_encoders(self))


def quiet_hf_progress() -> None:
    """Weight-loading progress bars belong in a terminal, not in the server's one-line-per-record log."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def raise_if_out_of_memory(exc: BaseException, doing: str, device: str) -> None:
    """A CUDA out-of-memory error as DeviceOutOfMemory (RESOURCE_EXHAUSTED: retry later, or ask for less), with the
    allocator's cached blocks released; any other error is left to the caller."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        _empty_device_cache(device)
        raise DeviceOutOfMemory(f"{doing} ran out of GPU memory on {device}; retry when other requests are done, "
                                "or ask for fewer or smaller images (--max-loaded-models lowers what stays "
                                "loaded)") from None


def _empty_device_cache(device: str) -> None:
    """Return freed blocks to the driver on the model's own GPU (``empty_cache`` acts on the current device, which
    is another one in a worker serving cuda:1 from a thread whose current device is cuda:0)."""
    if device.startswith("cuda"):
        import torch

        with torch.cuda.device(device):
            torch.cuda.empty_cache()


DTYPES = ("auto", "fp32", "fp16", "bf16")


def default_dtype(device: str, dtype: str = "auto", info: ModelInfo | None = None) -> Any:
    """The torch dtype of eager weights: ``auto`` is the model family's choice (SD: fp16 on CUDA and fp32 on the
    CPU; FLUX: bf16 on CUDA and its weights' own width on the CPU)."""
    import torch

    if dtype == "auto":
        if info is not None:
            return info.model_family.auto_dtype(info, device)
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def quantize_fp8(module: Any) -> Any:
    """Every linear layer of ``module`` with float8-e4m3 weights and per-row dynamically scaled float8
    activations (torchao), for GPUs with fp8 tensor cores; ``check_fp8`` vouched for them at start-up."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return module


def load_model(name: str, path: Path, device: str, fingerprint_cache: Path | None = None,
               config_cache: Path | None = None, dtype: str = "auto", channels_last: bool = False,
               fp8: bool = False) -> LoadedModel:
    """Inspect a diffusers model folder or a checkpoint file; components load on first use.

    Args:
        config_cache: where config folders of single-file checkpoints are built (default: beside the
            fingerprint cache).
    """
    if config_cache is None:
        import tempfile

        config_cache = (fingerprint_cache.parent if fingerprint_cache is not None
                        else Path(tempfile.gettempdir()) / "dts-util") / "single-file-configs"
    info = inspect_model(name, path, config_cache)
    return LoadedModel(info, device, default_dtype(device, dtype, info), fingerprint_cache,
                       channels_last=channels_last, fp8=fp8)
