"""The protocol is a contract: generated code matches proto/, and seed field numbers never move."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dts_util.grpc.proto import image_generation_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
SEED_FIELDS = {
    "EchoResponse": {"message": 1},
    "FilesExistRequest": {"files": 1},
    "FilesExistResponse": {"files": 1, "exists": 2, "errors": 3},
    "ImageGenerationRequest": {
        "prompt": 1, "negative_prompt": 2, "width": 3, "height": 4, "steps": 5, "cfg_scale": 6, "seed": 7,
        "sampler": 8, "restore_faces": 9, "enable_hr": 10, "denoising_strength": 11, "batch_size": 12,
        "batch_count": 13},
    "ImageGenerationResponse": {"images": 1, "info": 2, "events": 3},
    "UploadFileRequest": {"filename": 1, "data": 2},
    "UploadFileResponse": {"message": 1},
}
SEED_TYPES = {("ImageGenerationRequest", "seed"): "TYPE_INT64", ("ImageGenerationRequest", "cfg_scale"): "TYPE_FLOAT",
              ("ImageGenerationResponse", "images"): "TYPE_BYTES", ("FilesExistResponse", "exists"): "TYPE_BOOL"}


def test_generated_modules_match_proto_source() -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_seed_field_numbers_and_types_are_frozen() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    type_names = {v: k for k, v in FieldDescriptor.__dict__.items() if k.startswith("TYPE_")}
    for message, expected in SEED_FIELDS.items():
        by_name = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert {name: by_name[name].number for name in expected} == expected
    for (message, field), type_name in SEED_TYPES.items():
        assert type_names[pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field].type] == type_name


def test_service_has_the_seed_rpcs() -> None:
    methods = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].methods_by_name
    assert {"Echo", "FilesExist", "GenerateImage", "UploadFile"} <= set(methods)
    assert methods["UploadFile"].client_streaming and not methods["GenerateImage"].client_streaming
