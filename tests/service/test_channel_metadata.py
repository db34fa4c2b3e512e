"""A channel made with metadata (the internal secret) carries it on calls of every kind: the
scheduler's Observe stream to the predictor is stream-stream, and a credential that reached
only unary calls left the predictor refusing every observation."""

from __future__ import annotations

import grpc

from alise.client.channel import make_aio_channel

SECRET = ("x-alise-secret", "s3cret")


async def test_metadata_rides_on_unary_and_streaming_calls_alike():
    seen: dict[str, str | None] = {}

    def record(kind, context):
        seen[kind] = dict(context.invocation_metadata()).get(SECRET[0])

    async def uu(request, context):
        record("unary-unary", context)
        return request

    async def us(request, context):
        record("unary-stream", context)
        yield request

    async def su(request_iterator, context):
        record("stream-unary", context)
        return b"".join([r async for r in request_iterator])

    async def ss(request_iterator, context):
        record("stream-stream", context)
        async for r in request_iterator:
            yield r

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {
        "UU": grpc.unary_unary_rpc_method_handler(uu), "US": grpc.unary_stream_rpc_method_handler(us),
        "SU": grpc.stream_unary_rpc_method_handler(su), "SS": grpc.stream_stream_rpc_method_handler(ss)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with make_aio_channel(f"127.0.0.1:{port}", metadata=(SECRET,)) as channel:
            assert await channel.unary_unary("/t.S/UU")(b"a") == b"a"
            assert [r async for r in channel.unary_stream("/t.S/US")(b"b")] == [b"b"]
            call = channel.stream_unary("/t.S/SU")()
            await call.write(b"c")
            await call.done_writing()
            assert await call == b"c"
            call = channel.stream_stream("/t.S/SS")()  # written to, as the Observe stream is
            await call.write(b"d")
            await call.done_writing()
            assert [r async for r in call] == [b"d"]
    finally:
        await server.stop(0)
    assert seen == dict.fromkeys(("unary-unary", "unary-stream", "stream-unary", "stream-stream"), SECRET[1])
