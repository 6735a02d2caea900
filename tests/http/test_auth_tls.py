"""A server with a token and TLS: webuiapi with basic auth and openai with a bearer token, both over HTTPS; no or a
wrong token is 401; a full queue is 503 with Retry-After."""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import openai
import pytest
import requests
import webuiapi

from dts_util.client import Security
from tests.http.conftest import TOKEN
from tests.http.helpers import pixels


def _https(server, tls_files) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # $REQUESTS_CA_BUNDLE would override the session's CA
    session.verify = str(tls_files.ca_cert)
    return session


def test_clients_with_the_token_over_tls(secure_server, tls_files) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=secure_server.http_port, use_https=True)
    api.session.trust_env = False  # $REQUESTS_CA_BUNDLE would override the session's CA
    api.session.verify = str(tls_files.ca_cert)
    api.set_auth("anyone", TOKEN)  # A1111's --api-auth style: the token is the password
    fields = dict(prompt="over tls", seed=3, steps=2, width=64, height=64, cfg_scale=7)
    result = api.txt2img(**fields, sampler_name="Euler")
    with secure_server.client(security=Security(token=TOKEN, ca=tls_files.ca_cert)) as grpc_client:
        want = pixels(grpc_client.generate(**fields, sampler="Euler").images[0])
    assert np.array_equal(np.asarray(result.image.convert("RGB")), want)

    import httpx

    client = openai.OpenAI(base_url=f"{secure_server.http}/v1", api_key=TOKEN, max_retries=0,
                           http_client=httpx.Client(verify=str(tls_files.ca_cert)))
    answer = client.images.generate(prompt="over tls", size="64x64", extra_body={"seed": 3, "steps": 2})
    assert pixels(base64.b64decode(answer.data[0].b64_json)).shape == (64, 64, 3)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": "Basic " + base64.b64encode(b"user:wrong").decode()},
                                     {"Authorization": "Basic %%%"}])
def test_no_or_a_wrong_token_is_401(secure_server, tls_files, headers) -> None:
    session = _https(secure_server, tls_files)
    a1111 = session.get(f"{secure_server.http}/sdapi/v1/sd-models", headers=headers)
    assert a1111.status_code == 401 and a1111.headers["WWW-Authenticate"].startswith("Basic")
    assert TOKEN not in a1111.text
    oa = session.post(f"{secure_server.http}/v1/images/generations", json={"prompt": "x"}, headers=headers)
    assert oa.status_code == 401 and oa.json()["error"]["code"] == "invalid_api_key"
    assert session.get(f"{secure_server.http}/openapi.json").status_code == 200  # the schema stays open


def test_a_full_queue_is_503_with_retry_after(secure_server, tls_files) -> None:
    session = _https(secure_server, tls_files)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{secure_server.http}/sdapi/v1/txt2img"
    body = {"prompt": "occupies the device", "steps": 150, "width": 64, "height": 64}
    first = threading.Thread(target=lambda: session.post(url, json=body, headers=auth), daemon=True)
    first.start()
    deadline = time.monotonic() + 30
    while secure_server.queue.pending < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = requests.post(url, json=dict(body, steps=1), headers=auth, verify=str(tls_files.ca_cert))
    assert second.status_code == 503 and second.headers["Retry-After"].isdigit(), second.text
    edit = requests.post(f"{secure_server.http}/v1/images/edits", headers=auth, verify=str(tls_files.ca_cert),
                         files={"image": ("a.png", b"\x89PNG not decoded", "image/png")}, data={"prompt": "x"})
    assert edit.status_code == 503 and edit.json()["error"]["code"] == "queue_full"  # before the image is read
    session.post(f"{secure_server.http}/sdapi/v1/interrupt", headers=auth)
    first.join(60)
