"""Input images of img2img and inpainting: decoded with Pillow, bounded, and brought to the generation size.

Everything a client sends is checked here, before it is queued and long before a
model sees it: the encoded size, the format (PNG, JPEG or WebP), the pixel count
(read from the header, before any pixel is decoded), a complete decode, and the
mask's size against the image's. A failure is ``InvalidRequest`` saying what to fix.

The sizing rules are those of diffusers' img2img pipeline and ``VaeImageProcessor``
(and A1111's): without a width and height the output takes the image's size rounded
down to multiples of 8, and the image is stretched to the output size with Lanczos. The mask is read as greyscale at the
image's size and stretched the same way; then ``mask_blur`` softens it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from dts_util.errors import InvalidRequest
from dts_util.limits import (MAX_INIT_IMAGE_BYTES, MAX_INPUT_IMAGE_PIXELS, MAX_INPUT_IMAGE_SIDE, MAX_MASK_BLUR,
                             MAX_MASK_BYTES)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# The latent grid: sizes derived from an image are rounded down to it, as diffusers does.
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class InputImages:
    """A request's input image (and mask) at the generation size, plus what info reports about them."""

    image: Image.Image  # RGB, width x height of the generation
    mask: Image.Image | None  # L (white = repaint), same size, blurred by mask_blur; None for img2img
    source_size: tuple[int, int]  # (width, height) as sent, after EXIF orientation
    sha256: str  # of the encoded image as sent
    mask_blur: float = 0
    mask_outset: int = 0

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"


def decode_image(data: bytes, field: str, max_bytes: int) -> Image.Image:
    """``data`` as a fully decoded Pillow image, upright (EXIF orientation applied)."""
    if len(data) > max_bytes:
        raise InvalidRequest(f"{field} has {len(data)} bytes; send at most {max_bytes} (a smaller image, or "
                             "JPEG/WebP instead of PNG)")
    header_size = _header_size(data)
    if header_size is not None:
        _check_pixels(field, header_size)  # before Pillow's own (looser) bomb check can fire with its message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            _check_pixels(field, image.size)  # from the header: nothing is decoded yet
            image.load()
            return ImageOps.exif_transpose(image)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to decode client bytes is the client's bad image
        raise InvalidRequest(f"{field} could not be decoded as {', '.join(ACCEPTED_FORMATS)} "
                             f"({type(exc).__name__}); send a complete image file in one of those formats") from None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) an accepted format's header declares, read without decoding a pixel and without
    Pillow's decompression-bomb check (``Image.open`` runs it, and its message names neither our limit nor the
    size); None when no accepted format reads the header."""
    Image.init()
    prefix = data[:16]
    for name in ACCEPTED_FORMATS:
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(prefix):
            continue
        try:
            with factory(io.BytesIO(data)) as header:
                return header.size
        except Exception:  # noqa: BLE001 - not this format, or a broken header: Image.open reports it
            continue
    return None


def _check_pixels(field: str, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1 or max(width, height) > MAX_INPUT_IMAGE_SIDE or width * height > MAX_INPUT_IMAGE_PIXELS:
        raise InvalidRequest(f"{field} is {width}x{height}; send at most {MAX_INPUT_IMAGE_PIXELS // 10**6} megapixels "
                             f"and {MAX_INPUT_IMAGE_SIDE} pixels a side")


def default_size(image_size: tuple[int, int], multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The generation size an image implies: its own, rounded down to the model's size grid."""
    return tuple(side - side % multiple for side in image_size)  # type: ignore[return-value]


def read_input_images(init_image: bytes, mask: bytes, mask_blur: float) -> tuple[Image.Image, Image.Image | None]:
    """Decode and cross-check the request's image and mask, at the sizes they were sent."""
    if mask and not init_image:
        raise InvalidRequest("mask was sent without init_image; inpainting needs the image to paint into")
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise InvalidRequest(f"mask_blur is {mask_blur}; it must be in 0..{MAX_MASK_BLUR} pixels (0 = no blur)")
    image = decode_image(init_image, "init_image", MAX_INIT_IMAGE_BYTES)
    if not mask:
        return image.convert("RGB"), None
    decoded_mask = decode_image(mask, "mask", MAX_MASK_BYTES)
    if decoded_mask.size != image.size:
        raise InvalidRequest(f"mask is {decoded_mask.size[0]}x{decoded_mask.size[1]} but init_image is "
                             f"{image.size[0]}x{image.size[1]}; send a mask of the image's size")
    return image.convert("RGB"), decoded_mask.convert("L")


def given_input_images(image: Image.Image, mask: Image.Image | None,
                       mask_blur: float) -> tuple[Image.Image, Image.Image | None]:
    """Already decoded input pixels (from a protocol that sends tensors), checked as ``read_input_images`` checks
    decoded files: the pixel limit, the mask's size, the blur."""
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise InvalidRequest(f"mask_blur is {mask_blur}; it must be in 0..{MAX_MASK_BLUR} pixels (0 = no blur)")
    for name, given in (("init_image", image), ("mask", mask)):
        if given is not None:
            _check_pixels(name, given.size)
    if mask is not None and mask.size != image.size:
        raise InvalidRequest(f"mask is {mask.size[0]}x{mask.size[1]} but init_image is {image.size[0]}x"
                             f"{image.size[1]}; send a mask of the image's size")
    return image.convert("RGB"), None if mask is None else mask.convert("L")


def fit_input_images(image: Image.Image, mask: Image.Image | None, width: int, height: int, mask_blur: float,
                     sha256: str, mask_outset: int = 0) -> InputImages:
    """Stretch image and mask to the generation size (Lanczos, as diffusers' image processor) and blur the mask."""
    source_size = image.size
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
        mask = outset_mask(mask, mask_outset)
        if mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
    return InputImages(image, mask, source_size, sha256, mask_blur, mask_outset if mask is not None else 0)


def outset_mask(mask: Image.Image, pixels: int) -> Image.Image:
    """The repainted (white) area grown by ``pixels`` (shrunk for a negative count), one 3x3 max (min) filter per
    pixel, as the app erodes its kept area for a positive mask blur outset."""
    grow = ImageFilter.MaxFilter(3) if pixels > 0 else ImageFilter.MinFilter(3)
    for _ in range(abs(pixels)):
        mask = mask.filter(grow)
    return mask


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
