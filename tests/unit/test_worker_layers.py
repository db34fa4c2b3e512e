"""The worker's serving mechanism (engine, step loop, KV manager, block allocator, service) is
free of torch: the model (alise.worker.model) and the kernels (alise.worker.kernels) sit under
it, and only a worker that loads a model imports them."""

import subprocess
import sys

import pytest

MECHANISM = ("alise.worker.engine", "alise.worker.step_loop", "alise.worker.kv_manager",
             "alise.worker.block_allocator", "alise.worker.config", "alise.worker.service")
BELOW = ("torch", "alise.worker.model", "alise.worker.kernels")


def imported_below(module: str) -> list[str]:
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted(m for m in sys.modules if m in {BELOW!r} or m.startswith({BELOW!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MECHANISM)
def test_the_serving_mechanism_imports_neither_torch_nor_the_model(module):
    assert imported_below(module) == []


def test_the_check_sees_the_model_where_it_is_imported():
    found = imported_below("alise.worker.model.sampler")
    assert "torch" in found and "alise.worker.model.sampler" in found
