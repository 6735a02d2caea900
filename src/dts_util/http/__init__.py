"""The HTTP APIs, served beside gRPC (``serve --http-port``) over the same model layer, queue, token and TLS.

Each API is one module exposing an ``HttpApi`` and one row in ``APIS``; ``app.py`` builds the FastAPI
application with what every request goes through first (token, body limits, timeouts, errors, the log
line), and ``server.py`` runs it with uvicorn on the gRPC server's event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dts_util.boundary import ImageGenerator
    from dts_util.config import ServerConfig
    from dts_util.http.server import HttpServer


def apis() -> tuple:
    """The APIs a server speaks over HTTP; a new one is a module and a row here. The first one's error shape is
    the default (for paths under no API)."""
    from dts_util.http import a1111, openai_images

    return (a1111.API, openai_images.API)


async def start(config: "ServerConfig", generator: "ImageGenerator") -> "HttpServer":
    """Build the application over ``generator`` and serve it on ``config.http_port``."""
    from dts_util.http.app import build_app
    from dts_util.http.common import ApiContext
    from dts_util.http.server import start_http

    return await start_http(config, build_app(ApiContext(generator, config), apis()))
