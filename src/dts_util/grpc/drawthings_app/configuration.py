"""The app's ``GenerationConfiguration`` flatbuffer, read slot by slot, and what it asks of the model layer.

The schema (``config.fbs`` of the app) has no file identifier and numbers its fields
by position, deprecated ones included; the app leaves out every field equal to its
default, so each read below names the schema's default. Sizes are in 64-pixel
units. What the app can ask for and dts-util cannot do yet is refused by name
(``unsupported``), never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dts_util.errors import FeatureUnavailable, InvalidRequest
from dts_util.pipeline.samplers import APP_SAMPLERS, app_sampler

MAX_CONFIGURATION_BYTES = 64 * 1024
MAX_CONFIGURATION_LORAS = 8
SIZE_UNIT = 64
@dataclass(frozen=True)
class AppLora:
    file: str
    weight: float


@dataclass(frozen=True)
class AppConfiguration:
    """The fields of a GenerationConfiguration that dts-util reads (sizes in pixels)."""

    width: int
    height: int
    seed: int
    steps: int
    guidance_scale: float
    strength: float
    model: str
    sampler: str
    batch_count: int
    batch_size: int
    hires_fix: bool
    hires_fix_width: int
    hires_fix_height: int
    hires_fix_strength: float
    clip_skip: int
    mask_blur: float
    preserve_original: bool  # inpainting: paste the input back over the kept pixels
    loras: tuple[AppLora, ...]
    unsupported: tuple[str, ...]  # what it asks for that dts-util cannot do, by name
    seed_mode: str = "torch_cpu"
    mask_outset: int = 0  # pixels
    zero_negative_prompt: bool = False
    # SDXL conditioning in pixels, 0 = the image's size: original and target (height, width), crop (top, left)
    original_size: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (0, 0)
    crop: tuple[int, int] = (0, 0)
    negative_original_size: tuple[int, int] = (0, 0)
    ignored: tuple[str, ...] = ()  # what it asks for that needs a model this server does not have: skipped
    # FLUX.1 [dev]: the distilled guidance, and whether CFG is skipped for it ("speed up with guidance embed")
    guidance_embed: float = 3.5
    speed_up_with_guidance_embed: bool = True
    shift: float = 1.0  # flow-matching models' sigma shift, used when resolution_dependent_shift is off
    resolution_dependent_shift: bool = True


class _Table:
    """One flatbuffers table: scalar, string and table-vector fields by slot, with the schema's defaults."""

    def __init__(self, table) -> None:
        self.table = table

    @classmethod
    def root(cls, data: bytes) -> "_Table":
        from flatbuffers import encode
        from flatbuffers import number_types as types
        from flatbuffers.table import Table

        buffer = bytearray(data)
        return cls(Table(buffer, encode.Get(types.UOffsetTFlags.packer_type, buffer, 0)))

    def _offset(self, slot: int) -> int:
        return self.table.Offset(4 + 2 * slot)

    def scalar(self, slot: int, kind: str, default: float | int | bool = 0):
        from flatbuffers import number_types as types

        offset = self._offset(slot)
        if not offset:
            return default
        flags = {"bool": types.BoolFlags, "i8": types.Int8Flags, "u8": types.Uint8Flags, "u16": types.Uint16Flags,
                 "u32": types.Uint32Flags, "i32": types.Int32Flags, "f32": types.Float32Flags}[kind]
        return self.table.Get(flags, self.table.Pos + offset)

    def string(self, slot: int) -> str:
        offset = self._offset(slot)
        if not offset:
            return ""
        return self.table.String(self.table.Pos + offset).decode("utf-8", "replace")

    def tables(self, slot: int, limit: int) -> list["_Table"]:
        offset = self._offset(slot)
        if not offset:
            return []
        count = self.table.VectorLen(offset)
        if count > limit:
            raise InvalidRequest(f"the configuration lists {count} entries in field {slot}; at most {limit}")
        start = self.table.Vector(offset)
        kind = type(self.table)
        return [_Table(kind(self.table.Bytes, self.table.Indirect(start + 4 * index))) for index in range(count)]


def parse(data: bytes) -> AppConfiguration:
    """Read the app's configuration; a buffer that is no GenerationConfiguration is InvalidRequest."""
    if not data:
        raise InvalidRequest("configuration is empty; send a GenerationConfiguration flatbuffer")
    if len(data) > MAX_CONFIGURATION_BYTES:
        raise InvalidRequest(f"configuration has {len(data)} bytes; send at most {MAX_CONFIGURATION_BYTES}")
    try:
        return _read(data)
    except (InvalidRequest, FeatureUnavailable):
        raise
    except Exception:  # noqa: BLE001 - offsets out of range, bad UTF-8 lengths: a malformed buffer
        raise InvalidRequest("configuration is not a readable GenerationConfiguration flatbuffer") from None


