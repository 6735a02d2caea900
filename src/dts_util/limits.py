"""Every bound on what a client may send, in one place (the README's Security table lists them).

Limits on strings are checked before the value is used, logged or echoed. Request
messages are bounded per RPC by what that RPC needs, while responses stay large.
"""

from __future__ import annotations

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# Input images of img2img and inpainting (encoded bytes, and pixels once decoded). 16 MiB holds any
# 2048x2048 RGB PNG, even of noise (12.6 MB raw); a mask is two-tone and compresses far better.
MAX_INIT_IMAGE_BYTES = 16 * MiB
MAX_MASK_BYTES = 4 * MiB
MAX_INPUT_IMAGE_PIXELS = 4096 * 4096
MAX_INPUT_IMAGE_SIDE = 8192
MAX_MASK_BLUR = 64

# The Draw Things app's GenerateImage carries its image as an fp16 tensor (2048x2048: 24 MiB raw), its mask
# and hints beside it.
MAX_APP_GENERATE_REQUEST_BYTES = 32 * MiB
MAX_APP_CONTENTS = 16  # tensors in one request's content-addressed list

# Request messages, per RPC (serialized size). Larger ones are RESOURCE_EXHAUSTED.
MAX_GENERATE_REQUEST_BYTES = MAX_INIT_IMAGE_BYTES + MAX_MASK_BYTES + 256 * KiB
MAX_FILES_EXIST_REQUEST_BYTES = 512 * KiB
MAX_ECHO_REQUEST_BYTES = 1 * KiB
MAX_UPLOAD_CHUNK_BYTES = 4 * MiB
# One UploadFile message: a chunk plus its name, hash and size fields.
MAX_UPLOAD_MESSAGE_BYTES = MAX_UPLOAD_CHUNK_BYTES + 64 * KiB
# What the gRPC core accepts at all (a little over the largest of the above, so each RPC's own limit answers
# with its own message); anything bigger never reaches Python.
MAX_RECEIVE_MESSAGE_BYTES = max(MAX_GENERATE_REQUEST_BYTES, MAX_UPLOAD_MESSAGE_BYTES) + 64 * KiB
# Responses: a batch of large PNGs. GenerateImage refuses up front what could not fit.
MAX_RESPONSE_BYTES = 256 * MiB
# What gRPC clients accept by default (Python, Node, Go, grpcurl), unless they raise it.
DEFAULT_CLIENT_RECEIVE_BYTES = 4 * MiB

# Strings (characters).
MAX_PROMPT_CHARS = 16384
MAX_SAMPLER_CHARS = 64
MAX_PATH_CHARS = 1024
# Bytes of one path component, as the filesystem counts them (UTF-8).
MAX_PATH_COMPONENT_BYTES = 255
SHA256_HEX_CHARS = 64

# FilesExist.
MAX_FILES_EXIST_ENTRIES = 512

# Uploads (defaults of the `serve` flags of the same names).
DEFAULT_MAX_UPLOAD_BYTES = 16 * GiB
DEFAULT_MAX_STORE_BYTES = 0  # 0 = no quota beyond the free-disk floor
DEFAULT_MIN_FREE_DISK_BYTES = 1 * GiB
DEFAULT_MAX_CONCURRENT_UPLOADS = 4
DEFAULT_UPLOAD_IDLE_TIMEOUT_S = 60.0

# Models held in memory at once (LRU).
DEFAULT_MAX_LOADED_MODELS = 2

# HTTP APIs (serve --http-port). JSON carries images as base64 (4 bytes per 3 of image): img2img's image and
# mask, with room for the other fields, and OpenAI's multipart edits the same two files. Every other body is small.
MAX_HTTP_IMAGE_BODY_BYTES = (MAX_INIT_IMAGE_BYTES + MAX_MASK_BYTES) * 4 // 3 + 1 * MiB
MAX_HTTP_BODY_BYTES = 1 * MiB
# One request's head (request line and headers) before h11 refuses it.
MAX_HTTP_HEADER_BYTES = 64 * KiB
# Seconds a client may take to send its request, or to take a response, before its connection is closed.
DEFAULT_HTTP_TIMEOUT_S = 60.0
# Images one OpenAI request may ask for (its API's own limit).
MAX_OPENAI_IMAGES = 10
