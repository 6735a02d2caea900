"""The model layer the gRPC servicer delegates to: models, engines and the pipeline.

``ImageService`` knows nothing of gRPC. It takes domain requests, checks them,
picks the backend of each component for each shape (an engine when one matches,
eager PyTorch otherwise) and returns encoded results.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dts_util.config import ServerConfig, resolve_device
from dts_util.engines.paths import fingerprint_cache
from dts_util.models.builtin import ensure_builtin_model
from dts_util.models.loader import LoadedModel, load_model
from dts_util.models.store import ModelStore
from dts_util.pipeline.components import Component, EagerUNet, EagerVaeDecoder, Shape
from dts_util.pipeline.params import GenerationRequest, ResolvedRequest, resolve

if TYPE_CHECKING:
    from dts_util.engines.manager import EngineManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOutput:
    """What GenerateImage sends back, plus a one-line summary for the request log."""

    images: list[bytes]
    info: str
    events: list[str]
    summary: str


class RequestComponents:
    """Per-request choice of UNet / VAE decoder runners: an engine if one matches the shape, else eager."""

    def __init__(self, model: LoadedModel, engines: "EngineManager | None", compile_eager: bool) -> None:
        self.model, self.engines, self.compile_eager = model, engines, compile_eager

    def _pick(self, component: str, shape: Shape, eager: Callable[[str], Component]) -> Component:
        if self.engines is None:
            return eager("")
        runner, reason = self.engines.runner_for(self.model, component, shape)
        if runner is not None:
            # An engine serves this component now: never keep the eager weights beside it.
            self.model.unload(component if component != "vae_decoder" else "vae")
            return runner
        return eager(reason)

    def unet(self, shape: Shape) -> Component:
        return self._pick("unet", shape, lambda why: EagerUNet(self._maybe_compile(self.model.unet()), why))

    def vae_decoder(self, shape: Shape) -> Component:
        return self._pick("vae_decoder", shape, lambda why: EagerVaeDecoder(self.model.vae(), why))

    def _maybe_compile(self, module):
        if not self.compile_eager:
            return module
        from dts_util.pipeline.compiled import compiled_module

        return compiled_module(module)


class ImageService:
    """Serves generation requests for the models in a store.

    Args:
        config: server configuration (store, engine dir, device, default model).
        engines: engine manager, or None to run everything eagerly.
    """

    def __init__(self, config: ServerConfig, engines: "EngineManager | None" = None) -> None:
        self.config = config
        self.store = ModelStore(config.model_dir)
        self.device = resolve_device(config.device)
        self.engines = engines
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def ensure_default_model(self) -> None:
        """Create the built-in model on first run when it is the default."""
        from dts_util.config import BUILTIN_MODEL_NAME

        if self.config.default_model == BUILTIN_MODEL_NAME:
            ensure_builtin_model(self.store)

    def model_names(self) -> list[str]:
        return self.store.model_names()

    def model(self, name: str) -> LoadedModel:
        """The loaded model ``name`` ("" = default); inspects configs only, weights load lazily."""
        name = name or self.config.default_model
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(name, self.store.require_model(name), self.device,
                                                fingerprint_cache=fingerprint_cache(self.config.engine_dir))
            return self._models[name]

    def warm_up(self) -> None:
        """Load the default model's text encoders and hash its weights (engines are keyed by that
        hash; SD1.5's 4 GB take seconds) so the first request pays for neither."""
        model = self.model("")
        model.prompt_encoders()
        if self.engines is not None:
            model.fingerprint  # noqa: B018 - computed and cached for engine selection
        log.info("default model %r ready on %s", model.name, self.device)

    def prepare(self, request: GenerationRequest) -> tuple[LoadedModel, ResolvedRequest]:
        """Check the request against its model; cheap, runs before the request queues."""
        model = self.model(request.model)
        return model, resolve(request, model.name, model.info.native_size)

    def generate(self, model: LoadedModel, req: ResolvedRequest,
                 should_stop: Callable[[], bool]) -> GenerationOutput:
        """Run one prepared request to the end (or to the first step after ``should_stop``)."""
        from dts_util.pipeline.encode import encode_pngs, event_strings, info_json
        from dts_util.pipeline.txt2img import Txt2ImgPipeline

        components = RequestComponents(model, self.engines, self.config.torch_compile)
        result = Txt2ImgPipeline(model, components, should_stop)(req)
        width, height = req.output_size
        backends = " ".join(f"{k}={v}" for k, v in result.backends.items())
        summary = (f"model={model.name} size={width}x{height} batch={req.batch_size}x{req.batch_count} "
                   f"steps={req.steps} sampler={req.sampler.name!r} {backends}")
        return GenerationOutput(encode_pngs(req, result), info_json(req, result, model.fingerprint),
                                event_strings(result), summary)
