"""Ports for servers started after the port is chosen: outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

from builder.demo.ports import free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never handed out twice
    assert all(p < low for p in ports)  # no outgoing connection can take them meanwhile
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and really free
    with socket.socket() as client:  # an outgoing connection gets an ephemeral port, never one of ours
        with socket.socket() as server:
            server.bind(("127.0.0.1", free_port()))
            server.listen()
            client.connect(server.getsockname())
            assert client.getsockname()[1] >= low
