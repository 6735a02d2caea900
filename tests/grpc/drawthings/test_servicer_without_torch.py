"""The Draw Things servicer over a stand-in model layer: the protocol is served and tested without torch.

It runs in a fresh interpreter so that "torch was never imported" is a real observation, not an
accident of what earlier tests loaded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys, tempfile
    from pathlib import Path

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dts_util.boundary import GenerationOutput
    from dts_util.config import ServerConfig
    from dts_util.errors import ModelNotFound
    from dts_util.grpc.bootstrap import start_server
    from dts_util.grpc.proto import image_generation_pb2 as pb
    from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
    from dts_util.models.store import ModelStore


    class StandInGenerator:
        """Answers like the model layer, from memory."""

        default_model = "stand-in"

        def __init__(self, root):
            self.store, self.requests, self.closed = ModelStore(root), [], False

        def model_names(self):
            return ["stand-in"]

        def describe_models(self):
            from dts_util.boundary import ModelDescription

            return [ModelDescription("stand-in", "flux1", 1024, False, {}, 28, 3.5, "Euler", 16)]

        def files_changed(self, path):
            pass

        async def generate(self, request, *, streamed=False, on_update=None):
            if request.model == "missing":
                raise ModelNotFound("model 'missing' is not in the model store")
            self.requests.append(request)
            if on_update is not None:
                on_update({"event": "sampling", "step": 1, "total": 1}, b"preview")
            image = bytes(range(256)) * 20000  # 5 MB: more than one default-sized message
            return GenerationOutput([image], json.dumps({"prompt": request.prompt}), ["sampling"], "stand-in")

        def prepare_store(self):
            pass

        def warm_up(self):
            pass

        def close(self):
            self.closed = True


    async def main():
        root = Path(tempfile.mkdtemp())
        config = ServerConfig(model_dir=root / "models", engine_dir=root / "engines", port=0)
        (root / "models").mkdir()
        generator = StandInGenerator(root / "models")
        running = await start_server(config, generator)
        await running.set_serving(True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)
            echo = await stub.Echo(pb.EchoRequest())
            assert echo.message == "HELLO" and list(echo.models) == ["stand-in"], echo
            summary = echo.model_summaries[0]
            assert (summary.family, summary.default_steps, summary.size_multiple) == ("flux1", 28, 16), echo

            updates = [u async for u in stub.GenerateImageStream(pb.ImageGenerationRequest(prompt="a cat", seed=3))]
            assert json.loads(updates[0].event)["step"] == 1 and updates[0].preview == b"preview"
            pieces = [u.image_data for u in updates if u.image_data]
            assert len(pieces) == 2 and b"".join(pieces) == bytes(range(256)) * 20000
            assert json.loads(updates[-1].info) == {"prompt": "a cat"}
            assert generator.requests[0].prompt == "a cat" and generator.requests[0].seed == 3

            try:
                await stub.GenerateImage(pb.ImageGenerationRequest(prompt="x", model="missing"))
                raise AssertionError("a missing model was not refused")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND and "missing" in error.details()

            health = health_pb2_grpc.HealthStub(channel)
            name = "drawthings.ImageGenerationService"
            await running.set_serving(False, name)
            check = lambda service: health.Check(health_pb2.HealthCheckRequest(service=service))
            assert (await check(name)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await check("")).status == health_pb2.HealthCheckResponse.SERVING
        await running.stop(0)
        assert generator.closed
        loaded = [m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules]
        assert not loaded, f"the protocol layer imported {loaded}"
        print("served without torch")

    asyncio.run(main())
''')


def test_the_protocol_serves_over_a_stand_in_model_layer_without_importing_torch() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served without torch" in result.stdout


def test_boundary_types_and_errors_import_neither_torch_nor_grpc() -> None:
    check = ("import sys, dts_util.boundary, dts_util.errors; "
             "print([m for m in ('torch', 'grpc', 'numpy') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
