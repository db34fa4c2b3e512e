"""The `alise` command.

Client commands (generate, status, health) need only the SDK. Server commands (up,
scheduler, worker, predictor, trace, bench, sim) import the server packages when they run,
so the client commands start fast and work where torch is not installed; in the client-only
install (alise-client) they say which package to install instead. The tooling commands (trace,
sim, bench: ``alise.tools``) are imported only when one of them runs or the whole parser is
built (help, tests), so a service started by this command never imports tooling.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from alise.cli.arguments import positive_seconds
from alise.client import DEFAULT_ADDRESS, AliseError, Client

#: sub-command -> module providing add_arguments(parser) and main(args) -> int
SERVER_COMMANDS = {
    "up": ("alise.cluster.main", "start the local cluster (predictor, scheduler, workers) and stay in the foreground"),
    "scheduler": ("alise.scheduler.main", "run the scheduler service"),
    "worker": ("alise.worker.main", "run one worker (a model replica) that dials the scheduler"),
    "http": ("alise.http.main", "run the OpenAI-compatible HTTP door in front of the scheduler"),
}
#: sub-commands that need only the SDK (all that the client-only install has)
CLIENT_COMMANDS = ("generate", "status", "health")
#: sub-commands that register their own sub-parsers: module providing register(subparsers)
REGISTERED = ["alise.predictor.cli"]
#: tooling module providing register(subparsers) -> {its sub-command: help}
TOOL_COMMANDS = {
    "alise.tools.sim.cli": {"trace": "build a request trace (prompts, lengths, arrivals) as JSONL",
                            "sim": "simulate policies over request rates (discrete-event, virtual time)"},
    "alise.tools.bench.cli": {"bench": "replay a trace open-loop against a server (gRPC or OpenAI HTTP), "
                                       "or compare saved runs (--compare)"},
}


def _client_options(p: argparse.ArgumentParser, address: str) -> None:
    """--address, --token, --tls-ca: how every client command reaches a server."""
    p.add_argument("--address", default=address,
                   help="HOST:PORT of the scheduler (env ALISE_ADDRESS; default %(default)s)")
    p.add_argument("--token", default=os.environ.get("ALISE_TOKEN"),
                   help="bearer token, when the server requires one (env ALISE_TOKEN; default: none)")
    p.add_argument("--tls-ca", default=os.environ.get("ALISE_TLS_CA"),
                   help="CA certificate (PEM) of a TLS server (env ALISE_TLS_CA; default: plaintext)")


def _fail(exc: Exception) -> int:
    """Prints a failed call or a bad address in one line; exit 2 for a usage error."""
    print(f"alise: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ValueError) else 1


def _logit_bias(text: str) -> tuple[int, float]:
    """``--logit-bias TOKEN_ID=BIAS``."""
    token_id, _, bias = text.partition("=")
    try:
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                  timeout_s=args.timeout, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                  min_tokens=args.min_tokens, logit_bias=dict(args.logit_bias))
    last = None
    try:
        with Client(args.address, token=args.token, tls_ca=args.tls_ca) as client:
            for chunk in client.generate(args.prompt, **kwargs):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except (AliseError, ValueError) as exc:
        if last is not None:
            sys.stdout.write("\n")
        return _fail(exc)
    except KeyboardInterrupt:
        print("\nalise: cancelled", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    if last is not None and last.usage is not None and not args.quiet:
        u = last.usage
        noun = "token" if u.completion_tokens == 1 else "tokens"
        print(f"[{u.completion_tokens} {noun}, finish={last.finish_reason}, ttft={u.ttft_s * 1e3:.0f} ms, "
              f"total={u.e2e_s:.2f} s]", file=sys.stderr)
    return 0


def _local_cluster(state_dir: str, address: str) -> dict | None:
    """What `alise up` wrote to STATE_DIR/cluster.json, if that cluster is alive and serves
    ``address``."""
    try:
        with open(os.path.join(state_dir, "cluster.json"), encoding="utf-8") as f:
            cluster = json.load(f)
        os.kill(int(cluster["supervisor_pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    local = ("127.0.0.1", "localhost", "0.0.0.0", "[::1]", "[::]")
    host, _, port = address.rpartition(":")
    c_host, _, c_port = str(cluster.get("address", "")).rpartition(":")
    same = port == c_port and (host == c_host or (host in local and c_host in local))
    return cluster if same else None


def _print_local_cluster(cluster: dict) -> None:
    rotation = f" ({cluster['log_rotation']})" if cluster.get("log_rotation") else ""
    print(f"local cluster: `alise up` pid {cluster['supervisor_pid']}, logs in {cluster.get('log_dir')}{rotation}")
    if cluster.get("served_model_name"):
        print(f"served model name: {cluster['served_model_name']}")
    for name, svc in cluster.get("services", {}).items():
        # The door's own address speaks HTTP; every other service's, gRPC.
        listen = "  ".join(f"{'http' if name == 'http' and kind == 'grpc' else kind} {addr}"
                           for kind, addr in svc.get("listen", {}).items())
        pid = svc.get("pid") or "-"
        last = f", last exit: {svc['last_exit']}" if svc.get("last_exit") else ""
        print(f"  {name:<12} {svc.get('state', '?'):<13} pid {pid:<8} {listen}  "
              f"restarts {svc.get('restarts', 0)}{last}")
        if svc.get("log_lines_dropped"):
            print(f"  {'':<12} log: {svc['log_lines_dropped']} lines dropped ({svc.get('log_error')})")
    if cluster.get("state_writes_failed"):
        print(f"cluster file: {cluster['state_writes_failed']} writes failed ({cluster.get('state_write_error')}); "
              f"this is what it last held")


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.address, token=args.token, tls_ca=args.tls_ca) as client:
            status = client.status()
    except (AliseError, ValueError) as exc:
        return _fail(exc)
    cluster = _local_cluster(args.state_dir, args.address)
    if args.json:
        print(json.dumps({**status.__dict__, "local_cluster": cluster}, indent=2))
        return 0
    print(f"policy {status.policy}   up {status.uptime_s:.0f} s   predictor: {status.predictor_state}")
    print(f"queue: {status.num_waiting} waiting, {status.num_running} running, {status.num_paused} paused, "
          f"{status.num_finished} finished, {status.num_preemptions} preemptions {status.preemptions_by_action}")
    if not status.workers:
        print("workers: none connected")
    for w in status.workers:
        ranks = f" (TP {w['tensor_parallel_size']})" if w.get("tensor_parallel_size", 1) > 1 else ""
        print(f"worker {w['worker_id']}: {w['model']} on {w['device']}{ranks}  "
              f"device blocks {w['num_free_device_blocks']}/{w['num_device_blocks']} free "
              f"(x{w['block_size']} tokens), host {w['num_free_host_blocks']}/{w['num_host_blocks']}  "
              f"running {w['num_running']} paused {w['num_paused']}  last step {w['last_step_ms']:.1f} ms")
        if w.get("num_ghost_jobs") or w.get("num_missing_jobs") or w.get("num_block_deficits"):
            print(f"  its censuses disagreed: {w['num_ghost_jobs']} jobs it held unknown to the scheduler "
                  f"(aborted), {w['num_missing_jobs']} jobs it had lost (recomputed), "
                  f"{w['num_block_deficits']} times more KV blocks in use than planned")
    if cluster is not None:
        _print_local_cluster(cluster)
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service at ADDRESS reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from alise.client._convert import bearer_metadata
    from alise.client.channel import check_address, make_channel

    address = args.address or args.address_option
    try:
        metadata = bearer_metadata(args.token)
        with make_channel(check_address(address), tls_ca=args.tls_ca) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout,
                metadata=metadata)
    except ValueError as exc:
        return _fail(exc)
    except grpc.RpcError as exc:
        details = (exc.details() or "").lower()
        unavailable = f"nothing answers at {address}: is the service running?"
        if "http1.x" in details or "failed parsing http/2" in details:
            unavailable = (f"{address} answers HTTP/1, not gRPC (the HTTP door? its grpc.health.v1 is on "
                           "--http-health-address, and GET /health answers on its own port)")
        hint = {grpc.StatusCode.UNAVAILABLE: unavailable,
                grpc.StatusCode.NOT_FOUND: f"no health status for service {args.service!r} there",
                grpc.StatusCode.UNIMPLEMENTED: f"{address} serves no grpc.health.v1"}.get(exc.code(), "")
        print(f"alise: {address}: {exc.code().name} {hint}".rstrip(), file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already speaks of it or there is none to
    show (an unset value, an on/off switch, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                   or action.default in ([], ()))
        if nothing or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub-)parser of the CLI, nested ones included, shows defaults in its help, and
    an argument none of them knows is refused by the command that got it (``alise up:
    error: unrecognized arguments``, with its usage), not by ``alise``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        # The innermost sub-command parses first; its namespace is copied into its parent's.
        if not hasattr(namespace, "_command_parser"):
            namespace._command_parser = self
        return namespace, extra

    def parse_args(self, args=None, namespace=None):
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            namespace._command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        del namespace._command_parser
        return namespace


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; given the sub-command about to run, the tooling commands other than it
    are listed by name only (their modules not imported)."""
    parser = _Parser(prog="alise", description="ALISE: LLM serving scheduled by predicted job length")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    address = os.environ.get("ALISE_ADDRESS", DEFAULT_ADDRESS)

    g = sub.add_parser("generate", help="stream a generation to the terminal")
    g.add_argument("prompt", help="the prompt text")
    _client_options(g, address)
    g.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: the scheduler's --default-max-tokens)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 = greedy (default: the server's, 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="minus this on the logit of each token already in the output, in [-2, 2] (default: 0.0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="minus this times each token's count in the output, in [-2, 2] (default: 0.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="vLLM's: > 1 discourages tokens of the prompt and output, < 1 favours them (default: 1.0)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="no stop token or end-of-sequence before this many tokens (default: 0)")
    g.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS in [-100, 100] to a token's logit (repeatable)")
    g.add_argument("--timeout", type=positive_seconds, default=None, help="deadline in seconds (default: none)")
    g.add_argument("--quiet", action="store_true", help="no usage line after the text")
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("status", help="workers, queue and memory of a running cluster")
    _client_options(s, address)
    s.add_argument("--state-dir", default=os.environ.get("ALISE_STATE_DIR", ".alise"),
                   help="where `alise up` keeps its cluster file: its services, pids and ports are "
                        "shown when it serves --address (env ALISE_STATE_DIR; default %(default)s)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=_cmd_status)

    h = sub.add_parser("health", help="check a service's grpc.health.v1 status (exit 0 if SERVING)")
    h.add_argument("address", nargs="?", default=None,
                   help="HOST:PORT of any ALISE service: scheduler, predictor, a worker's health port "
                        "(default: --address)")
    h.add_argument("--address", dest="address_option", default=address,
                   help="the same, as the other commands take it (env ALISE_ADDRESS; default: the "
                        "scheduler, %(default)s)")
    h.add_argument("--service", default="", help="health service name (default: '', the whole server)")
    h.add_argument("--timeout", type=positive_seconds, default=3.0, help="seconds to wait for the answer")
    h.add_argument("--token", default=os.environ.get("ALISE_TOKEN"),
                   help="bearer token sent along (env ALISE_TOKEN; default: none)")
    h.add_argument("--tls-ca", default=os.environ.get("ALISE_TLS_CA"),
                   help="CA certificate (PEM) of a TLS server (env ALISE_TLS_CA; default: plaintext)")
    h.set_defaults(func=_cmd_health)

    for name, (module, help_text) in SERVER_COMMANDS.items():
        _server_command(sub, name, module, help_text)
    for module in REGISTERED:
        _register(sub, module)
    for module, commands in TOOL_COMMANDS.items():
        if command is None or command in commands:
            _register(sub, module)
        else:
            for name, help_text in commands.items():
                sub.add_parser(name, help=help_text)
    return parser


def _register(sub, module: str) -> None:
    try:
        importlib.import_module(module).register(sub)
    except ModuleNotFoundError as exc:
        if not _is_server_part(exc):
            raise


def _is_server_part(exc: ModuleNotFoundError) -> bool:
    """Whether the module that is missing is ALISE's server side (absent from alise-client)."""
    name = exc.name or ""
    return name.startswith("alise.") and name.split(".")[1] not in ("client", "cli", "v1")


SERVER_MISSING = ("`alise {command}` is not among the commands of this client-only install (alise-client: "
                  "generate, status, health); the server's commands (up, scheduler, worker, predictor, "
                  "...) need the server package: pip install '.[server]' from a checkout of ALISE (or "
                  "scripts/bootstrap.sh server)")


def _server_command(sub, name: str, module_name: str, help_text: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _is_server_part(exc):
            raise
        sub.add_parser(name, help=f"{help_text} (needs the server install)")  # main() refuses it
        return
    p = sub.add_parser(name, help=help_text)
    module.add_arguments(p)
    p.set_defaults(func=module.main)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    if argv and not argv[0].startswith("-") and argv[0] not in CLIENT_COMMANDS and not _has_server():
        print(f"alise: {SERVER_MISSING.format(command=argv[0])}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # Whoever read stdout went away (`alise generate ... | head`): nothing is left to say.
        # stdout goes to /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _has_server() -> bool:
    return importlib.util.find_spec("alise.common") is not None


if __name__ == "__main__":
    sys.exit(main())
