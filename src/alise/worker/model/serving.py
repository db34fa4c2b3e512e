"""The model a worker serves, loaded: weights, KV cache sized to the memory budget, runner,
engine, latency profile and the identity its hello carries.

``alise.worker.service`` imports this only when it loads a model (a virtual worker over a
latency model never does), so the serving mechanism itself stays free of torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alise.core.latency_model import LatencyModel
from alise.modelinfo.identity import ModelIdentity, samples_fingerprint, weights_fingerprint
from alise.worker.config import WorkerConfig
from alise.worker.engine import WorkerEngine
from alise.worker.model.executor import make_worker_engine
from alise.worker.model.hf_runner import TransformersRunner
from alise.worker.model.kv_cache import KVCache, kv_cache_dtype
from alise.worker.model.loader import LoadedModel, load_model
from alise.worker.model.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    loaded: LoadedModel
    engine: WorkerEngine
    identity: ModelIdentity
    latency_model: LatencyModel | None
    #: The other ranks of a tensor-parallel replica (alise.worker.tp_ranks.RankGroup); None: one device.
    ranks: object | None = None

    def free_cached_memory(self) -> None:
        """Gives the device memory torch caches back (after a step that failed, out of memory say)."""
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()


def load_served_model(config: WorkerConfig) -> ServedModel:
    """Loads ``config.model`` on one device and builds the engine over it (blocking: seconds to
    minutes); over several ranks, ``alise.worker.model.tp_serving.load_tp_served_model``."""
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed,
                        max_model_len=config.max_model_len)
    num_blocks = size_kv_cache(loaded, config)
    runner_class = TransformersRunner if config.runner == "transformers" else ModelRunner
    runner = make_runner(loaded, config, num_blocks, runner_class)
    latency_model = load_latency_profile(runner, config)
    # The transformers runner keeps a cache per sequence, which cannot start from shared blocks.
    engine = make_worker_engine(runner, eos_token_id=loaded.eos_token_id, max_model_len=loaded.max_model_len,
                                num_host_blocks=config.num_host_blocks,
                                prefix_caching=config.enable_prefix_caching and runner_class is ModelRunner)
    served = ServedModel(loaded, engine, identity_of(loaded, config.block_size, kv_dtype(loaded, config)),
                         latency_model)
    logger.info("worker %s: %s on %s (%s), %d KV blocks of %d tokens in %s, %s runner", config.resolved_worker_id,
                loaded.name, loaded.device, loaded.dtype, num_blocks, config.block_size, kv_dtype(loaded, config),
                config.runner)
    return served


def make_runner(loaded: LoadedModel, config: WorkerConfig, num_blocks: int, runner_class: type = ModelRunner):
    """The runner of ``config`` over ``loaded``'s weights and ``num_blocks`` KV blocks."""
    # The paged runner's mixed-step graphs cover the serving loop's token budget.
    sizes = dict(max_num_tokens=config.token_budget, fast_kernels=None if config.fast_kernels else False,
                 plan_file=config.kernel_plan,
                 kv_cache_dtype=config.kv_cache_dtype) if runner_class is ModelRunner else {}
    return runner_class(loaded, num_blocks=num_blocks, block_size=config.block_size,
                        max_num_seqs=config.max_num_seqs, use_cuda_graphs=None if config.cuda_graphs else False,
                        **sizes)


