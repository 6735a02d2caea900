"""Small helpers for the HTTP tests: images to and from base64, pixels, raw HTTP exchanges."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
from PIL import Image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def sample_image(size: int = 64, alpha: bool = False) -> Image.Image:
    """A deterministic picture: a gradient with a square, optionally with a transparent hole in the middle."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 90, np.uint8)],
                   axis=-1)
    rgb[size // 4: size // 2, size // 4: size // 2] = (200, 30, 30)
    if not alpha:
        return Image.fromarray(rgb)
    a = np.full((size, size), 255, np.uint8)
    a[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 0
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes or answers a whole response head and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
