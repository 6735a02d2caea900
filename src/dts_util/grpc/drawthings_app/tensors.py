"""The app's tensor blobs: images, masks and results as it sends and reads them.

A blob is a 68-byte header (a little-endian u32 codec identifier, then the tensor's
parameters: memory type, format, data type, a reserved word and 12 dimensions) and
the payload: raw little-endian values, an fpzip stream, or raw DEFLATE. Images are
fp16 NHWC ``[1, H, W, 3]`` in [-1, 1]; masks are u8 ``[H, W]`` whose low 3 bits say
what to do with each pixel. Everything here is bounded before it is allocated:
the header's dimensions are checked against the pixel limits, a payload must
decode to exactly the size its header declares, and fpzip streams (whose library
trusts its input) are decoded in a child process with a memory limit.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dts_util.errors import InvalidRequest
from dts_util.limits import MAX_INPUT_IMAGE_PIXELS, MAX_INPUT_IMAGE_SIDE

HEADER = struct.Struct("<5I12i")  # identifier, type, format, datatype, reserved, dims[12]
HEADER_BYTES = HEADER.size  # 68
RAW, FPZIP, DEFLATE = 0, 0xF7217, 0x217
CPU_MEMORY = 1
NCHW, NHWC = 1, 2
UINT8, FLOAT16, FLOAT32 = 0x1000, 0x20000, 0x4000
ELEMENT = {UINT8: np.dtype("u1"), FLOAT16: np.dtype("<f2"), FLOAT32: np.dtype("<f4")}
# A mask pixel's low 3 bits (the high 5 are an alpha level): 0 keep, 1 fill from noise, 2 repaint, 3 always keep,
# 4 "the same as 2" (the app's own words); 5..7 fall to the app's catch-all, which treats them as 0.
MASK_REPAINT = (1, 2, 4)


@dataclass(frozen=True)
class Tensor:
    """A decoded blob: its dimensions and values (float32 for float data, uint8 for masks)."""

    dims: tuple[int, ...]
    values: np.ndarray


def decode(blob: bytes, field: str) -> Tensor:
    """A blob as a tensor, or InvalidRequest saying what is wrong with it."""
    if len(blob) < HEADER_BYTES:
        raise InvalidRequest(f"{field} is {len(blob)} bytes, shorter than a tensor's {HEADER_BYTES}-byte header")
    identifier, memory, _, datatype, _, *raw_dims = HEADER.unpack_from(blob)
    dims = tuple(raw_dims[:raw_dims.index(0)] if 0 in raw_dims else raw_dims)
    if memory != CPU_MEMORY or datatype not in ELEMENT or not dims or min(dims) < 1:
        raise InvalidRequest(f"{field} is not a CPU tensor of fp16, fp32 or u8 values with positive dimensions")
    _check_image_dims(dims, field)
    count = math.prod(dims)  # Python integers: no wrap-around, whatever the header says
    payload = memoryview(blob)[HEADER_BYTES:]
    values = _payload(identifier, payload, ELEMENT[datatype], count, field)
    return Tensor(dims, values.reshape(dims))


def _check_image_dims(dims: tuple[int, ...], field: str) -> None:
    """An image ([1, H, W, C] or [H, W, C]) or a mask ([H, W], [1, H, W, 1]) within the pixel limits, checked
    before any payload is read."""
    shape = tuple(d for d in dims if d != 1) if len(dims) == 4 and dims[0] == 1 and dims[-1] == 1 else dims
    shape = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(shape) == 3 and shape[2] in (3, 4):
        height, width = shape[:2]
    elif len(shape) == 2:
        height, width = shape
    else:
        raise InvalidRequest(f"{field} has dimensions {list(dims)}; send an image of [1, H, W, 3] or a mask of [H, W]")
    if max(height, width) > MAX_INPUT_IMAGE_SIDE or height * width > MAX_INPUT_IMAGE_PIXELS:
        raise InvalidRequest(f"{field} is {width}x{height}; send at most {MAX_INPUT_IMAGE_PIXELS // 10**6} megapixels "
                             f"and {MAX_INPUT_IMAGE_SIDE} pixels a side")


def _payload(identifier: int, payload: memoryview, element: np.dtype, count: int, field: str) -> np.ndarray:
    expected = count * element.itemsize
    if identifier == RAW:
        if len(payload) < expected:
            raise InvalidRequest(f"{field} holds {len(payload)} bytes of data; its header says {expected}")
        return np.frombuffer(payload[:expected], dtype=element).astype(np.float32 if element.kind == "f" else np.uint8)
    if identifier == DEFLATE:
        if expected <= 0:
            raise InvalidRequest(f"{field} declares no data")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(payload, expected + 1)  # never more than the header promises
        except zlib.error:
            raise InvalidRequest(f"{field} is not valid DEFLATE data") from None
        if len(data) != expected:
            raise InvalidRequest(f"{field} inflates to {len(data)} bytes; its header says {expected}")
        return np.frombuffer(data, dtype=element).astype(np.float32 if element.kind == "f" else np.uint8)
    if identifier == FPZIP and element.kind == "f":
        return _fpzip(payload, count, field)
    raise InvalidRequest(f"{field} uses codec {identifier:#x}; send it raw (0), fpzip (0xf7217) or DEFLATE (0x217)")


def _fpzip(payload: memoryview, count: int, field: str) -> np.ndarray:
    """fpzip's stream, decoded in a child process once its own header was found to hold exactly ``count`` values.

    The fpzip library reads past a truncated or corrupt stream (it is given no length) and can crash
    the process reading it; a child process with a memory limit takes that crash instead of the server.
    """
    try:
        claimed = fpzip_header_values(bytes(payload[:64]))
    except ValueError:
        raise InvalidRequest(f"{field} is not an fpzip stream") from None
    if claimed != count:
        raise InvalidRequest(f"{field}: its fpzip stream holds {claimed} values; the header says {count}")
    try:
        result = subprocess.run([sys.executable, "-c", _FPZIP_CHILD, str(count), str(FPZIP_CHILD_MEMORY_BYTES)],
                                input=bytes(payload), capture_output=True, timeout=FPZIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InvalidRequest(f"{field}: its fpzip stream did not decode within {FPZIP_TIMEOUT_S} s") from None
    if result.returncode != 0 or len(result.stdout) != 4 * count:
        raise InvalidRequest(f"{field} is not a valid fpzip stream") from None
    return np.frombuffer(result.stdout, dtype="<f4").copy()


# The child: its own memory limit first (set there, not in a pre-exec hook, which is unsafe in a threaded
# server), then fpzip and numpy only, the stream on stdin, float32 values on stdout.
_FPZIP_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
import fpzip
import numpy
values = numpy.asarray(fpzip.decompress(sys.stdin.buffer.read(), order="C"), dtype="<f4").reshape(-1)
sys.exit(1) if values.size != int(sys.argv[1]) else sys.stdout.buffer.write(values.tobytes())
"""
FPZIP_TIMEOUT_S = 30
FPZIP_CHILD_MEMORY_BYTES = 2 * 1024**3


