"""The Draw Things app's ImageGenerationService: decode, delegate to the model layer, encode. No ML here.

The app authenticates with a shared secret inside its messages; it is this server's token, compared in
constant time and never logged. Echo answers a wrong secret as gRPCServerCLI does (OK, with
``sharedSecretMissing``); every other RPC refuses it with UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import grpc

from dts_util.boundary import GenerationOutput, GenerationRequest, ImageGenerator, LatentPreview
from dts_util.client_text import quote
from dts_util.errors import FeatureUnavailable, InvalidRequest, Unauthenticated, UploadCorrupt
from dts_util.grpc.call_streams import CallWatch, UploadMessages, generation_stream, in_thread, open_upload, uploaded
from dts_util.grpc.drawthings_app import configuration
from dts_util.grpc.drawthings_app.names import AppNames
from dts_util.grpc.interceptors import request_log
from dts_util.grpc.proto import draw_things_app_pb2 as pb
from dts_util.grpc.proto import draw_things_app_pb2_grpc as pb_grpc
from dts_util.limits import MAX_APP_CONTENTS, MAX_FILES_EXIST_ENTRIES, MAX_PATH_CHARS
from dts_util.executors import FILES, IMAGES, run_in

# Responses over this size go in pieces when the client asks for ``chunked`` (the app always does).
CHUNK_BYTES = 4 * 1024 * 1024
# The app's files are its own format; dts-util loads these.
UPLOADABLE_SUFFIXES = (".safetensors",)
Signpost = pb.ImageGenerationSignpostProto


class AppServicer(pb_grpc.ImageGenerationServiceServicer):
    """The app's RPCs over the model layer.

    Args:
        generator: the model layer (a ``WorkerPool``).
        config: the server configuration (its token is the app's shared secret).
    """

    def __init__(self, generator: ImageGenerator, config: Any) -> None:
        self.generator, self.token = generator, config.auth_token
        self.upload_idle_timeout = config.upload_idle_timeout
        self.names = AppNames(generator.store)
        # Stable across restarts and distinct between machines and stores: the app tells servers apart by it.
        seed = f"{socket.gethostname()}:{Path(generator.store.root).resolve()}".encode()
        self.server_identifier = int.from_bytes(hashlib.sha256(seed).digest()[:8], "little")

    # -- the shared secret ------------------------------------------------------------------------

    def _secret_ok(self, message: Any) -> bool:
        if not self.token:
            return True
        sent = message.sharedSecret if message.HasField("sharedSecret") else ""
        return hmac.compare_digest(sent.encode(), self.token.encode())

    def _require_secret(self, message: Any) -> None:
        if not self._secret_ok(message):
            raise Unauthenticated("the shared secret is missing or wrong: enter this server's token as the shared "
                                  "secret in the app's server settings")

    # -- Echo, FilesExist, Pubkey, Hours -----------------------------------------------------------

    async def Echo(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext) -> pb.EchoReply:
        if not self._secret_ok(request):
            return pb.EchoReply(sharedSecretMissing=True)
        files, override = await run_in(FILES, self._model_browser)
        return pb.EchoReply(message=f"HELLO {request.name[:MAX_PATH_CHARS]}", files=files, override=override,
                            serverIdentifier=self.server_identifier)

    def _model_browser(self) -> tuple[list[str], pb.MetadataOverride]:
        """The files the app may pick, and their model specifications as the app's model zoo reads them."""
        listed = self.names.listed_models()
        described = {model.name: model for model in self.generator.describe_models()}
        specs = []
        for app_name, store_name in sorted(listed.items()):
            model = described.get(store_name)
            if model is None:
                continue
            spec = {"name": store_name, "file": app_name, "prefix": "",
                    "default_scale": max(1, model.native_size // configuration.SIZE_UNIT), **model.app_spec}
            if "version" in spec:  # a family the app has no version for is not offered to it
                specs.append(spec)
        empty = b"[]"
        override = pb.MetadataOverride(models=json.dumps(specs).encode(), loras=empty, controlNets=empty,
                                       textualInversions=empty, upscalers=empty)
        return [spec["file"] for spec in specs], override

    async def FilesExist(self, request: pb.FileListRequest,
                         context: grpc.aio.ServicerContext) -> pb.FileExistenceResponse:
        self._require_secret(request)
        if len(request.files) > MAX_FILES_EXIST_ENTRIES or len(request.filesWithHash) > MAX_FILES_EXIST_ENTRIES:
            raise InvalidRequest(f"FilesExist got {len(request.files)} files; send at most {MAX_FILES_EXIST_ENTRIES}")
        request_log()["files"] = len(request.files)
        found = await run_in(FILES, self._files, list(request.files), set(request.filesWithHash))
        return pb.FileExistenceResponse(files=request.files, existences=[f[0] for f in found],
                                        hashes=[f[1] for f in found])

    def _files(self, names: list[str], with_hash: set[str]) -> list[tuple[bool, bytes]]:
        found, lookup = [], AppNames(self.generator.store, snapshot=True)  # the store read once per call
        for name in names:
            path = lookup.path(name)
            digest = b""
            if path is not None and path.is_file() and name in with_hash:
                from dts_util.models.lora import file_sha256

                digest = bytes.fromhex(file_sha256(path))
            found.append((path is not None, digest))
        return found

    async def Pubkey(self, request: pb.PubkeyRequest, context: grpc.aio.ServicerContext) -> pb.PubkeyResponse:
        return pb.PubkeyResponse()  # as gRPCServerCLI: no key, the app does not use one with local servers

    async def Hours(self, request: pb.HoursRequest, context: grpc.aio.ServicerContext) -> pb.HoursResponse:
        return pb.HoursResponse()  # no compute-unit thresholds on a local server

    # -- GenerateImage ----------------------------------------------------------------------------

    async def GenerateImage(self, request: pb.ImageGenerationRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ImageGenerationResponse]:
        self._require_secret(request)
        # On the image pool, a few at a time: each decode holds an image in memory before the queue is asked.
        boundary, expected = await run_in(IMAGES, self._boundary_request, request)
        request_log().update(user=request.user[:80])

        def signpost(event: dict, preview: LatentPreview | None) -> pb.ImageGenerationResponse | None:
            current = _signpost(event)
            if current is None:
                return None
            response = pb.ImageGenerationResponse(currentSignpost=current, signposts=expected)
            if isinstance(preview, LatentPreview):  # the app reads a preview only beside a signpost
                response.previewImage = _latent_tensor(preview)
            return response

        async for item in generation_stream(self.generator, boundary, context, signpost):
            if not isinstance(item, GenerationOutput):
                yield item
        output: GenerationOutput = item
        request_log()["summary"] = output.summary
        blobs = await run_in(IMAGES, _result_tensors, output.pixels)
        total = sum(len(blob) for blob in blobs)
        yield pb.ImageGenerationResponse(downloadSize=total)
        pieces = request.chunked and total > CHUNK_BYTES
        for blob in blobs:
            for start in range(0, len(blob), CHUNK_BYTES if pieces else len(blob)):
                end = min(start + CHUNK_BYTES, len(blob)) if pieces else len(blob)
                yield pb.ImageGenerationResponse(
                    generatedImages=[blob[start:end]], scaleFactor=1,
                    chunkState=pb.LAST_CHUNK if end == len(blob) else pb.MORE_CHUNKS)

    def _boundary_request(self, request: pb.ImageGenerationRequest) -> tuple[GenerationRequest, list]:
        """The app's request as the model layer's, and the signposts it will pass; refuses what cannot be done."""
        config = configuration.parse(request.configuration)
        unsupported = list(config.unsupported) + (["control hints (ControlNet)"] if request.hints else [])
        if unsupported:
            raise FeatureUnavailable(f"the app asked for {', '.join(unsupported)}, which dts-util cannot do yet; "
                                     "turn it off in the app and generate again")
        image, mask = self._input_images(request)
        width, height, hires_scale = _sizes(config)
        strength = config.strength if image is not None and config.strength > 0 else 1.0
        boundary = GenerationRequest(
            prompt=request.prompt, negative_prompt=request.negativePrompt, width=width, height=height,
            # The app's guidance 0 (or below) is no guidance; the model layer reads 0 as "the default".
            steps=config.steps, cfg_scale=config.guidance_scale if config.guidance_scale > 0 else 1.0,
            seed=config.seed, sampler=config.sampler,
            enable_hr=hires_scale > 1, hr_scale=hires_scale,
            denoising_strength=config.hires_fix_strength if hires_scale > 1 else strength,
            batch_size=config.batch_size, batch_count=config.batch_count, model=self.names.model(config.model),
            clip_skip=config.clip_skip, loras=tuple((self.names.lora(lora.file), lora.weight) for lora in config.loras),
            init_pixels=image, mask_pixels=mask, mask_blur=config.mask_blur if mask is not None else 0,
            mask_outset=config.mask_outset if mask is not None else 0, raw_output=True,
            skip_mask_overlay=not config.preserve_original, seed_mode=config.seed_mode, latent_previews=True,
            zero_negative_prompt=config.zero_negative_prompt, **_size_conditioning(config), **_flow_settings(config))
        if config.ignored:
            request_log()["ignored"] = ", ".join(config.ignored)
        return boundary, _expected_signposts(boundary, image is not None)

    def _input_images(self, request: pb.ImageGenerationRequest) -> tuple[Any, Any]:
        """(the image, the mask) as decoded pixels for the model layer (no PNG in between), each None when absent.
        An image named by a hash that ``contents`` does not hold means txt2img: the app sends the hash and leaves
        the data out when it is not needed."""
        if len(request.contents) > MAX_APP_CONTENTS:
            raise InvalidRequest(f"contents holds {len(request.contents)} tensors; send at most {MAX_APP_CONTENTS}")
        from dts_util.grpc.drawthings_app import tensors  # numpy: loaded with the first generation, not at start

        contents = {hashlib.sha256(blob).digest(): blob for blob in request.contents}
        image_blob = _unwrap(request, "image", contents)
        if not image_blob:
            return None, None
        image = tensors.tensor_image(tensors.decode(image_blob, "image"), "image")
        mask_blob = _unwrap(request, "mask", contents)
        if not mask_blob:
            return image, None
        return image, tensors.mask_image(tensors.decode(mask_blob, "mask"), image.size)

    # -- UploadFile -------------------------------------------------------------------------------

    async def UploadFile(self, request_iterator: AsyncIterator[pb.FileUploadRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.UploadResponse]:
        """The app's upload: an initRequest, then chunks at contiguous offsets, one response per message; the
        SHA-256 is checked at the end, and the file appears in the store only then."""
        watch = CallWatch(context)
        messages = UploadMessages(request_iterator, watch, self.upload_idle_timeout)
        first = await messages.next()
        if first is None or first.WhichOneof("request") != "initRequest":
            raise InvalidRequest("the first UploadFile message must be an initRequest naming the file")
        self._require_secret(first)
        init = first.initRequest
        request_log()["file"] = init.filename
        _check_uploadable(init)
        # Never over a different file: identical bytes are an idempotent OK, anything else ALREADY_EXISTS.
        upload = await open_upload(self.generator.store, init.filename, False, init.totalSize)
        try:
            yield pb.UploadResponse(chunkUploadSuccess=True, filename=init.filename, receivedOffset=0,
                                    message="upload started")
            received = 0
            while (message := await messages.next()) is not None:
                self._require_secret(message)
                if message.WhichOneof("request") != "chunk":
                    raise InvalidRequest("after the initRequest, an upload sends chunks only")
                if message.chunk.offset != received:
                    raise UploadCorrupt(f"a chunk starts at offset {message.chunk.offset}, but {received} bytes were "
                                        "received; nothing was kept")
                await in_thread(upload.write, message.chunk.content)
                received += len(message.chunk.content)
                yield pb.UploadResponse(chunkUploadSuccess=True, filename=message.chunk.filename,
                                        receivedOffset=received, message="chunk received")
            if received != init.totalSize:
                raise InvalidRequest(f"the upload ended after {received} of its {init.totalSize} bytes; nothing was "
                                     "kept")
            await in_thread(upload.finish, init.sha256.hex(), init.totalSize)
            await asyncio.sleep(0)  # let a cancel that ended the stream arrive before the file is published
            if watch.ended.is_set() or context.cancelled():
                raise asyncio.CancelledError
            upload.publish()
        except BaseException:
            upload.abort()
            raise
        uploaded(self.generator, upload)


def _result_tensors(pixels: list[Any]) -> list[bytes]:
    """The model layer's images (pixels, never a PNG round trip) as the app's image tensors."""
    from dts_util.grpc.drawthings_app import tensors

    return [tensors.encode_image(image) for image in pixels]


def _latent_tensor(preview: LatentPreview) -> bytes:
    """The latents as gRPCServerCLI sends them in ``previewImage``: the app's fp16 NHWC tensor blob, [1, h, w, C]."""
    from dts_util.grpc.drawthings_app import tensors

    return tensors.encode_fp16(preview.height, preview.width, preview.channels, preview.values)


def _check_uploadable(init: pb.InitUploadRequest) -> None:
    """Refuse, before any bytes are sent, what this server could not load."""
    if len(init.sha256) != 32:
        raise InvalidRequest(f"the initRequest's sha256 has {len(init.sha256)} bytes; send the file's 32-byte SHA-256")
    if init.totalSize < 0:
        raise InvalidRequest(f"the initRequest's totalSize is {init.totalSize}; send the file's size in bytes")
    if not init.filename.endswith(UPLOADABLE_SUFFIXES):
        raise FeatureUnavailable(
            f"{quote(init.filename)} is in the Draw Things app's own model format, which dts-util cannot load; "
            "put the original .safetensors checkpoint or LoRA in the server's model store instead (dts-util upload, "
            "or a copy), and map the app's file name to it in drawthings-names.json if the names differ")


def _unwrap(request: pb.ImageGenerationRequest, field: str, contents: dict[bytes, bytes]) -> bytes:
    """A tensor field's blob: inline, or the ``contents`` entry its 32-byte SHA-256 names (b"" when absent)."""
    if not request.HasField(field):
        return b""
    value = getattr(request, field)
    return contents.get(value, b"") if len(value) == 32 else value


def _flow_settings(config: configuration.AppConfiguration) -> dict[str, float]:
    """The app's FLUX settings as the model layer reads them (SD models ignore the first two): the guidance embedding
    takes cfg_scale's place for guidance-distilled models, whose CFG is true CFG and off while "speed up with
    guidance embed" is; a fixed shift only where the resolution-dependent one is off (1 is no shift)."""
    return {"guidance_embed": config.guidance_embed,
            "true_cfg_scale": 0.0 if config.speed_up_with_guidance_embed else max(config.guidance_scale, 0.0),
            "shift": 0.0 if config.resolution_dependent_shift else config.shift}


def _sizes(config: configuration.AppConfiguration) -> tuple[int, int, float]:
    """(first-pass width, height, high-res upscale factor; 1 without the high-res fix)."""
    if not config.hires_fix or not config.hires_fix_width or config.hires_fix_width >= config.width:
        return config.width, config.height, 1.0
    scale = config.width / config.hires_fix_width
    if not config.hires_fix_height or abs(config.height / config.hires_fix_height - scale) > 1e-6:
        raise InvalidRequest(f"the high-res fix goes from {config.hires_fix_width}x{config.hires_fix_height} to "
                             f"{config.width}x{config.height}; dts-util scales width and height by one factor")
    return config.hires_fix_width, config.hires_fix_height, scale


def _size_conditioning(config: configuration.AppConfiguration) -> dict[str, int]:
    """SDXL conditioning as the boundary request's fields. The app's 0 means the image's size, and its negative
    original size falls back to the original size: the boundary's defaults say the same."""
    (original_height, original_width), (target_height, target_width) = config.original_size, config.target_size
    negative_height, negative_width = config.negative_original_size
    return dict(original_width=original_width, original_height=original_height, crop_top=config.crop[0],
                crop_left=config.crop[1], target_width=target_width, target_height=target_height,
                negative_original_width=negative_width, negative_original_height=negative_height)


def _signpost(event: dict) -> Signpost | None:
    """One of our progress events as the app's signpost (None for events it has no signpost for)."""
    name = event.get("event")
    if name in ("sampling", "secondPassSampling"):
        return Signpost(**{name: getattr(Signpost, name[0].upper() + name[1:])(step=int(event.get("step", 0)))})
    kinds = {"textEncoded": Signpost.TextEncoded, "imageEncoded": Signpost.ImageEncoded,
             "imageDecoded": Signpost.ImageDecoded, "secondPassImageDecoded": Signpost.SecondPassImageDecoded}
    return Signpost(**{name: kinds[name]()}) if name in kinds else None


def _expected_signposts(request: GenerationRequest, from_image: bool) -> list[Signpost]:
    """Every signpost the generation will pass; the app sizes its progress bar by the sampling one."""
    from dts_util.pipeline.params import DEFAULT_STEPS, DEFAULT_STRENGTH, client_strength, img2img_start_step

    steps = request.steps or DEFAULT_STEPS

    def denoising_steps(strength: float) -> int:
        return steps - img2img_start_step(steps, client_strength(strength) or DEFAULT_STRENGTH)

    first = denoising_steps(request.denoising_strength) if from_image else steps
    expected = [Signpost(textEncoded=Signpost.TextEncoded())]
    if from_image:
        expected.append(Signpost(imageEncoded=Signpost.ImageEncoded()))
    expected.append(Signpost(sampling=Signpost.Sampling(step=first)))
    if request.enable_hr:
        second = denoising_steps(request.denoising_strength)
        expected += [Signpost(secondPassSampling=Signpost.SecondPassSampling(step=second)),
                     Signpost(secondPassImageDecoded=Signpost.SecondPassImageDecoded())]
    else:
        expected.append(Signpost(imageDecoded=Signpost.ImageDecoded()))
    return expected
