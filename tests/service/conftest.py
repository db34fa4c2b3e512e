"""Service tests run real ``grpc.aio`` servers on each test's own event loop (a module's, for
module-scoped ones). A server still running when its loop closes outlives it: its finalizer
then fails ("Event loop is closed", "AioServer.shutdown was never awaited") wherever the
garbage collector happens to run, or hangs the interpreter at exit, far from the test that
leaked it. Every server made while these tests run is tracked; after each test's teardown,
one left running on a closed loop fails that test, with where the server was made."""

from __future__ import annotations

import traceback
import weakref

import grpc
import pytest

#: Every server made since the tests began (while it lives), with where it was made.
_servers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_make_server = grpc.aio.server


def _tracked_server(*args, **kwargs):
    server = _make_server(*args, **kwargs)
    _servers[server] = "".join(traceback.format_stack(limit=10)[:-1])
    return server


grpc.aio.server = _tracked_server


def _outlived_its_loop(server) -> bool:
    # NOTE: the Cython server under grpc.aio.Server and the loop it was made on: the state
    # that server's own finalizer reads.
    return server._loop.is_closed() and server._server.is_running()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's fixtures (the event loop's included, and a module's after its last
    test) are torn down."""
    result = yield
    leaked = [(server, where) for server, where in list(_servers.items()) if _outlived_its_loop(server)]
    for server, _ in leaked:
        del _servers[server]  # reported once, by the test that leaked it
    if leaked:
        pytest.fail(f"{len(leaked)} grpc.aio server(s) still running after their event loop closed, "
                    "made at:\n" + "\n".join(where for _, where in leaked), pytrace=False)
    return result
