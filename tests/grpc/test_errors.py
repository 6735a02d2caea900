"""Every bad input a client can send gets the right status and a message naming the fix."""

from __future__ import annotations

import math

import grpc
import pytest

from dts_util.client import Client

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = [
    (dict(width=100), INVALID, "width is 100; it must be a multiple of 8 in 64..2048"),
    (dict(width=4096), INVALID, "width is 4096"),
    (dict(height=56), INVALID, "height is 56"),
    (dict(height=-8), INVALID, "height is -8"),
    (dict(steps=151), INVALID, "steps is 151; it must be in 1..150"),
    (dict(steps=-1), INVALID, "steps is -1"),
    (dict(batch_size=9), INVALID, "batch_size is 9; it must be in 1..8"),
    (dict(batch_count=17), INVALID, "batch_count is 17; it must be in 1..16"),
    (dict(batch_size=-1), INVALID, "batch_size is -1"),
    (dict(cfg_scale=math.nan), INVALID, "cfg_scale is nan; send a finite number"),
    (dict(cfg_scale=math.inf), INVALID, "cfg_scale is inf"),
    (dict(cfg_scale=-3.0), INVALID, "cfg_scale is -3.0"),
    (dict(denoising_strength=1.5), INVALID, "denoising_strength is 1.5; it must be in (0, 1]"),
    (dict(denoising_strength=-0.2), INVALID, "denoising_strength is -0.2"),
    (dict(denoising_strength=math.nan), INVALID, "denoising_strength is nan"),
    (dict(hr_scale=math.nan), INVALID, "hr_scale is nan"),
    (dict(hr_scale=5.0), INVALID, "hr_scale is 5.0; it must be in 1..4"),
    (dict(enable_hr=True, width=2048, height=64), INVALID, "high-res fix would make width 4096"),
    (dict(seed=-2), INVALID, "seed is -2"),
    (dict(sampler="Magic"), INVALID, "unknown sampler 'Magic'; valid samplers are: DPM++ 2M Karras"),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model 'no-such-model' is not in the model store; "
                                                             "available models: builtin-tiny-sd"),
    (dict(model="../outside"), INVALID, "contains '..'"),
    (dict(restore_faces=True), grpc.StatusCode.FAILED_PRECONDITION, "no face-restoration model is installed"),
    (dict(prompt="x" * 20000), INVALID, "prompt has 20000 characters; send at most 16384"),
    (dict(negative_prompt="y" * 20000), INVALID, "negative_prompt has 20000 characters"),
]


@pytest.mark.parametrize("fields,code,message", BAD_REQUESTS, ids=[str(f) for f, _, _ in BAD_REQUESTS])
def test_bad_generate_request_is_rejected_and_server_keeps_serving(
        client: Client, fields: dict, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(**{"prompt": "x", "steps": 1, **fields})
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert client.echo().message == "HELLO"
