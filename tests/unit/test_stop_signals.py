"""A service's stop signals are handled from before it starts: a SIGTERM that comes while it
starts, or between its "listening" line and its wait, asks for the drain (exit 0 after it)
instead of killing the process with the signal's default action."""

from __future__ import annotations

import asyncio
import os
import signal

from alise.common.grpc_server import run_until_signal, stop_on_signals


async def test_a_sigterm_during_the_start_is_kept_for_the_wait():
    stop = stop_on_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # the service is still starting: nothing waits yet
    await asyncio.sleep(0.05)
    drained = []

    async def drain() -> None:
        drained.append(True)

    await asyncio.wait_for(run_until_signal(drain, stop), timeout=5)
    assert drained == [True]