class _RangeDecoder:
    """The start of fpzip's range decoder (32-bit arithmetic): enough to read its header's plain bit fields."""

    MASK = 0xFFFFFFFF

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0
        self.low, self.range, self.code = 0, self.MASK, 0
        self._get(4)

    def _get(self, count: int) -> None:
        for _ in range(count):
            byte = self.data[self.position] if self.position < len(self.data) else 0
            self.position += 1
            self.code = ((self.code << 8) | byte) & self.MASK
            self.low = (self.low << 8) & self.MASK

    def _normalize(self) -> None:
        while not ((self.low ^ ((self.low + self.range) & self.MASK)) >> 24):
            self._get(1)
            self.range = (self.range << 8) & self.MASK
        if not self.range >> 16:
            self._get(2)
            self.range = -self.low & self.MASK

    def _shift(self, bits: int) -> int:
        self.range >>= bits
        value = ((self.code - self.low) & self.MASK) // self.range
        self.low = (self.low + self.range * value) & self.MASK
        self._normalize()
        return value

    def bits(self, count: int) -> int:
        if count > 16:
            low = self._shift(16)
            return (self._shift(count - 16) << 16) + low
        return self._shift(count)


def fpzip_header_values(stream: bytes) -> int:
    """How many values an fpzip stream says it holds (nx * ny * nz * nf), read from its range-coded header."""
    decoder = _RangeDecoder(stream)
    if bytes(decoder.bits(8) for _ in range(4)) != b"fpz\0":
        raise ValueError("not an fpzip stream")
    decoder.bits(16), decoder.bits(8), decoder.bits(1), decoder.bits(7)  # versions, type, precision
    return math.prod(decoder.bits(32) for _ in range(4))


def encode_image(image: Image.Image) -> bytes:
    """An RGB image as the app's result blob: raw (every client decodes it) fp16 NHWC in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    return encode_fp16(height, width, 3, (pixels * (2 / 255) - 1).astype("<f2").tobytes())


def encode_fp16(height: int, width: int, channels: int, values: bytes) -> bytes:
    """Little-endian fp16 values in NHWC order as the app's raw tensor blob [1, h, w, C] (results and previews)."""
    header = HEADER.pack(RAW, CPU_MEMORY, NHWC, FLOAT16, 0, 1, height, width, channels, *([0] * 8))
    return header + values


def tensor_image(tensor: Tensor, field: str) -> Image.Image:
    """An image tensor ([1, H, W, C] or [H, W, C], C = 3 or 4, values in [-1, 1]) as an RGB image."""
    dims = tensor.dims[1:] if len(tensor.dims) == 4 and tensor.dims[0] == 1 else tensor.dims
    if len(dims) != 3 or dims[2] not in (3, 4) or tensor.values.dtype != np.float32:
        raise InvalidRequest(f"{field} has dimensions {list(tensor.dims)}; send an fp16 image of [1, H, W, 3]")
    pixels = np.clip((tensor.values.reshape(dims)[..., :3] + 1) * 127.5, 0, 255)
    return Image.fromarray(np.round(np.nan_to_num(pixels)).astype(np.uint8), "RGB")


def mask_image(tensor: Tensor, size: tuple[int, int], field: str = "mask") -> Image.Image:
    """The app's mask ([H, W] u8, or [1, H, W, 1]) as our greyscale mask: white where it asks for repainting."""
    values = tensor.values.reshape(tuple(d for d in tensor.dims if d != 1) or (1,))
    if values.ndim != 2 or tuple(values.shape[::-1]) != size:
        raise InvalidRequest(f"{field} has dimensions {list(tensor.dims)}; send a u8 mask of the image's "
                             f"{size[1]}x{size[0]} pixels")
    repaint = np.isin(values.astype(np.uint8) & 7, MASK_REPAINT)
    return Image.fromarray((repaint * 255).astype(np.uint8), "L")
