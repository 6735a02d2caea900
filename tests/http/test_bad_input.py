"""Bad input over raw HTTP: each gets a 4xx saying what to fix (never a traceback), and the server keeps serving.
Slow clients are cut off by the server's deadline (2 s here)."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import pytest
import requests
from PIL import Image

from dts_util.limits import MAX_HTTP_BODY_BYTES, MAX_HTTP_IMAGE_BODY_BYTES
from tests.http.conftest import CLIENT_TIMEOUT_S
from tests.http.helpers import b64_png, raw_exchange, sample_image

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"


def _post(server, path: str, body: object) -> requests.Response:
    return requests.post(server.http + path, json=body, timeout=60)


def _message(answer: requests.Response) -> str:
    body = answer.json()
    return body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("errors") or body["detail"]


@pytest.mark.parametrize("path, body, status, words", [
    (TXT2IMG, {"prompt": "x", "steps": "many"}, 422, "steps"),
    (TXT2IMG, {"prompt": "x", "width": 0}, 400, "width is 0"),
    (TXT2IMG, {"prompt": "x", "height": 4096}, 400, "height is 4096"),
    (TXT2IMG, {"prompt": "x", "width": 100}, 400, "multiple of 8"),
    (TXT2IMG, {"prompt": "x", "sampler_name": "Nope"}, 400, "unknown sampler 'Nope'"),
    (TXT2IMG, {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "available models"),
    (TXT2IMG, {"prompt": "x", "n_iter": 99}, 400, "n_iter"),
    (TXT2IMG, {"prompt": "x", "cfg_scale": 1000}, 400, "cfg_scale"),
    (IMG2IMG, {"prompt": "x", "init_images": ["%%%not base64"]}, 400, "not valid base64"),
    (IMG2IMG, {"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]}, 400, "decoded"),
    (IMG2IMG, {"prompt": "x"}, 400, "init_images"),
    (IMG2IMG, {"prompt": "x", "init_images": [b64_png(sample_image(64))], "mask": "@@"}, 400, "mask"),
    ("/v1/images/generations", {"prompt": "x", "size": "0x0"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "n": 11}, 400, "n is 11"),
    ("/v1/images/generations", {"size": "64x64"}, 422, "prompt"),
])
def test_bad_fields_are_told(http_server, path, body, status, words) -> None:
    answer = _post(http_server, path, body)
    assert answer.status_code == status, answer.text
    assert words in _message(answer), answer.text
    assert "Traceback" not in answer.text and "/tmp/" not in answer.text


def test_malformed_json_and_empty_bodies(http_server) -> None:
    for path in (TXT2IMG, "/v1/images/generations"):
        answer = requests.post(http_server.http + path, data=b'{"prompt": "x",', timeout=30,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 422 and "not valid JSON" in answer.text, answer.text
    openai_shape = requests.post(http_server.http + "/v1/images/generations", data=b"[1]", timeout=30,
                                 headers={"Content-Type": "application/json"}).json()
    assert set(openai_shape["error"]) == {"message", "type", "param", "code"}


def test_oversized_images_and_bodies(http_server) -> None:
    noise = Image.frombytes("RGB", (2, 2), bytes(12)).resize((9000, 10))  # over 8192 pixels a side
    answer = _post(http_server, IMG2IMG, {"prompt": "x", "init_images": [b64_png(noise)]})
    assert answer.status_code == 400 and "9000x10" in _message(answer)
    # Declared too large: refused from the header, before the body is read.
    head = (f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_HTTP_BODY_BYTES + 1}\r\n\r\n").encode()
    reply = raw_exchange(http_server.http_port, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"at most" in reply
    huge = f"HTTP/1.1\r\nContent-Length: {MAX_HTTP_IMAGE_BODY_BYTES + 1}".encode()
    assert raw_exchange(http_server.http_port, head.replace(f"HTTP/1.1\r\nContent-Length: {MAX_HTTP_BODY_BYTES + 1}"
                                                            .encode(), huge)).startswith(b"HTTP/1.1 413")
    # Chunked, without a length: counted as it arrives and refused once past the limit.
    chunk = b"a" * 65536
    chunked = (f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode() + (b"10000\r\n" + chunk + b"\r\n") * 20
    assert raw_exchange(http_server.http_port, chunked).startswith(b"HTTP/1.1 413")


def test_slow_clients_are_cut_off(http_server) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", http_server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert sock.recv(1024) == b""  # closed by the server
    assert CLIENT_TIMEOUT_S - 0.5 < time.monotonic() - started < CLIENT_TIMEOUT_S + 5
    body = json.dumps({"prompt": "x"}).encode()
    slow_body = (f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body) + 10}\r\n\r\n").encode() + body  # 10 bytes never come
    reply = raw_exchange(http_server.http_port, slow_body, timeout=30)
    assert reply.startswith(b"HTTP/1.1 408") and b"--http-timeout" in reply


def test_the_server_keeps_serving(http_server) -> None:
    answer = _post(http_server, TXT2IMG, {"prompt": "still here", "steps": 1, "width": 64, "height": 64})
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    assert requests.get(http_server.http + "/openapi.json", timeout=30).json()["paths"]["/sdapi/v1/txt2img"]
    assert requests.get(http_server.http + "/docs", timeout=30).status_code == 200
    with http_server.client() as client:
        assert client.echo().message == "HELLO"  # gRPC beside it
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).info["parameters"]
