"""A client of the Draw Things app's protocol, written from its public definition for these tests.

It builds what the app sends (a GenerationConfiguration flatbuffer slot by slot, image and mask tensors
raw, fpzip or DEFLATE, referenced by SHA-256 in ``contents``) and reads what the app reads (signposts,
chunked fp16 images), with the stubs generated from ``proto/draw_things_app.proto``.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import grpc
import numpy as np
from PIL import Image

from dts_util.grpc.proto import draw_things_app_pb2 as pb
from dts_util.grpc.proto import draw_things_app_pb2_grpc as pb_grpc

HEADER = struct.Struct("<5I12i")
RAW, FPZIP, DEFLATE = 0, 0xF7217, 0x217
# (slot, kind, schema default) of the GenerationConfiguration fields these tests set.
SLOTS = {"start_width": (1, "Uint16", 0), "start_height": (2, "Uint16", 0), "seed": (3, "Uint32", 0),
         "steps": (4, "Uint32", 0), "guidance_scale": (5, "Float32", 0.0), "strength": (6, "Float32", 0.0),
         "sampler": (8, "Int8", 0), "batch_count": (9, "Uint32", 1), "batch_size": (10, "Uint32", 1),
         "hires_fix": (11, "Bool", False), "hires_fix_start_width": (12, "Uint16", 0),
         "hires_fix_start_height": (13, "Uint16", 0), "hires_fix_strength": (14, "Float32", 0.7),
         "clip_skip": (18, "Uint32", 1), "mask_blur": (21, "Float32", 0.0), "sharpness": (48, "Float32", 0.0),
         "tea_cache": (75, "Bool", False), "shift": (49, "Float32", 1.0), "original_image_height": (29, "Uint32", 0),
         "preserve_original_after_inpaint": (58, "Bool", True),
         "speed_up_with_guidance_embed": (69, "Bool", True), "guidance_embed": (70, "Float32", 3.5),
         "resolution_dependent_shift": (71, "Bool", True), "seed_mode": (17, "Int8", 0)}
STRINGS = {"model": 7, "upscaler": 15, "face_restoration": 22, "refiner_model": 28}


def configuration(loras: tuple[tuple[str, float], ...] = (), controls: int = 0, **fields) -> bytes:
    """A GenerationConfiguration as the app serializes it: no identifier, defaults left out."""
    import flatbuffers

    builder = flatbuffers.Builder(256)
    strings = {name: builder.CreateString(fields.pop(name)) for name in list(fields) if name in STRINGS}
    lora_vector = _table_vector(builder, [_lora(builder, file, weight) for file, weight in loras]) if loras else None
    control_vector = _table_vector(builder, [_control(builder) for _ in range(controls)]) if controls else None
    builder.StartObject(88)
    for name, value in fields.items():
        slot, kind, default = SLOTS[name]
        getattr(builder, f"Prepend{kind}Slot")(slot, value, default)
    for name, offset in strings.items():
        builder.PrependUOffsetTRelativeSlot(STRINGS[name], offset, 0)
    if lora_vector is not None:
        builder.PrependUOffsetTRelativeSlot(20, lora_vector, 0)
    if control_vector is not None:
        builder.PrependUOffsetTRelativeSlot(19, control_vector, 0)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def _lora(builder, file: str, weight: float) -> int:
    name = builder.CreateString(file)
    builder.StartObject(3)
    builder.PrependUOffsetTRelativeSlot(0, name, 0)
    builder.PrependFloat32Slot(1, weight, 0.6)
    return builder.EndObject()


def _control(builder) -> int:
    name = builder.CreateString("controlnet_canny_1.x_f16.ckpt")
    builder.StartObject(10)
    builder.PrependUOffsetTRelativeSlot(0, name, 0)
    return builder.EndObject()


def _table_vector(builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def image_tensor(image: Image.Image, codec: int = RAW) -> bytes:
    """An RGB image as the app sends it: fp16 NHWC [1, H, W, 3] in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * 2 / 255 - 1
    height, width = pixels.shape[:2]
    header = HEADER.pack(codec, 1, 2, 0x20000, 0, 1, height, width, 3, *([0] * 8))
    half = pixels.astype("<f2")
    if codec == FPZIP:
        import fpzip

        return header + fpzip.compress(half.astype(np.float32)[None], precision=19, order="C")
    raw = half.tobytes()
    return header + (_deflate(raw) if codec == DEFLATE else raw)


def mask_tensor(mask: Image.Image, codec: int = RAW) -> bytes:
    """A mask as the app sends it: u8 [H, W], 2 where the image is repainted, 0 where it is kept."""
    values = (np.asarray(mask.convert("L")) >= 128).astype(np.uint8) * 2
    header = HEADER.pack(codec, 1, 1, 0x1000, 0, values.shape[0], values.shape[1], *([0] * 10))
    return header + (_deflate(values.tobytes()) if codec == DEFLATE else values.tobytes())


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def result_pixels(blob: bytes) -> np.ndarray:
    """A result tensor as 8-bit RGB, decoded as the app decodes it."""
    identifier, _, _, datatype, _, batch, height, width, channels, *_ = HEADER.unpack_from(blob)
    assert (identifier, datatype, batch, channels) == (RAW, 0x20000, 1, 3)
    values = np.frombuffer(blob, dtype="<f2", offset=HEADER.size).astype(np.float32).reshape(height, width, 3)
    return np.clip(np.round((values + 1) * 127.5), 0, 255).astype(np.int16)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def stub(target: str, credentials: grpc.ChannelCredentials | None = None) -> tuple[grpc.Channel, pb_grpc.ImageGenerationServiceStub]:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    channel = grpc.secure_channel(target, credentials, options=options) if credentials else \
        grpc.insecure_channel(target, options=options)
    return channel, pb_grpc.ImageGenerationServiceStub(channel)


def generate(app_stub, timeout: float = 300, **fields) -> tuple[list[pb.ImageGenerationResponse], list[bytes]]:
    """Every response message, and the images reassembled from their chunks as the app does."""
    responses = list(app_stub.GenerateImage(pb.ImageGenerationRequest(**fields), timeout=timeout))
    images, pending = [], b""
    for response in responses:
        if response.generatedImages:
            if response.chunkState == pb.MORE_CHUNKS:
                pending += response.generatedImages[0]
            else:
                images.append(pending + response.generatedImages[0])
                pending = b""
    return responses, images
