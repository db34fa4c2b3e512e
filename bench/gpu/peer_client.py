"""vLLM's own benchmark client, `vllm bench serve`, run on vLLM's CPU platform.

    PYTHONPATH=/tmp/vllm-site python bench/gpu/peer_client.py bench serve --backend openai ...

The arguments are those of vLLM's command line (``vllm.entrypoints.cli.main``), unchanged. The
client sends HTTP requests and counts tokens; it runs no kernel. On a machine with a GPU,
vLLM's command line resolves the CUDA platform for it anyway, and that platform imports vLLM's
compiled kernels (``vllm._C_stable_libtorch``), so the client alone would need the 23 MB of
kernels that only vLLM's server uses. Pinning the client's process to the CPU platform (what
vLLM itself does for ``vllm bench`` where it finds no device) lets ALISE's runs carry vLLM's
Python files and dependencies without its kernels (bench/gpu/peer_vllm.sh), and both servers
meet the same client either way.
"""

from __future__ import annotations

import sys

# vLLM picks its platform while `import vllm` runs (its torch utilities ask whether pinned memory
# is available), and on a machine with a GPU, NVML makes that pick CUDA before anything below
# could pin another. With NVML hidden from this process no platform is detected there, as on a
# machine without a GPU, and the CPU platform is pinned before the command line runs.
sys.modules["vllm.third_party.pynvml"] = None  # type: ignore[assignment]

from vllm import platforms  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402


def main() -> int:
    platforms.current_platform = CpuPlatform()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
