"""argparse types the commands share, so each rule is written once.

``output_path`` is checked when the command line is read, so a command never does its work (a
benchmark of minutes, a sweep) only to fail writing the result. A path is writable when it is
not a directory and either it exists and may be written, or its nearest existing ancestor is a
directory that may be written (the commands make the missing directories between). Nothing is
created here.
"""

from __future__ import annotations

import argparse
import os


def output_path(value: str) -> str:
    """argparse ``type`` for a file the command will write; ArgumentTypeError saying why not."""
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a directory: give a file path")
    if os.path.exists(value):
        if not os.access(value, os.W_OK):
            raise argparse.ArgumentTypeError(f"{value} cannot be written (permission denied)")
        return value
    ancestor = os.path.dirname(os.path.abspath(value))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise argparse.ArgumentTypeError(f"{value} cannot be written: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise argparse.ArgumentTypeError(f"{value} cannot be written: {ancestor} is not writable")
    return value


def positive_seconds(value: str) -> float:
    """argparse ``type`` for a deadline: a positive, finite number of seconds (0 would read as
    no deadline to gRPC's callers, a negative one fail every call at once)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return seconds
