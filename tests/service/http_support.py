"""A live cluster (scheduler + one real worker) with the HTTP door in front, in a background
thread's event loop, so tests can use blocking clients (the openai package, httpx) as well as
async ones, exactly as a user's process would."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cluster_fixtures import InProcessCluster, cluster

from alise.client import Client
from alise.http.config import HttpConfig
from alise.http.server import HttpServer, start_http

#: A chat template in the style of the instruction-tuned checkpoints (Zephyr's), with a switch
#: of its own (Qwen3's ``enable_thinking``) that requests set through chat_template_kwargs.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
                 "{% if enable_thinking is defined and not enable_thinking %}<think></think>\n{% endif %}")


def with_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of ``model_dir`` whose tokenizer carries ``CHAT_TEMPLATE``."""
    import shutil

    shutil.copytree(model_dir, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return out


@dataclass
class LiveDoor:
    cluster: InProcessCluster
    http: HttpServer
    loop: asyncio.AbstractEventLoop
    job_log: Path

    @property
    def base_url(self) -> str:
        return self.http.base_url

    @property
    def address(self) -> str:
        return self.cluster.address

    def run(self, coro, timeout_s: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def jobs(self) -> list[dict]:
        return [json.loads(line) for line in self.job_log.read_text().splitlines() if line.strip()]

    def wait_idle(self, timeout_s: float = 30.0):
        """Blocks until no job runs and every KV block of the worker is free; returns the status."""
        deadline = time.monotonic() + timeout_s
        with Client(self.address) as client:
            while True:
                status = client.status()
                w = status.workers[0]
                if status.num_running + status.num_waiting + status.num_paused == 0 and \
                        w["num_free_device_blocks"] == w["num_device_blocks"]:
                    return status
                if time.monotonic() > deadline:
                    raise AssertionError(f"not idle after {timeout_s} s: {status}")
                time.sleep(0.02)

    def assert_serving(self) -> None:
        """The door and the cluster answer a good request and hold no memory afterwards."""
        reply = httpx.post(f"{self.base_url}/v1/completions", timeout=60,
                           json={"prompt": "after the storm", "max_tokens": 3, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        self.wait_idle()


def start_live_door(model: str, job_log: Path, scheduler_overrides: dict | None = None, **http_overrides):
    """Starts the cluster and the door in a thread; returns (LiveDoor, stop)."""
    ready = threading.Event()
    state: dict = {}

    def run():
        async def main():
            async with cluster(model, max_model_len=256, job_log=str(job_log),
                               worker_overrides={"max_model_len": 256, "block_size": 8},
                               **(scheduler_overrides or {})) as c:
                config = HttpConfig(address="127.0.0.1:0", scheduler_address=c.address, **http_overrides)
                http = await start_http(config)
                state["live"] = LiveDoor(c, http, asyncio.get_running_loop(), job_log)
                state["stop"] = asyncio.Event()
                ready.set()
                await state["stop"].wait()
                await http.stop(1.0)
        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120), "the live door did not start"

    def stop():
        state["live"].loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)

    return state["live"], stop
