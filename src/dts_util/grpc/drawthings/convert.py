"""Protocol messages <-> domain objects. With the servicer, the only importer of generated code."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Iterator

from dts_util.boundary import GenerationOutput, GenerationRequest, ModelDescription
from dts_util.grpc.proto import image_generation_pb2 as pb


def generation_request(message: pb.ImageGenerationRequest) -> GenerationRequest:
    """Field for field: the domain request keeps the protocol's names and its 0-means-default rule."""
    sent = message.DESCRIPTOR.fields_by_name  # the model layer's own settings (latent_previews) are not the wire's
    values = {f.name: getattr(message, f.name) for f in fields(GenerationRequest)
              if f.name in sent and f.name != "loras"}
    return GenerationRequest(**values, loras=tuple((lora.file, lora.weight) for lora in message.loras))


def generation_response(output: GenerationOutput) -> pb.ImageGenerationResponse:
    return pb.ImageGenerationResponse(images=output.images, info=output.info, events=output.events)


# Each streamed message stays under the 4 MiB every gRPC client accepts by default.
IMAGE_PIECE_BYTES = 4 * 1024 * 1024 - 1024


def progress_update(event: dict, preview: bytes | None) -> pb.GenerationUpdate:
    return pb.GenerationUpdate(event=json.dumps(event), preview=preview or b"")


def image_pieces(images: list[bytes]) -> Iterator[pb.GenerationUpdate]:
    for index, png in enumerate(images):
        starts = range(0, max(len(png), 1), IMAGE_PIECE_BYTES)
        for start in starts:
            yield pb.GenerationUpdate(image_index=index, image_data=png[start:start + IMAGE_PIECE_BYTES],
                                      image_done=start == starts[-1])


def echo_response(version: str, models: list[str], default_model: str,
                  described: list[ModelDescription] = ()) -> pb.EchoResponse:
    summaries = [pb.ModelSummary(name=m.name, family=m.family, native_size=m.native_size, inpainting=m.inpainting,
                                 default_steps=m.default_steps, default_cfg_scale=m.default_cfg_scale,
                                 default_sampler=m.default_sampler, size_multiple=m.size_multiple)
                 for m in described]
    return pb.EchoResponse(message="HELLO", server_version=version, models=models, default_model=default_model,
                           model_summaries=summaries)


def files_exist_response(results: list[tuple[str, bool, str]]) -> pb.FilesExistResponse:
    """``results`` holds (file, exists, error) per requested entry, in request order."""
    return pb.FilesExistResponse(files=[r[0] for r in results], exists=[r[1] for r in results],
                                 errors=[r[2] for r in results])


def upload_response(quoted_name: str, size: int, sha256: str, unchanged: bool) -> pb.UploadFileResponse:
    verb = "already stored, identical:" if unchanged else "uploaded"
    return pb.UploadFileResponse(message=f"{verb} {quoted_name} ({size} bytes, sha256 {sha256})",
                                 size=size, sha256=sha256)
