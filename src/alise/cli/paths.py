"""Output paths checked when the command line is read, so a command never does its work (a
benchmark of minutes, a sweep) only to fail writing the result.

A path is writable when it is not a directory and either it exists and may be written, or its
nearest existing ancestor is a directory that may be written (the commands make the missing
directories between). Nothing is created here.
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
