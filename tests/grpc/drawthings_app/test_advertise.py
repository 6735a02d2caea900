"""The mDNS announcement the Draw Things app browses for (built here, never sent: tests keep to loopback)."""

from __future__ import annotations

from dts_util.grpc.drawthings_app.advertise import SERVICE_TYPE, Advertiser, instance_name, service_info


def test_the_instance_name_carries_tls_as_the_app_reads_it() -> None:
    assert instance_name("gpu-box", True) == "gpu-box_tls" and instance_name("gpu.box", False) == "gpu-box_notls"


def test_the_record_set_points_the_app_at_the_grpc_port() -> None:
    info = service_info("gpu-box", 7859, False, ["192.168.1.20"], host="gpu-box.example")
    assert info.type == SERVICE_TYPE == "_dt-grpc._tcp.local."
    assert info.name == "gpu-box_notls._dt-grpc._tcp.local." and info.server == "gpu-box.local."
    assert info.port == 7859 and info.parsed_addresses() == ["192.168.1.20"]
    assert info.properties == {b"txtvers": b"1"}


def test_a_server_on_every_address_announces_the_machines_own() -> None:
    addresses = Advertiser("x", 7859, True, "0.0.0.0")._addresses()
    assert all(not address.startswith("127.") for address in addresses)
    assert Advertiser("x", 7859, True, "10.1.2.3")._addresses() == ["10.1.2.3"]


def test_serve_announces_and_withdraws_through_zeroconf(monkeypatch, base_config) -> None:
    """The start-up path, with zeroconf's sender replaced: nothing leaves the machine in tests."""
    import asyncio
    from dataclasses import replace

    import zeroconf.asyncio

    from dts_util.grpc import bootstrap

    calls = []

    class Recorder:
        async def async_register_service(self, info):
            calls.append(("register", info.name, info.port))

        async def async_unregister_service(self, info):
            calls.append(("unregister", info.name))

        async def async_close(self):
            calls.append(("close",))

    monkeypatch.setattr(zeroconf.asyncio, "AsyncZeroconf", Recorder)
    config = replace(base_config, advertise=True, advertise_name="studio", address="10.0.0.7", allow_no_auth=True)

    async def run() -> None:
        advertiser = await bootstrap._advertise(config, 7859)
        await advertiser.stop()

    asyncio.run(run())
    assert calls == [("register", "studio_notls._dt-grpc._tcp.local.", 7859),
                     ("unregister", "studio_notls._dt-grpc._tcp.local."), ("close",)]
    assert asyncio.run(bootstrap._advertise(replace(base_config, advertise=False), 7859)) is None
