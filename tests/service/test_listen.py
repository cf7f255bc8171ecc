"""Listening sockets: `[::]` takes IPv4 clients too, as gRPC's listener does."""

from __future__ import annotations

import socket

import pytest

from service.app import _bind


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack sockets here")
def test_the_any_address_listens_on_both_families() -> None:
    """A kubelet probing a pod's IPv4 address reaches a server bound to `[::]`."""
    with _bind("[::]:0", "KIPAM_HTTP_ADDR") as server:
        port = server.getsockname()[1]
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(2)
                client.connect((host, port))


def test_a_specific_ipv6_address_stays_ipv6() -> None:
    """`[::1]` is that address only."""
    with _bind("[::1]:0", "KIPAM_HTTP_ADDR") as server:
        assert server.family == socket.AF_INET6
