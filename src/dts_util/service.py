"""The model layer the gRPC servicer delegates to: models, engines and the pipeline.

``ImageService`` knows nothing of gRPC. It takes domain requests, checks them,
picks the backend of each component for each shape (an engine when one matches,
eager PyTorch otherwise) and returns encoded results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from dts_util.boundary import GenerationOutput, GenerationRequest, ModelDescription, Shape
from dts_util.config import ServerConfig, check_dtype, check_fp8, resolve_device
from dts_util.engines.components import VAE_DECODER, VAE_ENCODER, ComponentDescriptor
from dts_util.engines.paths import fingerprint_cache
from dts_util.models.builtin import ensure_builtin_model
from dts_util.errors import FeatureUnavailable, RequestTooLarge
from dts_util.limits import MAX_RESPONSE_BYTES, MAX_PROMPT_CHARS
from dts_util.models.loader import LoadedModel, load_model, model_stamp, raise_if_out_of_memory
from dts_util.metrics import observe_generation
from dts_util.models.lora import resolve_loras
from dts_util.models.store import ModelStore
from dts_util.pipeline.components import Component, EagerVaeDecoder, EagerVaeEncoder
from dts_util.pipeline.params import ResolvedRequest, check_text_fields, resolve
from dts_util.pipeline.samplers import DEFAULT_SAMPLER

if TYPE_CHECKING:
    from dts_util.engines.manager import EngineManager
    from dts_util.pipeline.generation import GenerationResult

log = logging.getLogger(__name__)


class RequestComponents:
    """Per-request choice of denoiser / VAE runners: an engine if one matches the shape, else eager.

    With LoRAs, the denoiser comes from an engine built for that exact LoRA set, or runs eagerly with the
    LoRAs switched on (``lora_denoiser`` does that for the request).
    """

    def __init__(self, model: LoadedModel, engines: "EngineManager | None", compile_eager: bool,
                 loras: tuple = (), lora_denoiser: Callable[[object], None] | None = None) -> None:
        self.model, self.engines, self.compile_eager = model, engines, compile_eager
        self.loras, self.lora_denoiser = loras, lora_denoiser
        self.family = model.family

    def _pick(self, component: ComponentDescriptor, shape: Shape, eager: Callable[[str], Component],
              engine_model: LoadedModel | None = None) -> Component:
        if self.engines is None:
            return eager("")
        runner, reason = self.engines.runner_for(engine_model or self.model, component.name, shape)
        if runner is not None:
            # An engine serves this component now: never keep the eager weights beside it, unless another
            # component sharing them (the VAE's decoder and encoder) still runs eagerly.
            if self.model.note_engine(component.name, component.weights):
                self.model.unload(component.weights)
            return runner
        self.model.note_eager(component.name, component.weights)
        return eager(reason)

    def denoiser(self, shape: Shape) -> Component:
        descriptor = self.family.components()[self.family.denoiser]
        if self.loras:
            return self._pick(descriptor, shape, self._eager_lora_denoiser, self.model.with_loras(self.loras))
        return self._pick(descriptor, shape, lambda why: self.family.eager_denoiser(
            self._maybe_compile(self.model.denoiser()), why))

    def _eager_lora_denoiser(self, why: str) -> Component:
        module = self.model.denoiser()
        if self.lora_denoiser is not None:
            self.lora_denoiser(module)
        # Engines built for other LoRA sets (or none) show up as stale here; what matters is that none
        # was built for this one.
        return self.family.eager_denoiser(module, "LoRA: no engine for this LoRA set" if why else "LoRA")

    def vae_decoder(self, shape: Shape) -> Component:
        return self._pick(VAE_DECODER, shape, lambda why: EagerVaeDecoder(self.model.vae(), why))

    def vae_encoder(self, shape: Shape) -> Component:
        return self._pick(VAE_ENCODER, shape, lambda why: EagerVaeEncoder(self.model.vae(), why))

    def _maybe_compile(self, module):
        if not self.compile_eager:
            return module
        from dts_util.pipeline.compiled import compiled_module

        return compiled_module(module)


@dataclass
class _CachedModel:
    stamp: tuple
    model: LoadedModel


class ImageService:
    """Serves generation requests for the models in a store.

    Args:
        config: server configuration (store, engine dir, device, default model, limits).
        engines: engine manager, or None to run everything eagerly.
        store: the model store, shared by every worker of a pool (one is opened when None).
        worker: this service's worker name, for metrics.
    """

    def __init__(self, config: ServerConfig, engines: "EngineManager | None" = None,
                 store: ModelStore | None = None, worker: str = "default") -> None:
        self.config, self.worker = config, worker
        self.store = store or ModelStore(config.model_dir, config.upload_policy)
        self.device = resolve_device(config.device)
        check_dtype(config.dtype, self.device)
        check_fp8(config.fp8, self.device)
        self.engines = engines
        if config.torch_compile:
            from dts_util.pipeline.compiled import use_engine_dir_cache

            use_engine_dir_cache(config.engine_dir)
        # Canonical model name -> loaded model, least recently used first.
        self._models: OrderedDict[str, _CachedModel] = OrderedDict()
        self._loaded_names: frozenset[str] = frozenset()  # a lock-free copy of the keys above
        self._lock = threading.Lock()
        self._descriptions: dict[str, tuple[tuple, ModelDescription]] = {}
        # Generations running on each model (by id): an evicted or replaced model is unloaded only after them.
        self._in_use: dict[int, int] = {}
        self._retired: dict[int, LoadedModel] = {}
        self._descriptions_lock = threading.Lock()

    def ensure_default_model(self) -> None:
        """Create the built-in model on first run when it is the default."""
        from dts_util.config import BUILTIN_MODEL_NAME

        if self.config.default_model == BUILTIN_MODEL_NAME:
            ensure_builtin_model(self.store)

    def model_names(self) -> list[str]:
        return self.store.model_names()

    def describe_models(self) -> list[ModelDescription]:
        """Family and size of every servable model, from its configs (remembered while its files stay the same)."""
        described = []
        for name in self.store.model_names():
            try:
                described.append(self._describe(name))
            except Exception as exc:  # noqa: BLE001 - one unreadable model must not hide the others
                log.warning("model %r is left out of the model list: %s", name, exc)
        return described

    def _describe(self, name: str) -> ModelDescription:
        from dts_util.models.loader import inspect_model

        path = self.store.require_model(name)
        stamp = model_stamp(path)
        with self._descriptions_lock:  # not the models' lock: Echo must not wait for a model to load
            cached = self._descriptions.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = inspect_model(name, path, self.config.engine_dir / "single-file-configs")
        family = info.model_family
        defaults = family.defaults(info)
        description = ModelDescription(name, family.label(info), info.native_size, info.inpainting,
                                       family.app_spec(info), defaults.steps, defaults.cfg_scale,
                                       defaults.sampler or DEFAULT_SAMPLER, defaults.size_multiple)
        with self._descriptions_lock:
            self._descriptions[name] = (stamp, description)
        return description

    def model(self, name: str) -> LoadedModel:
        """The loaded model ``name`` ("" = default); inspects configs only, weights load lazily.

        Every spelling of a folder maps to one cache entry; a model whose files
        changed since it was loaded is loaded again; at most ``max_loaded_models``
        stay in memory.
        """
        canonical, path = self.store.canonical_model(name or self.config.default_model)
        stamp = model_stamp(path)
        with self._lock:
            cached = self._models.get(canonical)
            if cached is not None and cached.stamp == stamp:
                self._models.move_to_end(canonical)
                return cached.model
            if cached is not None:
                log.info("files of model %r changed; loading it again", canonical)
                self._drop(canonical)
            model = load_model(canonical, path, self.device, dtype=self.config.dtype, fp8=self.config.fp8,
                               fingerprint_cache=fingerprint_cache(self.config.engine_dir),
                               channels_last=self.config.channels_last)
            self._models[canonical] = _CachedModel(stamp, model)
            while len(self._models) > self.config.max_loaded_models:
                self._drop(next(iter(self._models)), why="least recently used")
            self._loaded_names = frozenset(self._models)
            return model

    def _drop(self, canonical: str, why: str = "") -> None:
        """Forget ``canonical``; its memory is freed now, or when the generation using it ends."""
        cached = self._models.pop(canonical)
        self._loaded_names = frozenset(self._models)
        if self._in_use.get(id(cached.model)):
            self._retired[id(cached.model)] = cached.model  # a generation runs on it: unloaded when it ends
        else:
            cached.model.unload_all()
        if why:
            log.info("unloaded model %r (%s; --max-loaded-models %d)", canonical, why, self.config.max_loaded_models)

    def loaded_models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def holds_model(self, canonical: str) -> bool:
        """Whether ``canonical`` is loaded, without waiting for a load in progress (the pool asks this
        on the event loop)."""
        return canonical in self._loaded_names

    def files_changed(self, path: Path) -> None:
        """A file of the store was replaced: drop every loaded model it belongs to (engines go stale by
        fingerprint, so none built for the old weights is used)."""
        with self._lock:
            for canonical, cached in list(self._models.items()):
                if cached.model.info.path in path.parents:
                    log.info("a file of model %r was replaced; it will be loaded again", canonical)
                    self._drop(canonical)

    def warm_up(self) -> None:
        """Load the default model's text encoders and hash its weights (engines are keyed by that
        hash; SD1.5's 4 GB take seconds) so the first request pays for neither; with
        ``--torch-compile``, compile the configured shapes too."""
        model = self.model("")
        model.prompt_encoders()
        if self.engines is not None:
            model.fingerprint  # noqa: B018 - computed and cached for engine selection
        if self.config.torch_compile:
            self.compile_shapes(model.info.native_size)
        log.info("default model %r ready on %s", model.name, self.device)

    def compile_shapes(self, native_size: int) -> None:
        """Generate once at each compile resolution (batch 1, with guidance, a few steps), so the UNet and
        the VAE decoder are compiled, or fetched from the cache, before the first request."""
        for width, height in self.config.compile_resolutions or ((native_size, native_size),):
            start = time.perf_counter()
            model, resolved = self.prepare(GenerationRequest(prompt="warm-up", width=width, height=height, steps=3,
                                                             seed=0))
            self.generate(model, resolved, lambda: False)
            log.info("torch.compile warm-up at %dx%d took %.1fs", width, height, time.perf_counter() - start)

    def prepare(self, request: GenerationRequest, streamed: bool = False) -> tuple[LoadedModel, ResolvedRequest]:
        """Check the request against its model; cheap, runs before the request queues.

        ``streamed``: the images go out in pieces, so they need not fit one response message.
        """
        check_text_fields(request)
        model = self.model(request.model)
        family = model.family
        resolved = resolve(request, model.name, family.defaults(model.info))
        resolved = replace(resolved, sampler=family.check_sampler(model.info, resolved.sampler))
        if not streamed:
            check_response_fits(resolved)
        if resolved.loras:
            if self.config.fp8:
                raise FeatureUnavailable("this server runs its denoisers in fp8 (--fp8), which LoRA adapters cannot "
                                         "attach to; send the request without LoRAs, or use a server without --fp8")
            resolved = replace(resolved, loras=resolve_loras(self.store, resolved.loras))
        return model, resolved

    def generate(self, model: LoadedModel, req: ResolvedRequest, should_stop: Callable[[], bool],
                 on_update: Callable[[dict, bytes | None], None] | None = None) -> GenerationOutput:
        """``run`` then ``encode``, on the calling thread (warm-up, tools)."""
        return self.encode(model, req, self.run(model, req, should_stop, on_update))

    def run(self, model: LoadedModel, req: ResolvedRequest, should_stop: Callable[[], bool],
            on_update: Callable[[dict, bytes | None], None] | None = None) -> "GenerationResult":
        """The device's part of one prepared request: to the end, or to the first step after ``should_stop``.

        ``on_update`` gets each progress event as it happens, with a preview PNG on the sampling
        events of every ``req.preview_every``-th step (called from the generation thread).
        """
        from dts_util.pipeline.encode import latent_preview, latent_preview_png
        from dts_util.pipeline.generation import EventLog

        events, on_preview = None, None
        if on_update is not None:
            pending: dict[str, Any] = {}
            events = EventLog(lambda event: on_update(event, pending.pop("png", None)))

            def on_preview(step: int, latents) -> None:
                pending["png"] = (latent_preview(latents) if req.latent_previews
                                  else latent_preview_png(latents, model.family.latent_rgb))

        with self._using(model):
            return self._run(model, req, should_stop, events, on_preview)

    @contextmanager
    def _using(self, model: LoadedModel) -> Iterator[None]:
        """Mark ``model`` as generating: eviction (another thread's request may load a model meanwhile) then
        leaves its weights alone until this block ends."""
        with self._lock:
            self._in_use[id(model)] = self._in_use.get(id(model), 0) + 1
        try:
            yield
        finally:
            with self._lock:
                remaining = self._in_use.pop(id(model)) - 1
                if remaining:
                    self._in_use[id(model)] = remaining
                retired = self._retired.pop(id(model), None) if not remaining else None
            if retired is not None:
                retired.unload_all()
                log.info("unloaded model %r after its last generation", retired.name)

    def _run(self, model: LoadedModel, req: ResolvedRequest, should_stop: Callable[[], bool], events: Any,
             on_preview: Any) -> "GenerationResult":
        encoders = model.prompt_encoders().text_encoders
        with model.lora_applier.applied(req.loras, encoders) as lora_denoiser:
            components = RequestComponents(model, self.engines, self.config.torch_compile, req.loras, lora_denoiser)
            try:
                return model.family.pipeline(model, components, should_stop, on_preview)(req, events)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
                raise_if_out_of_memory(exc, "this generation", model.device)
                raise

    def encode(self, model: LoadedModel, req: ResolvedRequest, result: "GenerationResult") -> GenerationOutput:
        """The CPU's part: PNGs (or WebP/JPEG), info and events, off the device so the next request can run."""
        from dts_util.pipeline.encode import encode_images, event_strings, info_json

        width, height = req.output_size
        backends = " ".join(f"{k}={v}" for k, v in result.backends.items())
        source = f" init={req.init.source_size[0]}x{req.init.source_size[1]}" if req.init is not None else ""
        summary = (f"worker={self.worker} model={model.name} mode={req.mode}{source} size={width}x{height} "
                   f"batch={req.batch_size}x{req.batch_count} steps={req.steps} sampler={req.sampler.name!r} {backends}")
        details = {"worker": self.worker, "prediction_type": model.info.prediction_type,
                   "prediction_source": model.info.prediction_source,
                   "model_file": "single file" if model.info.single_file else "diffusers folder",
                   "loras": [{"file": lora.name, "weight": lora.weight, "sha256": lora.sha256} for lora in req.loras]}
        start = time.perf_counter()
        images = [] if req.raw_output else encode_images(req, result, self.config.png_compression)
        result.timings_ms["encode_ms"] = round((time.perf_counter() - start) * 1000, 1)
        observe_generation(result.timings_ms, req.steps * req.batch_count, {"text_encoder": "eager", **result.backends},
                           self.worker)
        return GenerationOutput(images, info_json(req, result, model.fingerprint, details), event_strings(result),
                                summary, pixels=result.images if req.raw_output else [])


# Room kept in a response for info and events: every parameter, the prompts JSON-escaped, timings.
_INFO_ALLOWANCE = 2 * 1024 * 1024 + 12 * MAX_PROMPT_CHARS


def worst_case_png_bytes(width: int, height: int, text_bytes: int) -> int:
    """The largest PNG an RGB image can become: raw rows with filter bytes, deflate's stored-block
    overhead, IDAT chunk headers, and the parameters text chunk."""
    raw = height * (width * 3 + 1)
    return raw + raw // 16000 * 5 + raw // 8192 * 12 + text_bytes + 1024


def check_response_fits(req: ResolvedRequest) -> None:
    """Refuse up front a request whose PNGs could not fit in one response message."""
    width, height = req.output_size
    images = req.batch_size * req.batch_count
    text = 4 * (len(req.prompt) + len(req.negative_prompt)) + 1024
    worst = images * worst_case_png_bytes(width, height, text) + _INFO_ALLOWANCE
    if worst > MAX_RESPONSE_BYTES:
        raise RequestTooLarge(
            f"{images} image(s) of {width}x{height} can take up to {worst / 2**20:.0f} MiB as PNG, more than one "
            f"response may carry ({MAX_RESPONSE_BYTES // 2**20} MiB); use GenerateImageStream, which sends images in "
            "pieces, or lower batch_size x batch_count or the size")
