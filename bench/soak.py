"""Soak: the `chat` trace against `alise up` on this CPU while its services are killed and frozen.

    python bench/soak.py [--duration 600] [--fault-every 40] [--http] [--out soak.json]

Starts `alise up` (its defaults: the predictor, two tiny-llama workers with random weights,
every port a free one on loopback, an internal secret), sends the `chat` trace at ``--rate``
through the SDK, and every ``--fault-every`` seconds injects one fault, in turn (``FAULTS``):
SIGKILL of a worker, the predictor or the scheduler, which `alise up` restarts; SIGSTOP of a
worker or the scheduler, and SIGCONT ``--stop-for`` seconds later (`alise up` is told to leave
a stopped service alone that long, ``--hang-timeout``, so the thaw is what is tested). The
SDK resumes every stream a fault broke; requests sent while no scheduler answers wait for it
(``wait_for_ready``). Meanwhile, the whole time:

* requests cancelled at random moments (``--cancel-rate`` a second, each 0-3 s after it is
  sent), whose jobs must leave no trace on any worker;
* with ``--http``, the OpenAI door in front: every ``--fault-every`` seconds a burst of
  ``--sse-burst`` streamed completions whose clients close the connection mid-way, and with
  ``--huge-prompts N`` N text prompts of ``--huge-chars`` at once, none of which may be
  accepted (413 from its length; 400 from a door just restarted that has not learnt the
  model yet; no answer from a door that is down); with ``--idle-conns N``, N connections
  that send nothing held open to the door from 100 loopback addresses
  (alise.tools.lab.door_load);
* with ``--hangs``, two more faults in the turn: the HTTP door and the predictor stopped
  (SIGSTOP) and left so, until `alise up` finds them hung and restarts them.

Checked and printed:

* every request of the trace: its chunk indices contiguous from 0 and its token count what
  it asked for (zero lost requests, zero duplicated or missing tokens);
* every service back after each fault (serving again, two workers attached at the end);
* the views agree at the end: once the scheduler holds no job, every worker holds none and
  uses no KV block (its own metrics), and no census found a ghost, missing job or block
  deficit (status, per worker, since it last connected);
* the predictor's history: its observation count read just before each predictor kill and
  after the restart (nothing it had taken is lost), and at the end against the start plus
  one observation per completed request; those a killed scheduler held unacknowledged (for a
  predictor that was down or could not write its log; or taken, their answer lost) may be
  missing: read from its metrics just before the kill, with one more for each request whose
  client saw it finish between that read and the kill (a second on a loaded machine), and
  reported;
* resident memory of every process, its first sample ``--warmup`` seconds into its life
  against its last.

With ``--full-disk``, the state dir (the services' logs, the predictor's index and log, the
scheduler's state, the cluster file) is a file system of its own, a tmpfs of ``--disk-mb``
(mounting it needs root), and it is filled to its last byte for ``--full-for`` seconds around
every other fault (a service killed while the disk is full restarts on it). The cluster must
keep serving: the requests still complete meanwhile (counted), every service comes back, the
lines and state writes it could not write are counted (`alise up`'s cluster file), and the
predictor's history catches up once the disk has room.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import httpx

from alise.client import AliseError, AsyncClient
from alise.common.security import SECRET_HEADER
from alise.tools.lab.door_load import IdleConnections, huge_body, huge_prompt_burst
from alise.tools.lab.upcluster import UpCluster
from alise.tools.trace import build_trace, load_pairs, rescale, workload_path
from alise.v1 import predictor_pb2, predictor_pb2_grpc

#: (signal, service), in turn.
FAULTS = (("SIGKILL", "worker-0"), ("SIGSTOP", "worker-1"), ("SIGKILL", "predictor"), ("SIGSTOP", "scheduler"),
          ("SIGKILL", "scheduler"), ("SIGSTOP", "worker-0"), ("SIGKILL", "worker-1"), ("SIGKILL", "predictor"),
          ("SIGKILL", "scheduler"), ("SIGSTOP", "scheduler"))
#: With ``--hangs``, after those: stopped until `alise up` finds them hung and restarts them.
HANGS = (("HANG", "http"), ("HANG", "predictor"))


#: The file that fills the state dir's file system during a disk fault.
FILLER = "disk-filler"


def mount_tmpfs(path: Path, size_mb: int) -> None:
    """A tmpfs of ``size_mb`` at ``path``: filling it fills nothing else (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "alise-soak", str(path)],
                   check=True)


