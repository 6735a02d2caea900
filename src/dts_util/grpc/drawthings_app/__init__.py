"""The Draw Things app's own protocol: ``ImageGenerationService`` with no package, as the app's "server
offload" calls it (``/ImageGenerationService/<Rpc>``), beside ``drawthings.ImageGenerationService`` on the
same port.

Its messages carry the app's shared secret, so the servicer checks it against the server's token itself;
its images are tensors (``tensors.py``) and its parameters a flatbuffer (``configuration.py``); model and
LoRA file names map onto the store (``names.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dts_util.grpc.protocol import ProtocolService
from dts_util.grpc.proto import draw_things_app_pb2 as pb
from dts_util.limits import MAX_APP_GENERATE_REQUEST_BYTES, MAX_UPLOAD_MESSAGE_BYTES

if TYPE_CHECKING:
    import grpc

    from dts_util.boundary import ImageGenerator
    from dts_util.config import ServerConfig

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name


def _register(server: "grpc.aio.Server", generator: "ImageGenerator", config: "ServerConfig") -> None:
    from dts_util.grpc.drawthings_app.servicer import AppServicer
    from dts_util.grpc.proto import draw_things_app_pb2_grpc as pb_grpc

    pb_grpc.add_ImageGenerationServiceServicer_to_server(AppServicer(generator, config), server)


SERVICE = ProtocolService(SERVICE_NAME, _register, checks_own_secret=True, request_limits={
    f"/{SERVICE_NAME}/GenerateImage": MAX_APP_GENERATE_REQUEST_BYTES,
    f"/{SERVICE_NAME}/UploadFile": MAX_UPLOAD_MESSAGE_BYTES,
})
