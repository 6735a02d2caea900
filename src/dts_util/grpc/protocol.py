"""What a protocol package hands the bootstrap: its service name and how to register it.

Each protocol lives in its own package under ``grpc/`` (``drawthings/`` is the
first) and exposes one ``ProtocolService``. ``bootstrap.start_server`` registers
a list of them on one server, with the same interceptor, health and reflection;
adding a protocol means adding a package and a list entry, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

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
        checks_own_secret: the protocol carries its credential in its messages (the Draw Things app's shared
            secret), so the interceptor leaves the bearer-token check to its servicer.
        request_limits: bytes per request message, by full method path, where they differ from the
            defaults by method name (``limits.py``).
    """

    name: str
    register: Callable[["grpc.aio.Server", "ImageGenerator", "ServerConfig"], None]
    checks_own_secret: bool = False
    request_limits: Mapping[str, int] = field(default_factory=dict)

    @property
    def method_prefix(self) -> str:
        return f"/{self.name}/"
