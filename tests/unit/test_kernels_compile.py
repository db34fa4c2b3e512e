"""Every Triton kernel of the worker compiles for the H200 (sm_90) without spilling, on a machine
with no GPU: ``bench/gpu/kernel_compile.py --quick`` (one launch configuration per kernel, fp16)
in a clean process (the interpreter tests of this session turn compilation off in theirs).

The full sweep (every configuration, fp16 and bf16) is the script without ``--quick``. Skipped
where Triton is missing (``pip install -e '.[kernels]'``); about half a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    result = subprocess.run([sys.executable, str(ROOT / "bench/gpu/kernel_compile.py"), "--quick", "--dtype", "fp16"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "21/21 kernels compiled" in result.stdout, result.stdout
