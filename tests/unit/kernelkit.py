"""Shared set-up for the Triton kernel tests that run on the CPU under the Triton interpreter.

Importing this module turns the interpreter on (``TRITON_INTERPRET=1``) before any kernel module
is imported, but only where no CUDA device is present: on a GPU machine the same kernels are
checked compiled, in tests/gpu, and these tests skip. Without Triton installed
(``pip install -e '.[kernels]'``) they skip too.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter tests run where there is no GPU (tests/gpu checks the kernels there)",
                allow_module_level=True)


def _scalar_index_fix() -> None:
    """The interpreter holds scalars as one-element arrays and turns them into loop bounds with
    ``int(array)``, which numpy 2 refuses for arrays of one dimension (Triton 3.6). Re-set that
    one conversion after the interpreter's own patching (which it undoes in reverse order)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "alise_fixed", False):
        return

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.alise_fixed = True
    interpreter._patch_lang_tensor = patch


_scalar_index_fix()


def interpreted(module_name: str):
    """``module_name`` with its kernels built for the interpreter (re-imported if it was loaded
    earlier in this process without it)."""
    module = importlib.import_module(module_name)
    if not getattr(module, "INTERPRETED", True):
        module = importlib.reload(module)
    return module


from kernelcases import relative_error  # noqa: E402,F401  (one definition for both test trees)

#: ||out - ref|| / ||ref|| allowed against a float32 reference, by the kernel's dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
