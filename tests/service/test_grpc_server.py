"""The plumbing every ALISE server shares, in-process on port 0: health (Check, Watch, List)
through the decode guard, and server reflection under both its names."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from alise.common import grpc_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def start(names: list[str]):
    server = grpc_server.create_server()
    status = await grpc_server.add_health_and_reflection(server, names)
    port = grpc_server.bind(server, "127.0.0.1:0")
    await server.start()
    return server, status, f"127.0.0.1:{port}"


async def test_watch_streams_each_change_and_list_shows_every_service():
    server, status, address = await start(["alise.v1.Example"])
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="alise.v1.Example"))
            assert (await watch.read()).status == SERVING
            await status.set_one("alise.v1.Example", False)
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            listed = await stub.List(health_pb2.HealthListRequest())
    finally:
        await server.stop(0)
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": SERVING, "alise.v1.Example": NOT_SERVING}


async def test_reflection_answers_under_v1_and_v1alpha_and_describes_v1_itself():
    server, _, address = await start(["alise.v1.Example"])
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    replies = {}
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            for version in ("v1", "v1alpha"):
                call = channel.stream_stream(
                    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                replies[version] = [r async for r in call(iter(requests))]
    finally:
        await server.stop(0)
    for version, (listing, described) in replies.items():
        names = {s.name for s in listing.list_services_response.service}
        assert names == {"alise.v1.Example", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                         "grpc.reflection.v1alpha.ServerReflection"}, version
        from google.protobuf import descriptor_pb2

        proto = described.file_descriptor_response.file_descriptor_proto[0]
        file = descriptor_pb2.FileDescriptorProto.FromString(proto)
        assert (file.name, file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"), version
        [method] = file.service[0].method
        assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_a_server_accepts_the_sdks_pings_between_calls():
    """The SDK's channels ping every 0.5 s, calls or not; gRPC's default policy would close
    such a connection after three pings (GOAWAY too_many_pings), and the channel would go
    idle. Ours keeps it ready."""
    from alise.client.channel import make_aio_channel

    server, _, address = await start([])
    try:
        async with make_aio_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest())
            await asyncio.sleep(4.5)  # nine pings with no call
            assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await server.stop(0)
