"""Initial latent noise per seed mode, as the Draw Things app defines its ``SeedMode``.

- ``torch_cpu`` (the app's TorchCpuCompatible, and this server's behaviour before seed
  modes existed): ``torch.randn`` on a CPU generator seeded with the image's seed, NCHW.
- ``nvidia_gpu`` (NvidiaGpuCompatible): the Philox4x32-10 counter-based generator with a
  Box-Muller transform that CUDA's ``torch.randn`` uses for its first draw after seeding
  (the app's and A1111's "NV" source), NCHW.
- ``scale_alike`` (ScaleAlike, the app's default): the same CPU normal stream, read as
  NHWC, cut into 8x8 latent blocks laid out in rings spiralling out from the centre, so
  the centre of a picture keeps its noise when only the size changes.
- ``legacy``: the app draws it from its GPU framework's closed random source, which no
  public definition reproduces; it is generated as ``torch_cpu`` and the info says so.

Each image of a request keeps its own seed (seed + i); only how its noise is drawn changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dts_util.client_text import quote
from dts_util.errors import InvalidRequest

if TYPE_CHECKING:  # numpy and torch load with the model; request checks (find_seed_mode) run without them
    import numpy as np
    import torch

# The app's SeedMode values, in its order.
SEED_MODES = ("legacy", "torch_cpu", "scale_alike", "nvidia_gpu")
APP_SEED_MODE_NAMES = ("Legacy", "TorchCpuCompatible", "ScaleAlike", "NvidiaGpuCompatible")
DEFAULT_SEED_MODE = "torch_cpu"
# What a mode with no public definition is generated as.
NEAREST_MODE = {"legacy": "torch_cpu"}
_BY_KEY = {key.casefold().replace(" ", "").replace("_", ""): mode
           for mode, app in zip(SEED_MODES, APP_SEED_MODE_NAMES) for key in (mode, app)}
BLOCK = 8  # latent cells per ScaleAlike block side


def find_seed_mode(name: str) -> str:
    """The canonical seed mode for a client's spelling ("" = torch_cpu), or InvalidRequest."""
    if len(name) > 40:
        raise InvalidRequest(f"seed_mode has {len(name)} characters; send one of {', '.join(SEED_MODES)}")
    key = (name or DEFAULT_SEED_MODE).casefold().replace(" ", "").replace("_", "")
    if key not in _BY_KEY:
        raise InvalidRequest(f"unknown seed_mode {quote(name, 40)}; send one of {', '.join(SEED_MODES)} "
                             f"(or the app's {', '.join(APP_SEED_MODE_NAMES)})")
    return _BY_KEY[key]


def effective_seed_mode(mode: str) -> str:
    """The mode the noise is actually drawn with."""
    return NEAREST_MODE.get(mode, mode)


def initial_noise(mode: str, seed: int, shape: tuple[int, int, int],
                  generator: "torch.Generator") -> "torch.Tensor":
    """One image's starting noise of ``shape`` (C, h, w) as (1, C, h, w) float32.

    ``generator`` is the image's seeded CPU generator: the torch_cpu modes draw from it (so the draws that follow,
    for ancestral samplers, continue diffusers' sequence); the others leave it untouched.
    """
    import numpy as np
    import torch

    mode = effective_seed_mode(mode)
    if mode == "torch_cpu":
        return torch.randn((1, *shape), generator=generator)
    channels, height, width = shape
    if mode == "nvidia_gpu":
        return torch.from_numpy(philox_normal(seed, channels * height * width).reshape(1, *shape))
    stream = torch.randn(height * width * channels, generator=torch.Generator("cpu").manual_seed(seed))
    nested = nest_blocks(stream.numpy().reshape(height, width, channels))
    return torch.from_numpy(np.ascontiguousarray(nested.transpose(2, 0, 1)))[None]


# -- NvidiaGpuCompatible -----------------------------------------------------------------------

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def philox_normal(seed: int, count: int, offset: int = 0) -> "np.ndarray":
    """``count`` standard normals from Philox4x32-10 keyed by ``seed``: counter (offset, 0, i, 0) for value i, the
    first two output words through Box-Muller (the sine branch), as CUDA's generator fills a fresh tensor."""
    import numpy as np

    mask = np.uint64(_U32)
    counter = [np.full(count, offset, np.uint64), np.zeros(count, np.uint64), np.arange(count, dtype=np.uint64),
               np.zeros(count, np.uint64)]
    key = [np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)]
    for round_ in range(10):
        high0 = counter[0] * np.uint64(_PHILOX_M[0])
        high2 = counter[2] * np.uint64(_PHILOX_M[1])
        counter = [((high2 >> np.uint64(32)) ^ counter[1] ^ key[0]) & mask, high2 & mask,
                   ((high0 >> np.uint64(32)) ^ counter[3] ^ key[1]) & mask, high0 & mask]
        if round_ < 9:
            key = [(key[0] + np.uint64(_PHILOX_W[0])) & mask, (key[1] + np.uint64(_PHILOX_W[1])) & mask]
    uniform = counter[0].astype(np.float64) / 2**32 + 2.0**-33  # never 0: log stays finite
    angle = counter[1].astype(np.float64) * (math.pi / 2**31) + math.pi / 2**32
    return (np.sqrt(-2.0 * np.log(uniform)) * np.sin(angle)).astype(np.float32)


# -- ScaleAlike ----------------------------------------------------------------------------------

def block_spiral(rows: int, columns: int) -> list[tuple[int, int]]:
    """(row, column) of every 8x8 block in the order ScaleAlike fills them: ring k around the centre, each ring's top
    row left to right, right column downwards, bottom row right to left, left column upwards."""
    order: list[tuple[int, int]] = []
    for ring in range((max(rows, columns) + 1) // 2):
        side = 2 * (ring + 1)
        top, left = (rows + 1) // 2 - ring - 1, (columns + 1) // 2 - ring - 1
        edges = ([(top, left + i) for i in range(side - 1)] + [(top + i, left + side - 1) for i in range(side - 1)]
                 + [(top + side - 1, left + side - 1 - i) for i in range(side - 1)]
                 + [(top + side - 1 - i, left) for i in range(side - 1)])
        order += [(r, c) for r, c in edges if 0 <= r < rows and 0 <= c < columns]
    return order


def nest_blocks(noise: "np.ndarray") -> "np.ndarray":
    """(h, w, C) noise, read as consecutive 8x8xC blocks, placed along ``block_spiral``; sizes that are no multiple
    of 8, or under two blocks a side, keep the stream's own layout (as the app does)."""
    import numpy as np

    height, width, channels = noise.shape
    if height % BLOCK or width % BLOCK or min(height, width) < 2 * BLOCK:
        return noise
    blocks = noise.reshape(-1, BLOCK, BLOCK, channels)
    out = np.empty_like(noise)
    for index, (row, column) in enumerate(block_spiral(height // BLOCK, width // BLOCK)):
        out[row * BLOCK:(row + 1) * BLOCK, column * BLOCK:(column + 1) * BLOCK] = blocks[index]
    return out
