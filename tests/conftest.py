import os
import resource
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, asked of the driver's device files rather than torch:
    a test that needs no torch does not import it."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    return not hidden and any(Path("/dev").glob("nvidia[0-9]*"))


# Without a GPU, the worker's Triton kernels are tested under the Triton interpreter; it must be
# on before anything imports triton, or triton's own helper functions are built for compilation
# and the interpreted kernels cannot call them.
if not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tinymodels import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    from tinymodels import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-opt"), "opt")


@pytest.fixture()
def file_size_limit():
    """Sets this process's file size limit (RLIMIT_FSIZE): writes past it fail as on a full
    disk (EFBIG), one that straddles it is cut short. Restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
    yield lambda limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)
