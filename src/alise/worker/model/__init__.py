"""The worker's model: loading a checkpoint or a preset, the forward pass over the paged KV
cache (the runner, the decoder, the families, the torch attention), CUDA graphs, the start-up
choice of kernels, sampling, the latency profiler, and the executor the engine calls. Torch
lives here and in ``alise.worker.kernels``, never in the serving mechanism above it."""
