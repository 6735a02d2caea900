"""What a protocol package hands the bootstrap: its service name and how to register it.

Each protocol lives in its own package under ``grpc/`` (``drawthings/`` is the
first) and exposes one ``ProtocolService``. ``bootstrap.start_server`` registers
a list of them on one server, with the same interceptor, health and reflection;
adding a protocol means adding a package and a list entry, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import grpc

    from dts_util.boundary import ImageGenerator
    from dts_util.config import ServerConfig


@dataclass(frozen=True)
class ProtocolService:
    """One gRPC service of a protocol.

    Attributes:
        name: the fully qualified service name (health and reflection report it).
        register: adds the service's servicer over ``generator`` to ``server``.
    """

    name: str
    register: Callable[["grpc.aio.Server", "ImageGenerator", "ServerConfig"], None]
