"""The worker's Triton kernels (CUDA; under the Triton interpreter in the CPU tests): paged
decode attention, one unified launch for mixed steps, fused per-token layer ops and KV
quantization. Each has a torch reference in ``alise.worker.model`` that its tests compare with."""
