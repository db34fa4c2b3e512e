"""The scheduler's two listeners: clients (SchedulerService) and workers (WorkerService).

Two servers, not two ports of one: a gRPC server serves every service it has on every port,
and a worker reads the prompts it is given, so WorkerService must not be reachable where
clients are. Each has its own call limit, so a flood of clients never takes a worker's place.
Both answer health from one status and reflection for their own service. The worker listener
pings its workers every second and drops one that does not answer within two
(``grpc_server.WORKER_KEEPALIVE``): its jobs go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import grpc

from alise.common import grpc_server
from alise.common.security import AuthInterceptor
from alise.scheduler.config import SchedulerConfig
from alise.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
#: Calls in progress on the worker listener (a worker holds one).
MAX_WORKER_CALLS = 1024


class WorkerServiceElsewhere(worker_pb2_grpc.WorkerServiceServicer):
    """WorkerService on the client listener: it only tells a worker dialing the wrong port
    where to go. Workers are served on the worker listener alone."""

    async def Connect(self, request_iterator, context):
        with contextlib.suppress(Exception):  # its hello first: a write racing the refusal hides it
            await asyncio.wait_for(request_iterator.__anext__(), timeout=5.0)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "this is the scheduler's client listener; workers connect to its worker "
                            "listener (`alise scheduler --worker-address`, by default 127.0.0.1 and the "
                            "client port + 1)")


async def make_client_listener(config: SchedulerConfig, clients, health: grpc_server.ServingStatus, *,
                               prechecks: Mapping[str, grpc_server.Precheck]) -> grpc.aio.Server:
    """The client listener, not yet bound: ``clients`` serves SchedulerService (with
    ``prechecks`` on raw requests); a worker dialing it is told where to go."""
    server = grpc_server.create_server(max_calls=config.max_calls_in_progress,
                                       interceptors=[AuthInterceptor(config.security)], prechecks=prechecks)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(clients, server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServiceElsewhere(), server)
    await grpc_server.add_health_and_reflection(server, [SCHEDULER_SERVICE], status=health)
    return server


async def make_worker_listener(config: SchedulerConfig, workers, health: grpc_server.ServingStatus) -> grpc.aio.Server:
    """The worker listener, not yet bound: ``workers`` serves WorkerService."""
    worker_server = grpc_server.create_server(max_calls=MAX_WORKER_CALLS,
                                              interceptors=[AuthInterceptor(config.security)],
                                              keepalive=grpc_server.WORKER_KEEPALIVE)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(workers, worker_server)
    await grpc_server.add_health_and_reflection(worker_server, [WORKER_SERVICE], status=health)
    return worker_server