def size_kv_cache(loaded: LoadedModel, config: WorkerConfig, block_bytes: int = 0) -> int:
    """Number of device blocks: as configured, else what the memory budget holds (blocks of
    ``block_bytes``; 0: the whole model's, as one device holds it)."""
    if config.num_device_blocks:
        return config.num_device_blocks
    if loaded.device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(loaded.device)
        # vLLM's meaning: the share is of the whole device, and what is in use now (the
        # weights, anything else on it) comes out of it.
        budget = int(total_bytes * config.gpu_memory_utilization) - (total_bytes - free_bytes)
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization {config.gpu_memory_utilization} leaves no room for the "
                             f"KV cache: {(total_bytes - free_bytes) / 2**30:.1f} GiB of the device's "
                             f"{total_bytes / 2**30:.1f} GiB are in use with the weights loaded")
    else:
        budget = config.kv_cache_bytes
    if block_bytes:
        blocks = max(0, budget // block_bytes)
    else:
        blocks = KVCache.num_blocks_for_budget(loaded.config, config.block_size, kv_dtype(loaded, config), budget)
    if blocks < 1:
        raise ValueError(f"not even one KV block fits in {budget} bytes")
    # More blocks than the context can address per sequence times the batch is waste.
    cap = -(-loaded.max_model_len // config.block_size) * config.max_num_seqs
    return min(blocks, cap)


def load_latency_profile(runner: ModelRunner, config: WorkerConfig) -> LatencyModel | None:
    """Measures (``profile_latency``) or loads (``latency_profile``) this worker's latency profile."""
    if config.profile_latency:
        from alise.worker.model.profiler import profile_runner, save_profile

        model = profile_runner(runner, max_num_seqs=config.max_num_seqs, command="alise worker --profile-latency")
        logger.info("latency profile measured: c0 %.3f ms, c_ctx %.3g s/token, c_pre %.3g s/token, "
                    "c_mixed %.3f ms, c_chunk %.3f ms (fit error mean %.1f%%, max %.1f%%)",
                    model.c0_s * 1e3, model.c_ctx_s, model.c_pre_s, model.c_mixed_s * 1e3, model.c_chunk_s * 1e3,
                    100 * model.meta["fit_mean_rel_error"], 100 * model.meta["fit_max_rel_error"])
        if config.latency_profile:
            save_profile(model, config.latency_profile)
            logger.info("latency profile written to %s", config.latency_profile)
        return model
    if config.latency_profile:
        return fit_kv_bytes(LatencyModel.load(config.latency_profile), runner)
    return None


def fit_kv_bytes(model: LatencyModel, runner: ModelRunner) -> LatencyModel:
    """``model`` for this runner's KV bytes per token: a profile measured with other pages (fp16
    pages, served with fp8 ones) has its per-context-token cost scaled by the ratio of the bytes
    (``LatencyModel.with_kv_bytes_ratio``); a profile that does not say its bytes is kept."""
    theirs = model.meta.get("kv_bytes_per_token")
    ours = KVCache.block_bytes(runner.config, 1, runner.kv_cache.dtype)
    if not theirs or theirs == ours:
        return model
    logger.info("latency profile measured at %d KV bytes a token, served at %d: c_ctx scaled by %.3g",
                theirs, ours, ours / theirs)
    scaled = model.with_kv_bytes_ratio(ours / theirs)
    scaled.meta["kv_bytes_per_token"] = ours
    return scaled


def kv_dtype(loaded: LoadedModel, config: WorkerConfig) -> torch.dtype:
    """The KV pages' dtype: the model's, or fp8 where ``kv_cache_dtype`` asks for it."""
    return kv_cache_dtype(config.kv_cache_dtype, loaded.dtype)


def identity_of(loaded: LoadedModel, block_size: int, kv_dtype: torch.dtype | None = None) -> ModelIdentity:
    """What the hello says of the model; ``block_bytes`` counts pages of ``kv_dtype`` (None: the model's)."""
    weights = (random_weights_fingerprint(loaded.model) if loaded.random_weights
               else weights_fingerprint(loaded.name))
    return ModelIdentity(loaded.name, str(loaded.device), loaded.config.vocab_size,
                         KVCache.block_bytes(loaded.config, block_size, kv_dtype or loaded.dtype), loaded.model_id,
                         weights)


def random_weights_fingerprint(model: torch.nn.Module, num_tensors: int = 4, num_values: int = 256) -> str:
    """Random weights (a preset's: they depend on its seed, device and dtype), by the bytes of
    the first ``num_values`` values of ``num_tensors`` matrices spread over the model."""
    matrices = sorted((name, t) for name, t in model.state_dict().items() if t.dim() >= 2)
    picks = [matrices[round(i * (len(matrices) - 1) / max(num_tensors - 1, 1))] for i in range(num_tensors)]
    return samples_fingerprint(
        (name, t.detach().flatten()[:num_values].cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for name, t in picks)
