"""mDNS announcement of the server to the Draw Things app (``serve --advertise``).

The app browses ``_dt-grpc._tcp.local.`` and reads whether to use TLS from the instance name's
suffix: ``<name>_tls`` or ``<name>_notls``. It ignores TXT records; ``txtvers=1`` is published as
gRPCServerCLI does. The announcement goes out on the machine's own interfaces through the
``zeroconf`` package, and is withdrawn when the server stops.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)
SERVICE_TYPE = "_dt-grpc._tcp.local."


def instance_name(name: str, tls: bool) -> str:
    """The instance the app lists: dots would split the name into labels, so they become dashes."""
    return f"{name.replace('.', '-')}_{'tls' if tls else 'notls'}"


def service_info(name: str, port: int, tls: bool, addresses: list[str], host: str | None = None):
    """The DNS-SD record set that announces this server."""
    from zeroconf import ServiceInfo

    host = host or socket.gethostname()
    return ServiceInfo(SERVICE_TYPE, f"{instance_name(name, tls)}.{SERVICE_TYPE}", port=port,
                       parsed_addresses=addresses, server=f"{host.split('.')[0]}.local.", properties={"txtvers": "1"})


class Advertiser:
    """Announces the server while it runs.

    Args:
        name: what the app shows (default: the host name).
        port: the gRPC port.
        tls: whether the server speaks TLS.
        address: the address the server listens on; 0.0.0.0 announces every address of the machine.
    """

    def __init__(self, name: str, port: int, tls: bool, address: str) -> None:
        self.name, self.port, self.tls, self.address = name or socket.gethostname(), port, tls, address
        self._zeroconf = None
        self._info = None

    def _addresses(self) -> list[str]:
        if self.address not in ("0.0.0.0", "::", ""):
            return [self.address]
        import ifaddr  # zeroconf's own dependency

        return [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                if ip.is_IPv4 and not ip.ip.startswith("127.")]

    async def start(self) -> None:
        from zeroconf.asyncio import AsyncZeroconf

        self._info = service_info(self.name, self.port, self.tls, self._addresses())
        self._zeroconf = AsyncZeroconf()
        await self._zeroconf.async_register_service(self._info)
        log.info("announced over mDNS as %r (%s)", instance_name(self.name, self.tls), SERVICE_TYPE)

    async def stop(self) -> None:
        """Withdraw the announcement (after a failed start too: then there is nothing to withdraw)."""
        if self._zeroconf is None:
            return
        try:
            await self._zeroconf.async_unregister_service(self._info)
        except Exception:  # noqa: BLE001 - never registered, or the network is gone: closing is what matters
            log.debug("the mDNS announcement could not be withdrawn", exc_info=True)
        await self._zeroconf.async_close()
        self._zeroconf = None