def _read(data: bytes) -> AppConfiguration:
    root = _Table.root(data)
    sampler_value = root.scalar(8, "i8", 0)
    sampler = app_sampler(sampler_value)
    if sampler is None:
        raise InvalidRequest(f"the configuration's sampler is {sampler_value}, which is not one of the app's "
                             f"samplers (0..{len(APP_SAMPLERS) - 1}); pick a sampler in the app")
    unsupported = _unsupported(root)
    loras = tuple(AppLora(t.string(0), float(t.scalar(1, "f32", 0.6)))
                  for t in root.tables(20, MAX_CONFIGURATION_LORAS))
    return AppConfiguration(
        width=root.scalar(1, "u16") * SIZE_UNIT, height=root.scalar(2, "u16") * SIZE_UNIT,
        seed=root.scalar(3, "u32"), steps=root.scalar(4, "u32"), guidance_scale=_finite(root.scalar(5, "f32")),
        strength=_finite(root.scalar(6, "f32")), model=root.string(7), sampler=sampler.name,
        batch_count=root.scalar(9, "u32", 1), batch_size=root.scalar(10, "u32", 1),
        hires_fix=bool(root.scalar(11, "bool", False)), hires_fix_width=root.scalar(12, "u16") * SIZE_UNIT,
        hires_fix_height=root.scalar(13, "u16") * SIZE_UNIT,
        hires_fix_strength=_finite(root.scalar(14, "f32", 0.7)), clip_skip=root.scalar(18, "u32", 1),
        mask_blur=_finite(root.scalar(21, "f32", 0.0)), preserve_original=bool(root.scalar(58, "bool", True)),
        loras=loras, unsupported=tuple(unsupported), seed_mode=_seed_mode(root.scalar(17, "i8", 0)),
        zero_negative_prompt=bool(root.scalar(37, "bool", False)), mask_outset=root.scalar(47, "i32", 0),
        original_size=(root.scalar(29, "u32"), root.scalar(30, "u32")),
        target_size=(root.scalar(33, "u32"), root.scalar(34, "u32")),
        crop=(root.scalar(31, "i32"), root.scalar(32, "i32")),
        negative_original_size=(root.scalar(39, "u32"), root.scalar(40, "u32")), ignored=tuple(_ignored(root)),
        guidance_embed=_finite(root.scalar(70, "f32", 3.5)),
        speed_up_with_guidance_embed=bool(root.scalar(69, "bool", True)),
        shift=_finite(root.scalar(49, "f32", 1.0)), resolution_dependent_shift=bool(root.scalar(71, "bool", True)),
    )


def _seed_mode(value: int) -> str:
    """The app's SeedMode value as dts-util's seed mode; a value from a newer app is generated as ScaleAlike, the
    app's own fallback for a mode it does not know (never refused)."""
    from dts_util.pipeline.noise import SEED_MODES

    return SEED_MODES[value] if 0 <= value < len(SEED_MODES) else "scale_alike"


def _ignored(root: _Table) -> list[str]:
    """Post-processing that needs a model this server does not have; gRPCServerCLI skips these too when the model
    is missing, and so does dts-util (the request log names them)."""
    return [f"{feature} ({root.string(slot)[:80]})" for slot, feature in ((15, "an upscaler"), (22, "face restoration"))
            if root.string(slot)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"the configuration holds {value}; send finite numbers")
    return float(value)


def _unsupported(root: _Table) -> list[str]:
    """What the configuration asks for that dts-util cannot do yet, by the name the app shows."""
    found = [f"a refiner model ({root.string(28)[:80]})"] if root.string(28) else []
    if root.tables(19, 64):
        found.append("ControlNet / control inputs")
    flags = ((59, "tiled diffusion"), (75, "TeaCache"), (65, "a separate CLIP-L prompt"),
             (67, "a separate OpenCLIP-G prompt"), (76, "a separate T5 prompt"), (79, "causal inference"),
             (82, "CFG-Zero*"))
    found += [feature for slot, feature in flags if root.scalar(slot, "bool", False)]
    if root.scalar(48, "f32", 0.0):
        found.append("sharpness")
    if root.scalar(84, "i8", 0):
        found.append("compression artifacts")
    if root.scalar(86, "i8", 0):
        found.append("color calibration")
    return found
