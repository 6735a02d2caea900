"""The types that cross the line between a protocol and the model layer.

A protocol package (``grpc/drawthings``) turns its messages into a
``GenerationRequest``, hands it to an ``ImageGenerator`` and turns the
``GenerationOutput`` back into messages; engines and the pipeline describe static
shapes with ``Shape``. Nothing here imports torch or grpc, so a protocol can be
loaded, served and tested without a model, and ``dts-util test`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from dts_util.models.store import ModelStore

# CLIP reads 77 tokens: one 75-token chunk between its start and end tokens.
TOKENS_PER_CHUNK = 77


@dataclass(frozen=True)
class Shape:
    """The static shape a component runs at: latent height/width and batch as the component sees it,
    and (for the UNet) the length of the text conditioning, 77 tokens per prompt chunk."""

    latent_height: int
    latent_width: int
    batch: int
    text_length: int = TOKENS_PER_CHUNK

    def describe(self, vae_scale: int = 8) -> str:
        text = f" t{self.text_length}" if self.text_length != TOKENS_PER_CHUNK else ""
        return f"{self.latent_width * vae_scale}x{self.latent_height * vae_scale} b{self.batch}{text}"


@dataclass(frozen=True)
class GenerationRequest:
    """A GenerateImage request, field for field (plus the dts-util extensions).

    0 (or "") means "use the default", since proto3 cannot tell unset from 0;
    ``pipeline.params.resolve`` checks the values and fills the defaults.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    cfg_scale: float = 0.0
    seed: int = -1
    sampler: str = ""
    restore_faces: bool = False
    enable_hr: bool = False
    denoising_strength: float = 0.0
    batch_size: int = 0
    batch_count: int = 0
    model: str = ""
    hr_scale: float = 0.0
    clip_skip: int = 0
    loras: tuple[tuple[str, float], ...] = ()
    preview_every: int = 0
    output_format: str = ""
    quality: int = 0
    init_image: bytes = b""  # encoded PNG/JPEG/WebP: img2img, and inpainting with ``mask``
    mask: bytes = b""
    mask_blur: float = 0  # pixels (the standard deviation of the Gaussian); the seed protocol sends whole pixels
    mask_outset: int = 0  # pixels the repainted area grows (negative: shrinks) before the blur
    skip_mask_overlay: bool = False
    seed_mode: str = ""
    # Streamed previews as the Draw Things app takes them: the latents themselves (``LatentPreview``), at the app's
    # cadence (odd steps in the first half of sampling, every step after it), instead of PNGs every N steps.
    latent_previews: bool = False
    zero_negative_prompt: bool = False
    # SDXL micro-conditioning in pixels (0 = the generation's size, no crop); negative_* default to these.
    original_width: int = 0
    original_height: int = 0
    crop_top: int = 0
    crop_left: int = 0
    target_width: int = 0
    target_height: int = 0
    negative_original_width: int = 0
    negative_original_height: int = 0
    negative_crop_top: int = 0
    negative_crop_left: int = 0
    negative_target_width: int = 0
    negative_target_height: int = 0
    # Guidance-distilled models (FLUX.1 [dev]): cfg_scale is their guidance embedding; true CFG with the negative
    # prompt runs at true_cfg_scale (0 or <= 1: none). SD models ignore both.
    true_cfg_scale: float = 0.0
    shift: float = 0.0  # flow-matching models: a fixed sigma shift (0 = the model's, resolution-dependent where it is)
    # The Draw Things app's guidance embedding: for guidance-distilled models it takes cfg_scale's place (the app's
    # own guidance then drives true CFG). Not a field of the seed protocol, whose cfg_scale is that guidance.
    guidance_embed: float = 0.0
    # A protocol that already holds pixels (the Draw Things app sends tensors) passes them decoded, as PIL images,
    # instead of encoding init_image/mask for the model layer to decode again; and with raw_output it takes the
    # result as pixels, not PNGs. Neither is a field of the seed protocol.
    init_pixels: object = None
    mask_pixels: object = None
    raw_output: bool = False


@dataclass(frozen=True)
class GenerationOutput:
    """What a generation returns, plus a one-line summary for the request log."""

    images: list[bytes]
    info: str
    events: list[str]
    summary: str
    # With ``raw_output``: the images as decoded RGB pixels (PIL images) instead of encoded ``images``.
    pixels: list = field(default_factory=list)


@dataclass(frozen=True)
class ModelDescription:
    """What a client's model browser needs to know about a servable model, read from its configs."""

    name: str
    family: str  # the family's label: "sd1", "sd2", "sdxl", "flux1", ...
    native_size: int  # pixels per side
    inpainting: bool  # a dedicated inpainting model (9-channel UNet)
    # The Draw Things app's model specification fields ("version", "modifier", ...), from the family.
    app_spec: Mapping[str, object] = field(default_factory=dict)
    default_steps: int = 20
    default_cfg_scale: float = 7.0
    default_sampler: str = ""
    size_multiple: int = 8


@dataclass(frozen=True)
class LatentPreview:
    """The first image's latents at a preview step: fp16 values in NHWC order (the client maps them to RGB)."""

    height: int
    width: int
    channels: int
    values: bytes  # little-endian fp16, height x width x channels


# Called from the generation thread with each progress event and, on preview steps, a preview (a PNG, or the
# latents themselves for ``latent_previews``).
UpdateCallback = Callable[[dict, "bytes | LatentPreview | None"], None]


class ImageGenerator(Protocol):
    """What a protocol needs from the model layer (``workers.WorkerPool`` is the real one)."""

    store: "ModelStore"
    default_model: str

    def model_names(self) -> list[str]:
        """Models clients may name, for Echo."""

    def describe_models(self) -> list[ModelDescription]:
        """Every servable model with its family and size (models whose configs cannot be read are left out)."""

    def files_changed(self, path: Path) -> None:
        """A store file was replaced: forget what was loaded from it."""

    async def generate(self, request: GenerationRequest, *, streamed: bool = False,
                       on_update: UpdateCallback | None = None) -> GenerationOutput:
        """Check, queue and run one request; cancelling the awaiting task stops it at the next step."""

    def check_room(self, model: str) -> None:
        """QueueFull when a request for ``model`` could not wait now (asked before a protocol decodes images)."""

    def prepare_store(self) -> None:
        """Before listening: clean the store of abandoned temporary files, create the built-in model."""

    def warm_up(self) -> None:
        """Load what the first request would otherwise wait for."""

    def close(self) -> None:
        """Stop the workers and release engines."""