def fill(path: Path) -> int:
    """Writes ``path`` until its file system has no byte left; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            chunk = bytes(size)
            while True:
                try:
                    n = f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < size:
                    break
    return written


async def disk_faults(state_dir: Path, args, start: float, stop_at: float, events: list, tally: dict) -> None:
    """The state dir's file system full for ``--full-for`` seconds around every other fault
    (those at odd multiples of ``--fault-every``)."""
    for k in range(10_000):
        at = start + (2 * k + 1) * args.fault_every - args.full_for / 2
        if at + args.full_for > stop_at:
            break
        await asyncio.sleep(max(at - time.monotonic(), 0.0))
        completed = tally["complete"]
        filled = await asyncio.to_thread(fill, state_dir / FILLER)
        left = shutil.disk_usage(state_dir).free
        await asyncio.sleep(args.full_for)
        os.remove(state_dir / FILLER)
        fault = f"disk full ({filled / 2**20:.1f} MiB filled, {left} B left)"
        event = {"t_s": round(at - start, 1), "fault": fault, "serving_again_s": "-",
                 "full_for_s": args.full_for,
                 "completed_while_full": tally["complete"] - completed}
        events.append(event)
        print(f"  {event}", flush=True)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(up: UpCluster, name: str, old_pid: int | None, timeout_s: float = 120) -> float:
    """Seconds until ``name`` serves again, under a pid other than ``old_pid`` (None: any)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        s = up.services()[name]
        if s["state"] == "serving" and s["pid"] and s["pid"] != old_pid:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} did not come back within {timeout_s} s")


