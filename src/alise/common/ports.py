"""Ports the services listen on: free ones for ``0``, taken ones refused by name, and which
process owns a listening socket (so a stranger answering health never passes for ours).

Ownership is read from Linux's /proc (the listening socket's inode among a process's
descriptors); elsewhere it is unknown and only the port check before start-up guards.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from alise.common.grpc_server import split_host_port


class PortTaken(Exception):
    """A port the cluster needs is in use; the message names it and what holds it."""


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT, an IPv6 host without its brackets; ValueError otherwise."""
    host, port = split_host_port(address)
    return host.strip("[]"), port


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick); a caller that starts a service on it
    soon after wins in practice, and a lost race shows as that service failing to bind."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_port(address: str, port: int) -> str:
    host, _ = split_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(address: str) -> str:
    """``address`` with port 0 replaced by a free port; others unchanged."""
    host, port = split_address(address)
    return address if port else with_port(address, free_port(host))


def check_free(address: str, what: str) -> None:
    """Raises PortTaken when ``address`` cannot be bound now. The probe sets SO_REUSEADDR as
    gRPC does, so connections of a previous run still in TIME_WAIT do not count as taken."""
    host, port = split_address(address)
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise PortTaken(f"cannot listen on {address} for {what}: {exc.strerror}") from None
            holder = describe_pid(listener_pid(port))
            raise PortTaken(f"port {port} ({address}), for {what}, is already in use{holder}; stop "
                            f"that process or choose another port (0 = any free port)") from None


def _listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on ``port`` (any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def has_proc() -> bool:
    return os.path.exists("/proc/net/tcp")


def owns_listener(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on ``port``; None where /proc is
    not there to tell."""
    if not has_proc():
        return None
    return bool(_listening_inodes(port) & _socket_inodes(pid))


def listener_pid(port: int) -> int | None:
    """The process listening on ``port``, when /proc lets us see it (best effort)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _socket_inodes(int(entry)) & inodes:
            return int(entry)
    return None


def describe_pid(pid: int | None) -> str:
    """`` by pid N (its command line)`` or ``""``."""
    if pid is None:
        return ""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv if a)
    except OSError:
        return f" by pid {pid}"
    if len(command) > 120:
        command = command[:117] + "..."
    return f" by pid {pid} ({command})"
