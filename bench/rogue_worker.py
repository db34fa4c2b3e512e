"""A process that pretends to be a worker, and the table of where it gets in.

As a rogue: it dials ADDRESS, says a convincing hello (the scheduler's own model id and
vocabulary, which anyone can compute from the public model), answers every plan, and collects
every prompt it is sent for SECONDS; it prints one JSON line: the status its stream ended
with and the prompts it received.

    python bench/rogue_worker.py ADDRESS --model-id ID --vocab-size N [--secret S] [--tls-ca PEM]

With ``--matrix`` it starts a scheduler of each configuration (in this process, loopback,
the embedded tiny-llama; then `alise up` as processes), queues a client's prompt while no
worker is connected, runs itself as a rogue against the client port and the worker port,
with no secret, a guessed one and (for contrast) the real one, and prints what each rogue
could read.

    python bench/rogue_worker.py --matrix
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from alise.v1 import worker_pb2, worker_pb2_grpc

SECRET = "the-real-internal-secret"
TOKEN = "a-client-api-token"
PROMPT = "a prompt only a real worker may read"


def hello(args) -> worker_pb2.WorkerMessage:
    return worker_pb2.WorkerMessage(hello=worker_pb2.WorkerHello(
        worker_id="rogue", model="rogue", device="cpu", block_size=16,
        num_device_blocks=4096, max_model_len=2048, vocab_size=args.vocab_size, block_bytes=1024,
        max_num_seqs=64, max_num_batched_tokens=4096, model_id=args.model_id))


async def listen(args) -> dict:
    metadata = (("x-alise-secret", args.secret),) if args.secret else ()
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.aio.secure_channel(args.address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.aio.insecure_channel(args.address)
    prompts: list[list[int]] = []
    code = "OK"
    async with channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(metadata=metadata, timeout=args.seconds)
        try:
            await call.write(hello(args))
            async for message in call:
                if message.WhichOneof("kind") != "plan":
                    continue
                plan = message.plan
                for command in plan.commands:
                    if command.WhichOneof("kind") == "admit":
                        prompts.append(list(command.admit.prompt_token_ids))
                await call.write(worker_pb2.WorkerMessage(report=worker_pb2.StepReport(step_id=plan.step_id)))
        except grpc.aio.AioRpcError:
            # The call's own status: a write racing the server's refusal fails first with a
            # client-side INTERNAL ("Internal error from Core").
            code = (await call.code()).name
    return {"code": code, "prompts": prompts}


# ----------------------------------------------------------------------------- the matrix

def make_certs(d: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server", "-keyout", "server.key",
            "-out", "server.csr")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key")}


def configurations(certs: dict[str, str]):
    from alise.common.security import SecurityConfig

    yield "loopback, no credential (warned)", dict(), None
    yield "0.0.0.0, no credential", dict(address="0.0.0.0:0"), None
    yield "API tokens, no internal secret", dict(security=SecurityConfig(api_tokens=(TOKEN,))), TOKEN
    yield "internal secret", dict(security=SecurityConfig(internal_secret=SECRET)), None
    yield "API tokens + internal secret", dict(security=SecurityConfig(internal_secret=SECRET,
                                                                       api_tokens=(TOKEN,))), TOKEN
    yield "mTLS on the worker listener", dict(security=SecurityConfig(
        tls_cert=certs["server.pem"], tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"])), None


async def run_rogue(address: str, info, *args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, address, "--model-id", info.model_id, "--vocab-size", str(info.vocab_size),
        "--seconds", "3", *args, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def one_configuration(overrides: dict, token: str | None, certs: dict[str, str]) -> list[tuple[str, str]]:
    from alise.client import AsyncClient
    from alise.scheduler.config import SchedulerConfig
    from alise.scheduler.service import start_scheduler

    try:
        config = SchedulerConfig(**{"address": "127.0.0.1:0", **overrides})
    except ValueError as exc:
        return [("(start)", f"refused to start: {str(exc)[:70]}...")]
    server = await start_scheduler(config)
    info = server.servicer.info
    tls = ["--tls-ca", certs["ca.pem"]] if config.security.uses_tls else []
    ports = {"client port": server.port, "worker port": getattr(server, "worker_port", server.port)}
    client = AsyncClient(f"127.0.0.1:{server.port}", token=token, tls_ca=certs["ca.pem"] if tls else None)
    waiting = asyncio.ensure_future(client.complete(PROMPT, max_tokens=2))
    for _ in range(500):
        if server.streams.num_live() or waiting.done():
            break
        await asyncio.sleep(0.02)
    rows = []
    if not server.streams.num_live():
        rows.append(("(a client)", "could not queue its prompt: " + (
            repr(waiting.exception())[:60] if waiting.done() and waiting.exception() else "no answer")))
    try:
        for listener, port in ports.items():
            for secret in ("", "guessed", SECRET):
                if secret == SECRET and not config.security.internal_secret:
                    continue
                result = await run_rogue(f"127.0.0.1:{port}", info, *tls, *(["--secret", secret] if secret else []))
                what = f"{listener}, {'the real' if secret == SECRET else secret or 'no'} secret"
                read = f"READ {len(result['prompts'])} PROMPT(S)" if result["prompts"] else "no prompt"
                rows.append((what, f"{result['code']}, {read}"))
    finally:
        waiting.cancel()
        await client.close()
        await server.stop(0.1)
    return rows


async def alise_up() -> list[tuple[str, str]]:
    """`alise up` (no predictor, no worker): the secret it makes for its cluster."""
    from alise.client import AsyncClient
    from alise.modelinfo.served import load_model_info
    from alise.tools.lab.upcluster import UpCluster

    up = await asyncio.to_thread(UpCluster, "--no-predictor", workers=0)
    info = await asyncio.to_thread(load_model_info, None)
    listen = up.state["services"]["scheduler"]["listen"]
    rows = []
    try:
        async with AsyncClient(up.address) as client:
            waiting = asyncio.ensure_future(client.complete(PROMPT, max_tokens=2))
            await asyncio.sleep(2.0)
            for listener, address in (("client port", listen["grpc"]), ("worker port", listen["workers"])):
                for secret in ("", "guessed"):
                    result = await run_rogue(address, info, *(["--secret", secret] if secret else []))
                    read = f"READ {len(result['prompts'])} PROMPT(S)" if result["prompts"] else "no prompt"
                    rows.append((f"{listener}, {secret or 'no'} secret", f"{result['code']}, {read}"))
            waiting.cancel()
    finally:
        await asyncio.to_thread(up.stop)
    return rows


async def matrix() -> None:
    certs = make_certs(Path(tempfile.mkdtemp(prefix="alise-rogue-")))
    print(f"{'configuration':<36}{'rogue dials':<34}outcome")
    rows = [(name, await one_configuration(overrides, token, certs))
            for name, overrides, token in configurations(certs)]
    rows.append(("alise up (a secret of its own)", await alise_up()))
    for name, outcomes in rows:
        for what, outcome in outcomes:
            print(f"{name:<36}{what:<34}{outcome}", flush=True)
            name = ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", nargs="?")
    p.add_argument("--matrix", action="store_true", help="run every configuration and print the table")
    p.add_argument("--model-id", default="")
    p.add_argument("--vocab-size", type=int, default=0)
    p.add_argument("--secret", default="")
    p.add_argument("--tls-ca", default="")
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    if args.matrix:
        import logging

        logging.basicConfig(level=logging.CRITICAL)
        asyncio.run(matrix())
        return
    print(json.dumps(asyncio.run(listen(args))), flush=True)


if __name__ == "__main__":
    main()
