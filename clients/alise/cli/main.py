"""The `alise` command.

Client commands (generate, status) need only the SDK. Server commands (up, scheduler,
worker, predictor, trace, bench, sim) import the server packages when they run, so the
client commands start fast and work where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from alise.client import DEFAULT_ADDRESS, AliseError, Client

#: sub-command -> module providing add_arguments(parser) and main(args) -> int
SERVER_COMMANDS = {
    "up": ("alise.cluster.main", "start the local cluster (predictor, scheduler, workers) and stay in the foreground"),
    "scheduler": ("alise.scheduler.main", "run the scheduler service"),
    "worker": ("alise.worker.main", "run one worker (a model replica) that dials the scheduler"),
    "http": ("alise.http.main", "run the OpenAI-compatible HTTP door in front of the scheduler"),
}
#: sub-commands that register their own sub-parsers: module providing register(subparsers).
#: The first module to register a name keeps it (alise.bench.cli's `bench` over alise.sim.cli's).
REGISTERED = ["alise.bench.cli", "alise.predictor.cli", "alise.sim.cli"]


def _cmd_generate(args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                  timeout_s=args.timeout)
    try:
        with Client(args.address, token=args.token, tls_ca=args.tls_ca) as client:
            last = None
            for chunk in client.generate(args.prompt, **kwargs):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except AliseError as exc:
        print(f"\nalise: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nalise: cancelled", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    if last is not None and last.usage is not None and not args.quiet:
        u = last.usage
        print(f"[{u.completion_tokens} tokens, finish={last.finish_reason}, ttft={u.ttft_s * 1e3:.0f} ms, "
              f"total={u.e2e_s:.2f} s]", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.address, token=args.token, tls_ca=args.tls_ca) as client:
            status = client.status()
    except AliseError as exc:
        print(f"alise: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.__dict__, indent=2))
        return 0
    print(f"policy {status.policy}   up {status.uptime_s:.0f} s   predictor: {status.predictor_state}")
    print(f"queue: {status.num_waiting} waiting, {status.num_running} running, {status.num_paused} paused, "
          f"{status.num_finished} finished, {status.num_preemptions} preemptions {status.preemptions_by_action}")
    if not status.workers:
        print("workers: none connected")
    for w in status.workers:
        print(f"worker {w['worker_id']}: {w['model']} on {w['device']}  "
              f"device blocks {w['num_free_device_blocks']}/{w['num_device_blocks']} free "
              f"(x{w['block_size']} tokens), host {w['num_free_host_blocks']}/{w['num_host_blocks']}  "
              f"running {w['num_running']} paused {w['num_paused']}  last step {w['last_step_ms']:.1f} ms")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service at ADDRESS reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"alise: {args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alise", description="ALISE: LLM serving scheduled by predicted job length")
    sub = parser.add_subparsers(dest="command", required=True)
    address = os.environ.get("ALISE_ADDRESS", DEFAULT_ADDRESS)
    token = os.environ.get("ALISE_TOKEN")

    g = sub.add_parser("generate", help="stream a generation to the terminal")
    g.add_argument("prompt")
    g.add_argument("--address", default=address)
    g.add_argument("--token", default=token, help="bearer token (env ALISE_TOKEN)")
    g.add_argument("--tls-ca", default=os.environ.get("ALISE_TLS_CA"), help="CA of a TLS server (PEM)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--quiet", action="store_true", help="no usage line")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("status", help="workers, queue and memory of a running cluster")
    s.add_argument("--address", default=address)
    s.add_argument("--token", default=token)
    s.add_argument("--tls-ca", default=os.environ.get("ALISE_TLS_CA"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)

    h = sub.add_parser("health", help="check a service's grpc.health.v1 status (exit 0 if SERVING)")
    h.add_argument("address")
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=3.0)
    h.set_defaults(func=_cmd_health)

    for name, (module, help_text) in SERVER_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _lazy(p, module)
    for module in REGISTERED:
        try:
            importlib.import_module(module).register(_FirstComeSubparsers(sub))
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
    return parser


class _FirstComeSubparsers:
    """The sub-parsers action as a registering module sees it: a name already taken gets a
    detached parser, so a later registration of the same name changes nothing."""

    def __init__(self, sub) -> None:
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name in self._sub.choices:
            return argparse.ArgumentParser(prog=name, add_help=False)
        return self._sub.add_parser(name, **kwargs)


def _lazy(parser: argparse.ArgumentParser, module_name: str) -> None:
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.set_defaults(func=module.main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