def history_observations(address: str, secret: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = predictor_pb2_grpc.PredictorServiceStub(channel).GetStats(
            predictor_pb2.GetStatsRequest(), timeout=10, metadata=((SECRET_HEADER, secret),))
    return stats.history_observations


def observations_buffered(metrics_address: str) -> int:
    """Observations a scheduler holds that the predictor has not taken (its own metrics)."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    found = re.search(r"^alise_scheduler_observations_buffered (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def worker_state(metrics_port: int) -> tuple[int, int]:
    """(jobs, device KV blocks in use) by a worker's own metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    jobs = sum(float(v) for v in re.findall(r'^alise_worker_jobs\{state="\w+"\} (\S+)$', text, re.M))
    used = re.search(r'^alise_worker_kv_blocks\{state="used"\} (\S+)$', text, re.M)
    return int(jobs), int(float(used.group(1)))


async def run_request(client: AsyncClient, req, max_tokens: int, tally: dict) -> None:
    tokens = expected_index = 0
    try:
        async for chunk in client.generate(req.prompt, max_tokens=max_tokens, ignore_eos=True,
                                           timeout_s=900, wait_for_ready=True):
            if chunk.index != expected_index:
                tally["index_errors"] += 1
            expected_index = chunk.index + len(chunk.token_ids)
            tokens += len(chunk.token_ids)
    except AliseError as exc:
        tally["errors"].append(f"{exc.code.name}: {exc.details[:200]}")
        return
    tally["complete" if tokens == max_tokens else "short"] += 1
    tally["finished_at"].append(time.monotonic())


#: After a kill, the seconds in which a finished request's last tokens, sent before it, may
#: still reach its client; no restarted scheduler serves that soon (`alise up` waits 1 s).
KILL_GRACE_S = 1.0


def observations_at_risk(buffered: int, finished_at: list[float], read_at: float, killed_at: float,
                         grace_s: float = KILL_GRACE_S) -> int:
    """Observations a scheduler killed at ``killed_at`` may take with it: those its metrics
    showed unacknowledged (read from ``read_at`` on), and one for each request of the trace its
    client saw finish from the read to ``grace_s`` after the kill (each finished meanwhile, its
    observation with the scheduler, and while the predictor cannot take it, as on a full disk,
    still held there). A request its scheduler finished but whose last tokens its client did
    not get resumes on the next scheduler, which observes it: not at risk."""
    return buffered + sum(read_at <= t <= killed_at + grace_s for t in finished_at)


async def inject(up: UpCluster, secret: str, sig: str, name: str, stop_for_s: float, tally: dict) -> dict:
    """One fault; returns its event once the service serves again."""
    services = up.services()
    pid = services[name]["pid"]
    predictor = services["predictor"]["listen"]["grpc"]
    before = await asyncio.to_thread(history_observations, predictor, secret) if name == "predictor" else None
    event = {"fault": f"{sig} {name} (pid {pid})"}
    buffered = None
    if sig == "SIGKILL" and name == "scheduler":
        # Observations in its memory the predictor has not acknowledged (it is down, or cannot
        # write its log, or took them and its answer was lost) go with it: at most these, and
        # those of the requests that finish before the kill (the read takes a second on a
        # loaded machine), are lost.
        read_at = time.monotonic()
        buffered = await asyncio.to_thread(observations_buffered, services[name]["listen"]["metrics"])
    if sig == "SIGKILL":
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        event["serving_again_s"] = round(await wait_serving(up, name, pid), 1)
        if buffered is not None:
            await asyncio.sleep(max(killed_at + KILL_GRACE_S - time.monotonic(), 0.0))
            event["observations_buffered"] = buffered
            event["observations_held"] = observations_at_risk(buffered, tally["finished_at"], read_at, killed_at)
    elif sig == "HANG":
        os.kill(pid, signal.SIGSTOP)
        event["serving_again_s"] = round(await wait_serving(up, name, pid), 1)
        try:
            os.kill(pid, signal.SIGCONT)
            event["fault"] += ": SIGSTOP, not restarted"
        except ProcessLookupError:
            event["fault"] += ": SIGSTOP, killed as hung"
    else:
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(stop_for_s)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            event["fault"] += ", killed by alise up while stopped"
        event["serving_again_s"] = round(stop_for_s + await wait_serving(up, name, None), 1)
    if before is not None:
        after = await asyncio.to_thread(history_observations, up.services()["predictor"]["listen"]["grpc"], secret)
        event["history_before_after"] = [before, after]
    return event


async def chaos(up: UpCluster, secret: str, args, start: float, stop_at: float, events: list,
                http_url: str | None, sse: dict, tally: dict) -> None:
    huge = huge_body(args.huge_chars) if args.huge_prompts else b""
    for k in range(10_000):
        at = start + (k + 1) * args.fault_every
        if at > stop_at:
            break
        await asyncio.sleep(max(at - time.monotonic(), 0.0))
        if http_url:
            asyncio.ensure_future(sse_burst(http_url, args.sse_burst, sse))
            if args.huge_prompts:
                asyncio.ensure_future(huge_prompt_burst(http_url, args.huge_prompts, huge, sse))
        faults = FAULTS + HANGS if args.hangs else FAULTS
        sig, name = faults[k % len(faults)]
        event = {"t_s": round(at - start, 1), **await inject(up, secret, sig, name, args.stop_for, tally)}
        events.append(event)
        print(f"  {event}", flush=True)


async def cancel_storm(client: AsyncClient, rate: float, stop_at: float, tally: dict) -> None:
    """Requests cancelled at random moments, 0-3 s after they are sent (none lives to finish:
    the predictor observes only what finishes)."""
    rng = random.Random(11)
    tasks = []

    async def one(i: int) -> None:
        async def read() -> None:
            async for _ in client.generate(f"cancelled {i} " * rng.randint(1, 30), max_tokens=1500,
                                           ignore_eos=True, wait_for_ready=True):
                pass
        task = asyncio.ensure_future(read())
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        tally["cancelled"] += 1

    i = 0
    while time.monotonic() < stop_at:
        tasks.append(asyncio.ensure_future(one(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)


async def sse_burst(base_url: str, n: int, sse: dict) -> None:
    """``n`` streamed completions through the door, each closed by its client after a few events.
    None lives to finish, as the predictor observes what finishes: with 200 tokens, one whose
    door relayed slowly (8,300 idle connections, huge prompts) finished before its client left."""
    rng = random.Random(len(sse.get("bursts", [])))

    async def one(http: httpx.AsyncClient, model: str) -> None:
        body = {"model": model, "prompt": "close me early", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        try:
            async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                seen, leave_after = 0, rng.randint(1, 8)
                async for line in response.aiter_lines():
                    seen += line.startswith("data:")
                    if seen >= leave_after:
                        sse["closed"] += 1
                        return  # closing the response drops the connection mid-stream
        except httpx.HTTPError as exc:
            sse["errors"].append(type(exc).__name__)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as http:
        try:
            model = (await http.get(f"{base_url}/v1/models")).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            sse["errors"].append(f"models: {type(exc).__name__}")
            return
        await asyncio.gather(*(one(http, model) for _ in range(n)))
    sse.setdefault("bursts", []).append(n)


async def sample_rss(up: UpCluster, start: float, end: float, samples: dict) -> None:
    while time.monotonic() < end:
        procs = {"alise up": up.proc.pid}
        procs.update({f"{n} (pid {s['pid']})": s["pid"] for n, s in up.services().items() if s["pid"]})
        for label, pid in procs.items():
            kib = rss_kib(pid)
            if kib:
                samples.setdefault(label, []).append((time.monotonic() - start, kib))
        await asyncio.sleep(5.0)


async def views_agree(client: AsyncClient, metrics_base: int, timeout_s: float = 60) -> dict:
    """Once the scheduler holds no job: each worker's jobs and KV blocks by its own metrics,
    and what the censuses found (status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = await client.status()
        if s.num_running + s.num_waiting + s.num_paused == 0:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # a census of each idle worker
    status = await client.status()
    workers = {}
    for w in status.workers:
        index = int(w["worker_id"].rsplit("-", 1)[1])
        jobs, used = await asyncio.to_thread(worker_state, metrics_base + 2 + index)
        workers[w["worker_id"]] = {
            "worker_jobs": jobs, "worker_blocks_used": used,
            "scheduler_blocks_used": w["num_device_blocks"] - w["num_free_device_blocks"],
            **{k: w[k] for k in ("num_censuses", "num_ghost_jobs", "num_missing_jobs", "num_block_deficits")}}
    return {"scheduler_jobs": status.num_running + status.num_waiting + status.num_paused, "workers": workers}


async def main_async(args) -> dict:
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="alise-soak-"))
    if args.full_disk:
        mount_tmpfs(root / "state", args.disk_mb)
    try:
        return await soak(root, args)
    finally:
        if args.full_disk:  # the logs outlive the file system they were on
            shutil.copytree(root / "state", root / "state-at-end", dirs_exist_ok=True)
            subprocess.run(["umount", "--lazy", str(root / "state")], check=False)


async def soak(root: Path, args) -> dict:
    secret = secrets.token_hex(16)
    metrics_base = free_port()
    http = ["--http-address", f"127.0.0.1:{free_port()}", "--http-health-address", f"127.0.0.1:{free_port()}"] \
        if args.http else ["--http-address", ""]
    up = await asyncio.to_thread(
        UpCluster, *http, "--policy", args.policy, "--max-num-seqs", "32", "--metrics-port", str(metrics_base),
        "--hang-timeout", str(args.hang_timeout), workers=2, state_dir=root / "state",
        env={**os.environ, "ALISE_INTERNAL_SECRET": secret})
    idle = None
    try:
        address = up.address
        http_url = f"http://{up.services()['http']['listen']['grpc']}" if args.http else None
        if http_url and args.idle_conns:
            idle = IdleConnections(int(http_url.rsplit(":", 1)[1]), args.idle_conns)
        predictor = up.services()["predictor"]["listen"]["grpc"]
        trace = rescale(build_trace(load_pairs(workload_path("chat")), num=args.num, rate=1.0, seed=3), args.rate)
        trace = [r for r in trace if r.arrival_s < args.duration - args.tail]
        tally = {"sent": 0, "complete": 0, "short": 0, "index_errors": 0, "errors": [], "cancelled": 0,
                 "finished_at": []}
        sse = {"closed": 0, "errors": []}
        events: list = []
        samples: dict = {}
        async with AsyncClient(address) as client:
            await client.complete("warm up", max_tokens=2, ignore_eos=True)
            await asyncio.sleep(2.0)
            history_start = history_observations(predictor, secret)
            start = time.monotonic()
            end = start + args.duration
            background = [asyncio.create_task(chaos(up, secret, args, start, end - args.tail, events, http_url, sse,
                                                    tally)),
                          asyncio.create_task(cancel_storm(client, args.cancel_rate, end - args.tail, tally)),
                          asyncio.create_task(sample_rss(up, start, end, samples))]
            if args.full_disk:
                background.insert(2, asyncio.create_task(
                    disk_faults(root / "state", args, start, end - args.tail, events, tally)))
            tasks = []
            for req in trace:
                await asyncio.sleep(max(start + req.arrival_s - time.monotonic(), 0.0))
                tally["sent"] += 1
                max_tokens = min(req.output_tokens, args.max_tokens)
                tasks.append(asyncio.create_task(run_request(client, req, max_tokens, tally)))
            await asyncio.gather(*tasks, *background[:-1])
            # Memory is sampled for the whole duration, traffic or not.
            await asyncio.sleep(max(end - time.monotonic(), 0.0))
            background[-1].cancel()
            views = await views_agree(client, metrics_base)
            status = await client.status()
        elapsed = time.monotonic() - start
        predictor = up.services()["predictor"]["listen"]["grpc"]
        deadline = time.monotonic() + 30
        held = sum(e.get("observations_held", 0) for e in events)
        expected_end = history_start + tally["complete"] + tally["short"]
        while (history_end := history_observations(predictor, secret)) < expected_end and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        services = {n: s["state"] for n, s in up.services().items()}
        cluster_file = json.loads((up.state_dir / "cluster.json").read_text())
        dropped = {n: s["log_lines_dropped"] for n, s in cluster_file["services"].items()}
        unwritten = {"state_writes_failed": cluster_file.get("state_writes_failed", 0),
                     "log_lines_dropped": dropped}
    finally:
        sse["idle_held"] = idle.stop() if idle is not None else []
        code = up.stop()
    rss = {}
    for label, points in samples.items():
        # Each process from ``--warmup`` seconds after its own first sample (a restarted one
        # is still loading its model at first).
        warm = [kib for t, kib in points if t >= points[0][0] + args.warmup]
        if len(warm) >= 2:
            rss[label] = {"samples": len(warm), "first_kib": warm[0], "last_kib": warm[-1],
                          "growth": round(warm[-1] / warm[0] - 1, 4)}
    history = [e["history_before_after"] for e in events if "history_before_after" in e]
    return {"duration_s": round(elapsed, 1), "requests": tally["sent"], "completed": tally["complete"],
            "short": tally["short"], "failed": len(tally["errors"]), "index_errors": tally["index_errors"],
            "errors": tally["errors"][:10], "cancelled": tally["cancelled"], "sse": sse, "faults": events,
            "views": views, "history_start": history_start, "history_end": history_end,
            "history_expected_end": expected_end, "observations_held": held, "history_around_predictor_kills": history,
            "services_at_end": services, "workers_at_end": sorted(w["worker_id"] for w in status.workers),
            "rss": rss, "unwritten": unwritten, "alise_up_exit_code": code, "rate": args.rate,
            "max_tokens": args.max_tokens, "dir": str(root)}


def views_ok(views: dict) -> bool:
    return views["scheduler_jobs"] == 0 and all(
        (w["worker_jobs"], w["worker_blocks_used"], w["scheduler_blocks_used"], w["num_ghost_jobs"],
         w["num_missing_jobs"], w["num_block_deficits"]) == (0, 0, 0, 0, 0, 0) for w in views["workers"].values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--tail", type=float, default=60.0, help="no new requests or faults in the last seconds")
    p.add_argument("--rate", type=float, default=0.5, help="requests of the trace per second")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=96, help="cap on a request's output tokens")
    p.add_argument("--policy", default="alise")
    p.add_argument("--fault-every", type=float, default=40.0)
    p.add_argument("--stop-for", type=float, default=8.0, help="seconds a SIGSTOPped service stays stopped")
    p.add_argument("--hang-timeout", type=float, default=30.0,
                   help="alise up's --hang-timeout: above --stop-for, so a stopped service is thawed, not killed")
    p.add_argument("--cancel-rate", type=float, default=1.0, help="cancelled requests per second")
    p.add_argument("--http", action="store_true", help="run the HTTP door and close SSE streams mid-way")
    p.add_argument("--sse-burst", type=int, default=50, help="SSE streams closed early per fault period")
    p.add_argument("--hangs", action="store_true",
                   help="also stop the HTTP door and the predictor until alise up restarts them as hung")
    p.add_argument("--idle-conns", type=int, default=0, help="idle connections held open to the HTTP door")
    p.add_argument("--huge-prompts", type=int, default=0, help="huge text prompts sent at once per fault period")
    p.add_argument("--huge-chars", type=int, default=3_900_000, help="characters of each huge prompt")
    p.add_argument("--full-disk", action="store_true",
                   help="the state dir on a tmpfs of its own, filled around every other fault (needs root)")
    p.add_argument("--disk-mb", type=int, default=64, help="size of that tmpfs")
    p.add_argument("--full-for", type=float, default=20.0, help="seconds the disk stays full each time")
    p.add_argument("--warmup", type=float, default=60.0)
    p.add_argument("--out-dir", default="", help="state, logs (default: a temporary directory)")
    p.add_argument("--out", default=None, help="the result as JSON")
    args = p.parse_args()
    if args.full_disk and os.geteuid() != 0:
        p.error("--full-disk mounts a tmpfs of its own to fill, which needs root")
    if args.full_disk and args.full_for >= args.fault_every:
        p.error("--full-for must be shorter than --fault-every")
    result = asyncio.run(main_async(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print_result(result, args)
    ok = (result["failed"] == 0 and result["short"] == 0 and result["index_errors"] == 0 and views_ok(result["views"])
          and result["history_expected_end"] - result["observations_held"] <= result["history_end"]
          <= result["history_expected_end"]
          and all(after >= before for before, after in result["history_around_predictor_kills"])
          and len(result["workers_at_end"]) == 2 and set(result["services_at_end"].values()) == {"serving"}
          and not any(status == "200" for _, status in result["sse"].get("huge", [])))
    print(f"\nsoak {result['duration_s']} s: {result['requests']} requests, {result['completed']} complete, "
          f"{result['short']} short, {result['failed']} failed, {result['index_errors']} index errors "
          f"(dup/missing tokens); {result['cancelled']} cancelled at random; {result['sse']['closed']} SSE streams "
          f"closed early; {len(result['faults'])} faults; views agree: {views_ok(result['views'])}; predictor history "
          f"{result['history_start']} -> {result['history_end']} (expected {result['history_expected_end']}, at "
          f"least {result['history_expected_end'] - result['observations_held']}: "
          f"{result['observations_held']} held by a scheduler when it was killed); "
          f"workers at end {result['workers_at_end']}; services {result['services_at_end']}; "
          f"alise up exit {result['alise_up_exit_code']}: {'OK' if ok else 'FAILED'}")
    for err in result["errors"]:
        print("  error:", err)
    return 0 if ok else 1


def print_result(result: dict, args) -> None:
    print(f"\n{'fault':<44}{'at s':>7}{'serving again s':>17}  predictor history before -> after")
    for e in sorted(result["faults"], key=lambda e: e["t_s"]):
        h = e.get("history_before_after")
        lost = (f"{e['observations_held']} observations held ({e['observations_buffered']} unacknowledged at "
                f"the read, the rest finished before the kill)" if "observations_held" in e else "")
        print(f"{e['fault']:<44}{e['t_s']:>7}{e['serving_again_s']:>17}  {f'{h[0]} -> {h[1]}' if h else lost}")
    print(f"\n{'worker at the end':<20}{'jobs':>6}{'blocks used':>13}{'sched. count':>14}{'censuses':>10}"
          f"{'ghosts':>8}{'missing':>9}{'deficits':>10}")
    for worker_id, w in result["views"]["workers"].items():
        print(f"{worker_id:<20}{w['worker_jobs']:>6}{w['worker_blocks_used']:>13}{w['scheduler_blocks_used']:>14}"
              f"{w['num_censuses']:>10}{w['num_ghost_jobs']:>8}{w['num_missing_jobs']:>9}{w['num_block_deficits']:>10}")
    print(f"\n{'process':<28}{'first KiB':>11}{'last KiB':>11}{'growth':>9}  ({args.warmup:g} s into each one's life)")
    for label, r in result["rss"].items():
        print(f"{label:<28}{r['first_kib']:>11}{r['last_kib']:>11}{r['growth']:>+9.1%}")
    huge, held = result["sse"].get("huge", []), result["sse"].get("idle_held", [])
    if huge:
        times = sorted(ms for ms, _ in huge)
        print(f"\n{len(huge)} huge prompts ({args.huge_chars:,} characters): answered in {times[0]:.0f}-"
              f"{times[-1]:.0f} ms (median {times[len(times) // 2]:.0f}); statuses "
              f"{dict(Counter(status for _, status in huge))}")
    if held:
        print(f"idle connections held open: mean {sum(held) / len(held):.0f}, max {max(held)} "
              f"(of {args.idle_conns}, the door closing those past its limits)")
    if args.full_disk:
        full = [e for e in result["faults"] if "completed_while_full" in e]
        print(f"\ndisk full {len(full)} times for {args.full_for:g} s: requests completed meanwhile "
              f"{[e['completed_while_full'] for e in full]}; writes `alise up` could not make: cluster file "
              f"{result['unwritten']['state_writes_failed']}, log lines "
              f"{result['unwritten']['log_lines_dropped']}")


if __name__ == "__main__":
    sys.exit(main())
