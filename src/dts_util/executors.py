"""The server's thread pools for blocking work, each bounded and each for one kind of work.

asyncio's default executor is shared by everything that calls ``to_thread``; a burst of one kind (forty
uploads syncing, a flood of FilesExist hashing) would then hold every thread and stall the others, and the
device would wait for a request's images to decode. Here file work and image work have pools of their own,
sized for what they hold: image jobs keep a request's decoded pixels in memory, so only a few run at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Uploads' writes, fsyncs and publishing, FilesExist's hashing, model listings.
FILES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dts-files")
# Decoding a request's images (and the app's tensors), encoding results to PNG or the app's tensors.
IMAGES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dts-images")


async def run_in(pool: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``pool``, awaited."""
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
