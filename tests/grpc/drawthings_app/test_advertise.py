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
