"""The Draw Things app's protocol through a real server, with a client written from its public definition.

Every generation is compared with the same request over the seed protocol: the app's fp16 tensors decode to
the very pixels of the seed protocol's PNGs (fp16 holds every 8-bit level exactly).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace

import grpc
import numpy as np
import pytest
from PIL import Image

from dts_util.grpc.proto import draw_things_app_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2 as seed_pb
from tests.grpc.drawthings_app.app_client import (DEFLATE, FPZIP, RAW, configuration, generate, image_tensor,
                                                  mask_tensor, result_pixels, sha256, stub)
from tests.models.tiny_lora import write_kohya_lora

MODEL = "builtin-tiny-sd.ckpt"  # the name Echo lists for the built-in model
CONFIG = dict(start_width=2, start_height=2, seed=7, steps=4, guidance_scale=7.0, strength=1.0, sampler=1)
SEED_REQUEST = dict(width=128, height=128, seed=7, steps=4, cfg_scale=7.0, sampler="Euler a", prompt="a harbour",
                    negative_prompt="fog")
TOKEN = "app-shared-secret-0123456789"


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _noise(width: int = 128, height: int = 128) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _mask() -> Image.Image:
    mask = Image.new("L", (128, 128))
    mask.paste(255, (32, 32, 96, 96))
    return mask


@pytest.fixture(scope="module")
def app(server):
    channel, app_stub = stub(server.target)
    yield app_stub
    channel.close()


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        list(result) if not isinstance(result, (pb.EchoReply, pb.FileExistenceResponse)) else None
    return caught.value


def test_echo_lists_models_with_their_specifications(app) -> None:
    reply = app.Echo(pb.EchoRequest(name="iPad"), timeout=30)
    assert reply.message == "HELLO iPad" and not reply.sharedSecretMissing
    assert reply.serverIdentifier and app.Echo(pb.EchoRequest(), timeout=30).serverIdentifier == reply.serverIdentifier
    assert MODEL in reply.files
    spec = next(s for s in json.loads(reply.override.models) if s["file"] == MODEL)
    assert spec == {"name": "builtin-tiny-sd", "file": MODEL, "prefix": "", "version": "v1",
                    "upcast_attention": False, "default_scale": 4}
    assert json.loads(reply.override.loras) == [] and app.Pubkey(pb.PubkeyRequest()) == pb.PubkeyResponse()
    assert app.Hours(pb.HoursRequest()) == pb.HoursResponse()


def test_txt2img_streams_signposts_and_the_seed_protocols_pixels(app, client) -> None:
    # The app names its canvas by hash but leaves the data out for txt2img: that is no input image.
    responses, images = generate(app, prompt="a harbour", negativePrompt="fog", chunked=True,
                                 configuration=configuration(model=MODEL, **CONFIG), image=sha256(b"canvas"))
    signposts = [r.currentSignpost.WhichOneof("signpost") for r in responses if r.HasField("currentSignpost")]
    assert signposts == ["textEncoded"] + ["sampling"] * 4 + ["imageDecoded"]
    steps = [r.currentSignpost.sampling.step for r in responses if r.currentSignpost.HasField("sampling")]
    assert steps == [1, 2, 3, 4]
    expected = [s.WhichOneof("signpost") for s in responses[0].signposts]
    assert expected == ["textEncoded", "sampling", "imageDecoded"] and responses[0].signposts[1].sampling.step == 4
    size = next(r.downloadSize for r in responses if r.HasField("downloadSize"))
    assert size == len(images[0]) == 68 + 128 * 128 * 3 * 2
    seed = client.generate(**SEED_REQUEST)
    assert np.array_equal(result_pixels(images[0]), _png_pixels(seed.images[0]))


@pytest.mark.parametrize("codec", [RAW, FPZIP, DEFLATE])
def test_img2img_and_inpainting_from_tensors_match_the_seed_protocol(app, client, codec) -> None:
    image, mask = _noise(), _mask()
    tensor, mask_blob = image_tensor(image, codec), mask_tensor(mask, DEFLATE if codec == DEFLATE else RAW)
    config = configuration(model=MODEL, **{**CONFIG, "strength": 0.6})
    _, from_image = generate(app, prompt="a harbour", negativePrompt="fog", configuration=config,
                             image=sha256(tensor), contents=[tensor])
    _, inpainted = generate(app, prompt="a harbour", negativePrompt="fog", configuration=config,
                            image=sha256(tensor), mask=sha256(mask_blob), contents=[tensor, mask_blob])
    seed_img2img = client.generate(**SEED_REQUEST, init_image=_png(image), denoising_strength=0.6)
    seed_inpaint = client.generate(**SEED_REQUEST, init_image=_png(image), mask=_png(mask), denoising_strength=0.6)
    assert np.array_equal(result_pixels(from_image[0]), _png_pixels(seed_img2img.images[0]))
    assert np.array_equal(result_pixels(inpainted[0]), _png_pixels(seed_inpaint.images[0]))


def test_the_high_res_fix_and_batches_match_the_seed_protocol(app, client) -> None:
    config = configuration(model=MODEL, **{**CONFIG, "start_width": 4, "start_height": 4, "hires_fix": True,
                                           "hires_fix_start_width": 2, "hires_fix_start_height": 2,
                                           "hires_fix_strength": 0.5, "batch_size": 2})
    responses, images = generate(app, prompt="a harbour", negativePrompt="fog", configuration=config)
    seed = client.generate(**{**SEED_REQUEST, "batch_size": 2}, enable_hr=True, hr_scale=2.0, denoising_strength=0.5)
    assert len(images) == 2
    for blob, png in zip(images, seed.images):
        assert np.array_equal(result_pixels(blob), _png_pixels(png))  # 256x256, upscaled from 128x128
    names = [r.currentSignpost.WhichOneof("signpost") for r in responses if r.HasField("currentSignpost")]
    assert names[-1] == "secondPassImageDecoded" and names.count("secondPassSampling") == 2


def test_no_guidance_and_no_paste_back_mean_what_they_say(app, client) -> None:
    image, mask = _noise(), _mask()
    tensor, mask_blob = image_tensor(image), mask_tensor(mask)
    config = configuration(model=MODEL, **{**CONFIG, "guidance_scale": 0.0, "strength": 0.7, "steps": 10,
                                           "preserve_original_after_inpaint": False})
    _, images = generate(app, prompt="a harbour", negativePrompt="fog", configuration=config, image=tensor,
                         mask=mask_blob)
    seed = client.generate(**{**SEED_REQUEST, "steps": 10, "cfg_scale": 1.0}, init_image=_png(image), mask=_png(mask),
                           denoising_strength=0.7, skip_mask_overlay=True)
    assert np.array_equal(result_pixels(images[0]), _png_pixels(seed.images[0]))
    assert json.loads(seed.info)["denoising_steps"] == 7  # 10 x 0.7, though 0.7 arrives as float32 0.69999998


def test_inline_tensors_are_read_too(app, client) -> None:
    """Clients other than the app put the tensor in the field itself rather than in contents."""
    image = _noise()
    _, images = generate(app, prompt="a harbour", negativePrompt="fog", image=image_tensor(image),
                         configuration=configuration(model=MODEL, **{**CONFIG, "strength": 0.5}))
    seed = client.generate(**SEED_REQUEST, init_image=_png(image), denoising_strength=0.5)
    assert np.array_equal(result_pixels(images[0]), _png_pixels(seed.images[0]))


@pytest.fixture(scope="module")
def lora_store_server(base_config, model_store, tmp_path_factory):
    from tests.conftest import ServerThread, fresh_store

    root = fresh_store(model_store, tmp_path_factory.mktemp("app-lora"))
    with ServerThread(replace(base_config, model_dir=root, engine_dir=tmp_path_factory.mktemp("engines"),
                              max_upload_bytes=1 << 28)) as server:
        model = server.service.model("builtin-tiny-sd")
        write_kohya_lora(root / "loras/style.safetensors", model.unet(), model.prompt_encoders().text_encoders)
        yield server


def test_a_lora_by_the_apps_file_name_matches_the_seed_protocol(lora_store_server) -> None:
    channel, app_stub = stub(lora_store_server.target)
    with channel, lora_store_server.client() as client:
        _, images = generate(app_stub, prompt="a harbour", negativePrompt="fog",
                             configuration=configuration(model=MODEL, loras=(("style_lora_f16.ckpt", 0.8),), **CONFIG))
        with_lora = client.generate(**SEED_REQUEST, loras=[seed_pb.LoraWeight(file="loras/style.safetensors",
                                                                             weight=0.8)])
        without = client.generate(**SEED_REQUEST)
        exists = app_stub.FilesExist(pb.FileListRequest(files=["style_lora_f16.ckpt", MODEL, "sd_v1.5_f16.ckpt"],
                                                        filesWithHash=["style_lora_f16.ckpt"]))
    assert np.array_equal(result_pixels(images[0]), _png_pixels(with_lora.images[0]))
    assert not np.array_equal(result_pixels(images[0]), _png_pixels(without.images[0]))
    assert list(exists.existences) == [True, True, False]
    lora_bytes = (lora_store_server.service.store.root / "loras/style.safetensors").read_bytes()
    assert exists.hashes[0] == hashlib.sha256(lora_bytes).digest() and exists.hashes[1] == b""


def test_the_names_file_maps_the_apps_own_model_names(lora_store_server) -> None:
    root = lora_store_server.service.store.root
    (root / "drawthings-names.json").write_text(json.dumps({"sd_v1.5_f16.ckpt": "builtin-tiny-sd"}))
    channel, app_stub = stub(lora_store_server.target)
    try:
        assert "sd_v1.5_f16.ckpt" in app_stub.Echo(pb.EchoRequest()).files
        _, images = generate(app_stub, configuration=configuration(model="sd_v1.5_f16.ckpt", **CONFIG))
        assert len(images) == 1
        (root / "drawthings-names.json").write_text("[1, 2]")
        error = _error(app_stub.Echo, pb.EchoRequest())
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "drawthings-names.json" in error.details()
    finally:
        (root / "drawthings-names.json").unlink()
        channel.close()


def test_large_images_come_in_chunks_when_the_client_asks(app) -> None:
    config = configuration(model=MODEL, **{**CONFIG, "start_width": 16, "start_height": 12, "steps": 1})
    responses, images = generate(app, configuration=config, chunked=True)
    states = [r.chunkState for r in responses if r.generatedImages]
    assert states == [pb.MORE_CHUNKS, pb.LAST_CHUNK]  # 1024x768 fp16: 4.5 MiB, in pieces of 4 MiB
    assert all(len(r.generatedImages[0]) <= 4 * 1024 * 1024 for r in responses if r.generatedImages)
    assert result_pixels(images[0]).shape == (768, 1024, 3)


@pytest.mark.parametrize("fields, words", [
    (dict(refiner_model="sd_xl_refiner_1.0_f16.ckpt"), "a refiner model"),
    (dict(controls=1), "ControlNet"),
    (dict(tea_cache=True), "TeaCache"),
    (dict(shift=3.0, resolution_dependent_shift=False), "applies to flow-matching models"),
])
def test_what_dts_util_cannot_do_is_refused_by_name(app, fields, words) -> None:
    error = _error(app.GenerateImage, pb.ImageGenerationRequest(
        configuration=configuration(model=MODEL, **{**CONFIG, **fields})), timeout=60)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and words in error.details()


@pytest.mark.parametrize("fields", [dict(upscaler="realesrgan_x4plus_f16.ckpt"),
                                    dict(face_restoration="restoreformer_v1.0_f16.ckpt")])
def test_post_processing_without_its_model_is_skipped_as_grpcservercli_does(app, fields) -> None:
    _, images = generate(app, configuration=configuration(model=MODEL, **{**CONFIG, **fields}))
    assert len(images) == 1


def test_hints_are_refused_and_bad_inputs_are_invalid_argument(app) -> None:
    hinted = pb.ImageGenerationRequest(configuration=configuration(model=MODEL, **CONFIG),
                                       hints=[pb.HintProto(hintType="depth")])
    assert _error(app.GenerateImage, hinted, timeout=60).code() == grpc.StatusCode.FAILED_PRECONDITION
    cases = [
        (dict(configuration=b"\xff" * 12), "not a readable GenerationConfiguration"),
        (dict(configuration=b""), "configuration is empty"),
        (dict(configuration=configuration(model=MODEL, **CONFIG), image=b"\x00" * 40), "shorter than a tensor"),
        (dict(configuration=configuration(model=MODEL, **{**CONFIG, "strength": 0.5}),
              image=image_tensor(_noise())[:200]), "holds 132 bytes of data"),
        (dict(configuration=configuration(model=MODEL, **{**CONFIG, "strength": 0.5}), image=image_tensor(_noise()),
              mask=mask_tensor(Image.new("L", (64, 64)))), "send a u8 mask of the image's"),
    ]
    for fields, words in cases:
        error = _error(app.GenerateImage, pb.ImageGenerationRequest(**fields), timeout=60)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()
    unknown = _error(app.GenerateImage, pb.ImageGenerationRequest(configuration=configuration(
        model="wan_v2.1_14b_f16.ckpt", **CONFIG)), timeout=60)
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and MODEL in unknown.details()


def test_tensor_headers_that_overflow_or_streams_that_break_are_refused_and_the_server_serves_on(app) -> None:
    import struct

    config = configuration(model=MODEL, **{**CONFIG, "strength": 0.5})
    wrapping = struct.pack("<5I12i", 0x217, 1, 2, 0x1000, 0, 65535, 641, 65537, 6700417, *([0] * 8)) + b"x" * 64
    cut = image_tensor(_noise(), FPZIP)[:68 + 150]  # a valid fpzip header, then too little of the stream
    for blob, words in ((wrapping, "send an image of [1, H, W, 3]"), (cut, "not a valid fpzip stream")):
        error = _error(app.GenerateImage, pb.ImageGenerationRequest(configuration=config, image=blob), timeout=60)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()
    assert app.Echo(pb.EchoRequest(name="still")).message == "HELLO still"


def test_an_fpzip_stream_that_claims_more_values_than_its_header_is_refused(app) -> None:
    big = image_tensor(_noise(256, 256), FPZIP)
    small = image_tensor(_noise(), FPZIP)
    forged = small[:68] + big[68:]  # a 128x128 header over a 256x256 stream
    error = _error(app.GenerateImage, pb.ImageGenerationRequest(
        configuration=configuration(model=MODEL, **{**CONFIG, "strength": 0.5}), image=forged), timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "fpzip stream holds 196608 values" in error.details()


def test_the_shared_secret_is_the_servers_token(make_server) -> None:
    server = make_server(auth_token=TOKEN)
    channel, app_stub = stub(server.target)
    with channel:
        refused = app_stub.Echo(pb.EchoRequest(name="x"))
        assert refused.sharedSecretMissing and not refused.message and not refused.files
        assert app_stub.Echo(pb.EchoRequest(name="x", sharedSecret=TOKEN)).message == "HELLO x"
        request = pb.ImageGenerationRequest(configuration=configuration(model=MODEL, **CONFIG))
        error = _error(app_stub.GenerateImage, request, timeout=60)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "shared secret" in error.details()
        assert _error(app_stub.FilesExist, pb.FileListRequest(files=[MODEL])).code() == grpc.StatusCode.UNAUTHENTICATED
        request.sharedSecret = TOKEN
        assert len(generate(app_stub, **{f.name: v for f, v in request.ListFields()})[1]) == 1
    with server.client() as seed_client, pytest.raises(grpc.RpcError) as caught:
        seed_client.echo()  # the seed protocol still wants the bearer token
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _upload(app_stub, name: str, data: bytes, digest: bytes | None = None, offsets: list[int] | None = None):
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    offsets = offsets or [i * 1000 for i in range(len(chunks))]
    messages = [pb.FileUploadRequest(initRequest=pb.InitUploadRequest(
        filename=name, sha256=digest or hashlib.sha256(data).digest(), totalSize=len(data)))]
    messages += [pb.FileUploadRequest(chunk=pb.FileChunk(content=c, offset=o)) for c, o in zip(chunks, offsets)]
    return list(app_stub.UploadFile(iter(messages), timeout=60))


def test_uploads_of_loadable_files_are_checked_and_stored(make_server) -> None:
    server = make_server(own_store=True, max_upload_bytes=1 << 20)
    data = bytes(range(256)) * 10
    channel, app_stub = stub(server.target)
    with channel:
        responses = _upload(app_stub, "uploads/extra.safetensors", data)
        assert [r.receivedOffset for r in responses] == [0, 1000, 2000, 2560] and all(r.chunkUploadSuccess
                                                                                     for r in responses)
        assert (server.service.store.root / "uploads/extra.safetensors").read_bytes() == data
        wrong = _error(_upload, app_stub, "uploads/bad.safetensors", data, digest=b"\0" * 32)
        assert wrong.code() == grpc.StatusCode.DATA_LOSS
        gap = _error(_upload, app_stub, "uploads/gap.safetensors", data, offsets=[0, 1500, 2000])
        assert gap.code() == grpc.StatusCode.DATA_LOSS and "offset 1500" in gap.details()
        assert _upload(app_stub, "uploads/extra.safetensors", data)[-1].receivedOffset == len(data)  # identical
        replaced = _error(_upload, app_stub, "uploads/extra.safetensors", data[::-1])
        assert replaced.code() == grpc.StatusCode.ALREADY_EXISTS
        own_format = _error(_upload, app_stub, "my_model_f16.ckpt", data)
        assert own_format.code() == grpc.StatusCode.FAILED_PRECONDITION and "own model format" in own_format.details()
    assert not any((server.service.store.root / "uploads").glob("bad*"))
    assert not (server.service.store.root / "my_model_f16.ckpt").exists()


def test_the_wire_contract_with_the_app() -> None:
    """Names and numbers the app sends and reads (its public definition); none may move."""
    expected = {
        "EchoRequest": {"name": 1, "sharedSecret": 2},
        "EchoReply": {"message": 1, "files": 2, "override": 3, "sharedSecretMissing": 4, "serverIdentifier": 6},
        "FileListRequest": {"files": 1, "filesWithHash": 2, "sharedSecret": 3},
        "FileExistenceResponse": {"files": 1, "existences": 2, "hashes": 3},
        "ImageGenerationRequest": {"image": 1, "scaleFactor": 2, "mask": 3, "hints": 4, "prompt": 5,
                                   "negativePrompt": 6, "configuration": 7, "override": 8, "contents": 12,
                                   "sharedSecret": 13, "chunked": 14},
        "ImageGenerationResponse": {"generatedImages": 1, "currentSignpost": 2, "signposts": 3, "previewImage": 4,
                                    "scaleFactor": 5, "downloadSize": 7, "chunkState": 8},
        "FileUploadRequest": {"initRequest": 1, "chunk": 2, "sharedSecret": 3},
        "InitUploadRequest": {"filename": 1, "sha256": 2, "totalSize": 3},
        "UploadResponse": {"chunkUploadSuccess": 1, "receivedOffset": 2, "message": 3, "filename": 4},
        "FileChunk": {"content": 1, "filename": 2, "offset": 3},
    }
    assert pb.DESCRIPTOR.package == ""  # the app calls /ImageGenerationService/<Rpc>
    for message, fields in expected.items():
        by_name = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert {name: by_name[name].number for name in fields} == fields
    signpost = pb.DESCRIPTOR.message_types_by_name["ImageGenerationSignpostProto"].fields_by_name
    assert [signpost[n].number for n in ("textEncoded", "imageEncoded", "sampling", "imageDecoded",
                                         "secondPassSampling", "secondPassImageDecoded")] == [1, 2, 3, 4, 6, 7]
    methods = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].methods_by_name
    assert methods["GenerateImage"].server_streaming and methods["UploadFile"].client_streaming
    assert methods["UploadFile"].server_streaming
