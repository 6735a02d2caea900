"""The Draw Things protocol: ``drawthings.ImageGenerationService`` (the seed's contract, plus additive
fields and the GenerateImageStream RPC)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dts_util.grpc.protocol import ProtocolService
from dts_util.grpc.proto import image_generation_pb2 as pb

if TYPE_CHECKING:
    import grpc

    from dts_util.boundary import ImageGenerator
    from dts_util.config import ServerConfig

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name


def _register(server: "grpc.aio.Server", generator: "ImageGenerator", config: "ServerConfig") -> None:
    from dts_util.grpc.drawthings.servicer import ImageGenerationServicer
    from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc

    pb_grpc.add_ImageGenerationServiceServicer_to_server(
        ImageGenerationServicer(generator, config.upload_idle_timeout), server)


SERVICE = ProtocolService(SERVICE_NAME, _register)
