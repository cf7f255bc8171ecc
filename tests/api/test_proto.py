"""The contract: generated code matches the .proto files, and reflection serves them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

if TYPE_CHECKING:
    from service.grpc.server import GrpcServer

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate", module)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    """service/grpc/gen is exactly what `make proto` makes of proto/kipam/v1 (else: run it)."""
    generate = _generator()
    written = generate.generate(tmp_path)  # type: ignore[attr-defined]
    checked_in = ROOT / "service" / "grpc" / "gen"
    assert sorted(p.name for p in written) == sorted(
        p.name for p in checked_in.iterdir() if p.is_file()
    )
    for path in written:
        assert path.read_text() == (checked_in / path.name).read_text(), (
            f"{path.name} is stale: run `make proto` and commit the result"
        )


@pytest.mark.integration
@pytest.mark.api
async def test_reflection_lists_and_describes_every_service(server: GrpcServer) -> None:
    """Server reflection, as grpcurl uses it: the services, and kipam's files by symbol."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="kipam.v1.AllocationService"
            ),
        ]
        answers = [answer async for answer in stub.ServerReflectionInfo(iter(requests))]
    services = {s.name for s in answers[0].list_services_response.service}
    assert {
        "kipam.v1.PoolService",
        "kipam.v1.AllocationService",
        "kipam.v1.ClusterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answers[1].file_descriptor_response.file_descriptor_proto
    ]
    assert "kipam/v1/allocation.proto" in {f.name for f in files}
    allocation = next(f for f in files if f.name == "kipam/v1/allocation.proto")
    methods = {m.name for s in allocation.service for m in s.method}
    assert "WatchAllocations" in methods


def test_every_rpc_has_a_handler_of_ours() -> None:
    """The generated servicer bases raise NotImplementedError; ours override every RPC."""
    from service.grpc.gen import (  # noqa: PLC0415
        allocation_pb2,
        cluster_pb2,
        pool_pb2,
    )
    from service.grpc.server import (  # noqa: PLC0415
        AllocationServicer,
        ClusterServicer,
        PoolServicer,
    )

    for module, servicer, name in (
        (pool_pb2, PoolServicer, "PoolService"),
        (allocation_pb2, AllocationServicer, "AllocationService"),
        (cluster_pb2, ClusterServicer, "ClusterService"),
    ):
        rpcs = [m.name for m in module.DESCRIPTOR.services_by_name[name].methods]
        assert rpcs
        for rpc in rpcs:
            assert rpc in vars(servicer), f"{name}.{rpc} falls through to the generated stub"
