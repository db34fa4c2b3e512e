"""Naming what answers at an address when it is not an ALISE scheduler (a call came back
UNIMPLEMENTED): the services that server lists through reflection."""

from __future__ import annotations

import grpc

from alise.client.channel import make_channel
from alise.client.errors import AliseError, WrongService, from_rpc_error

SCHEDULER = "alise.v1.SchedulerService"
#: Services every ALISE server carries beside its own; they say nothing about which it is.
_PLUMBING = ("grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
             "grpc.reflection.v1alpha.ServerReflection")
_KNOWN = {"alise.v1.PredictorService": "the ALISE predictor",
          "alise.v1.WorkerService": "the ALISE scheduler's worker listener"}


def served_services(address: str, tls_ca: str | None = None, timeout_s: float = 2.0) -> list[str] | None:
    """The service names the server at ``address`` lists, or None when it has no reflection."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        with make_channel(address, tls_ca=tls_ca) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            for reply in stub.ServerReflectionInfo(iter([request]), timeout=timeout_s):
                return sorted(s.name for s in reply.list_services_response.service)
    except grpc.RpcError:
        return None
    return None


def describe_wrong_service(address: str, services: list[str] | None) -> str:
    """What to tell a caller whose call to the scheduler reached another server."""
    own = [s for s in services or () if s not in _PLUMBING]
    if services is None:
        what = "a gRPC server without reflection"
    elif not own:
        what = "a server of health checks only (an ALISE worker's health port?)"
    else:
        names = ", ".join(own)
        known = [_KNOWN[s] for s in own if s in _KNOWN]
        what = f"{known[0]} ({names})" if known else f"a server of {names}"
    return (f"{address} is not an ALISE scheduler: it is {what}; point the client at the "
            f"scheduler's address (`alise up` serves it on 127.0.0.1:50051)")


def explain(error: grpc.RpcError, address: str | None, tls_ca: str | None = None) -> AliseError:
    """``from_rpc_error`` plus, for UNIMPLEMENTED, which server answered (one reflection call)."""
    err = from_rpc_error(error, address)
    if isinstance(err, WrongService) and address:
        services = served_services(address, tls_ca)
        if services is None or SCHEDULER not in services:
            return WrongService(err.code, describe_wrong_service(address, services))
    return err
