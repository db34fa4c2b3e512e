"""Settings of the predictor service (read from flags/env only in the entrypoint).

Each field but ``estimator`` and ``security`` is a flag of `alise predictor serve`
(``alise.predictor.cli``), its ``#:`` comment the flag's help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from alise.common.security import SecurityConfig


@dataclass(frozen=True)
class EstimatorConfig:
    """Hyper-parameters (defaults tuned by 5-fold CV on AlpacaEval, 12 models)."""

    num_neighbors: int = 20
    knn_temperature: float = 0.05
    kernel_temperature: float = 0.5
    kernel_lambda: float = 1.0
    tfidf_lambda: float = 1.0
    deviation_lambda: float = 10.0
    #: Top cosine similarity below which neighbour features are ignored (heads only).
    head_threshold: float = 0.5
    max_head_samples: int = 4096
    #: Observations a model needs for its own stacker; fewer use the pooled one.
    min_model_observations: int = 30
    bucket_edges: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    #: Earlier answers of a conversation that weigh as much as the model's mean in its shift
    #: (``context.py``'s ``k``; inf = no shift); None: learned from the model's own
    #: conversations (:meth:`LengthEstimator.observe_context`).
    context_prior_turns: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_neighbors", "max_head_samples", "min_model_observations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("knn_temperature", "kernel_temperature", "kernel_lambda", "tfidf_lambda",
                     "deviation_lambda"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.context_prior_turns is not None and not self.context_prior_turns > 0:
            raise ValueError(f"context_prior_turns must be > 0 or None, got {self.context_prior_turns}")
        edges = self.bucket_edges
        if not edges or any(b <= a for a, b in pairwise(edges)) or edges[0] <= 0:
            raise ValueError(f"bucket_edges must be positive and increasing, got {edges}")


@dataclass(frozen=True)
class PredictorConfig:
    #: Listen address, HOST:PORT (port 0 = any free port).
    address: str = "127.0.0.1:50053"
    #: Directory of the persisted index, loaded and snapshotted (None: in memory only).
    index_dir: str | None = None
    #: sentence-transformers model directory (None: all-MiniLM-L6-v2, shipped by a package).
    encoder_path: str | None = None
    #: Hugging Face tokenizer directory of the served model, for counting output lengths of
    #: data files (None: the encoder's WordPiece tokenizer).
    tokenizer_path: str | None = None
    #: Dataset file loaded when the index is empty, a cold start (repeatable).
    bootstrap: tuple[str, ...] = ()
    #: Name of the served model: the target of predictions, and the model of observations
    #: that do not name one.
    model: str = "served"
    #: Seconds between background refits of the heads (when anything new was observed).
    refit_interval_s: float = 60.0
    #: New observations that trigger a refit before the interval is up.
    refit_after_observations: int = 256
    #: Seconds between periodic snapshots (when index_dir is set and anything changed); between
    #: them every observation is in the write-ahead log, so a kill loses none.
    snapshot_interval_s: float = 300.0
    #: How long a write-ahead log fsync waits for more observations to share it (ms).
    wal_sync_delay_ms: float = 10.0
    #: Predictions remembered for the Observe that names them (~1.6 kB each).
    max_pending_predictions: int = 32_768
    #: Observations one Observe stream may send per second (more are read more slowly: the
    #: stream's flow control holds the sender back).
    max_observations_per_s: float = 2000.0
    #: How long the first Predict of a batch waits for concurrent ones to join it. 0: none;
    #: requests that arrive while the encoder is busy still form the next batch, and a lone
    #: request does not wait.
    batch_window_ms: float = 0.0
    #: Most prompts encoded in one batch (more wait for the next batch).
    max_batch_prompts: int = 256
    #: Most prompts in one PredictRequest (more -> INVALID_ARGUMENT).
    max_prompts_per_request: int = 1024
    #: Index rows at which the exact index migrates to IVF.
    ivf_threshold: int = 50_000
    #: Encoder threads, parallel single-threaded shards of a batch (None: 2, or 1 on one core).
    num_threads: int | None = None
    #: Tokens the encoder sees of a prompt (None: the model's limit, 256 for MiniLM); longer
    #: prompts are truncated and listed in ``PredictResponse.truncated``.
    encoder_max_seq_length: int | None = None
    #: The encoder in int8, ONNX Runtime's dynamic quantization (off, --fp32: fp32,
    #: sentence-transformers' vectors); each names its vectors differently.
    encoder_int8: bool = True
    #: Transformer layers the encoder runs; the vector is the last one's mean (None: all but
    #: the last, which measured better for length; the model's depth gives
    #: sentence-transformers' own vectors). Each depth names its vectors.
    encoder_layers: int | None = None
    #: Seconds in-flight RPCs get to finish on shutdown.
    drain_grace_s: float = 5.0
    #: Serve Prometheus metrics over HTTP here ("" = none).
    metrics_address: str = ""
    #: The estimator's hyper-parameters.
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    #: Internal secret (callers must present it) and TLS on the listener. The predictor has no
    #: client API: API tokens do not apply to it.
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"address must look like HOST:PORT, got {self.address!r}")
        positive = ("refit_interval_s", "snapshot_interval_s", "drain_grace_s", "max_observations_per_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        at_least_one = ("refit_after_observations", "max_batch_prompts",
                        "max_prompts_per_request", "ivf_threshold", "max_pending_predictions")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_window_ms", "wal_sync_delay_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.encoder_max_seq_length is not None and self.encoder_max_seq_length < 3:
            raise ValueError(f"encoder_max_seq_length must be >= 3 or None, got {self.encoder_max_seq_length}")
        if self.encoder_layers is not None and self.encoder_layers < 1:
            raise ValueError(f"encoder_layers must be >= 1 or None, got {self.encoder_layers}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if not self.model:
            raise ValueError("model must not be empty")
        if isinstance(self.bootstrap, str):
            raise ValueError("bootstrap must be a tuple of paths, not a string")
