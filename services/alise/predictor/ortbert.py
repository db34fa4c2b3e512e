"""ONNX Runtime backend of the int8 packed encoder: the model and quantization of
:class:`~alise.predictor.packed.PackedBert` with ``quantize=True``, run by ONNX Runtime.

Why: on a 2-core AVX2 machine the torch path spends much of a short prompt's time in per-op
dispatch (~200 small ops per forward, each costing microseconds from Python) and, for big
batches, in the passes around fbgemm's dynamic quantized linear (per-row scaling with a slow
``vector_norm``, the anchor row, the epilogue). Here the whole forward is one ONNX graph run in
C++, and MLAS's u8s8 GEMM does the Linear layers. Measured on AlpacaEval prompts, one thread
(bench/predictor_bench.py): one prompt 5-6 ms instead of 9-12 ms, 256 prompts 2.0 s instead
of 3.8 s of CPU; the GEMMs are now ~60 % of the time, running at ~65-80 GMAC/s a core (near
AVX2's int8 peak).

The same quantization as the torch path:

- weights: the torch path's own int8 weights (per output channel, symmetric), taken from its
  packed fbgemm parameters, so they do not even differ in rounding;
- activations: per *token* (row) ``x / max|x|``, then one fixed affine quantization of that
  [-1, 1] range (scale 2/127, zero point 64: what fbgemm derives from the torch path's anchor
  row), so values 0..128: 7 bits, which keeps AVX2's ``vpmaddubsw`` pair sums in int16 range
  (fbgemm's ``reduce_range`` for the same reason);
- the int32 products go back to float, times the row's and the channel's scale, plus bias.

Float rounding differs (summation order, fused kernels) and now and then flips an int8
rounding, so the vectors are close to the torch path's but not equal: on AlpacaEval's 805
prompts cosine 0.9991 mean, 0.986 worst; both are equally far from fp32 (0.995 mean). That
is below the duplicate threshold for a few prompts, so the encoder gives this backend its own
name (``...-int8-ort``) and a snapshot of one backend is refused by the other.

A prompt's vector does not depend on its batch-mates beyond float rounding in padded
attention, as on the torch path.

One graph run embeds one *attention group* (prompts sorted by length, packed into a
``(tokens, hidden)`` matrix for every Linear layer; padded to the group's longest prompt only
inside attention). :meth:`OrtBert.embed` plans the groups and runs them; it is thread-safe
(``InferenceSession.run`` is), so the encoder hands groups to several threads, each run
single-threaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

#: A group holds at most this many prompts ...
DEFAULT_GROUP_SIZE = 16
#: ... and at most this many padded attention slots beyond its real tokens (fraction).
MAX_GROUP_PADDING = 0.1

#: Fixed activation quantization of a row divided by its absolute maximum (see module doc).
_ACT_SCALE = 2.0 / 127.0
_ACT_ZERO_POINT = 64


def available() -> bool:
    """Whether onnxruntime and onnx are importable (the backend is optional)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def plan_groups(lengths: Sequence[int], max_size: int = DEFAULT_GROUP_SIZE,
                max_padding: float = MAX_GROUP_PADDING) -> list[list[int]]:
    """Indices of ``lengths`` in attention groups: sorted by length, consecutive, at most
    ``max_size`` each, and cut early where padding to the group's longest would exceed
    ``max_padding`` of its real tokens (the long tail of lengths gets small groups)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]  # the longest so far: sorted
        if current and (len(current) >= max_size
                        or n * (len(current) + 1) > (1 + max_padding) * (tokens + n)):
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        groups.append(current)
    return groups


def _graph(packed) -> bytes:
    """The serialized ONNX model of ``packed``'s forward for one attention group.

    Inputs: ``ids``/``positions`` (T,) int64 of the packed tokens; ``gather`` (B, L) int64,
    the packed row of each padded attention slot; ``valid`` (T,) int64, the flat padded slot
    of each packed row; ``mask`` (B, 1, 1, L) float, additive key mask; ``pool`` (B, T)
    float, mean-pooling weights. Output: ``pooled`` (B, hidden), not yet normalized.
    """
    from onnx import TensorProto, helper, numpy_helper

    hidden, heads = packed.hidden, packed.num_heads
    head_dim = hidden // heads
    nodes, inits = [], []
    counter = iter(range(10**9))

    def name(prefix: str) -> str:
        return f"{prefix}_{next(counter)}"

    def const(array: np.ndarray, prefix: str = "c") -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.array(array, order="C"), n))  # keeps 0-d as 0-d
        return n

    def node(op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def layer_norm(x: str, norm) -> str:
        weight, bias, eps = norm
        return node("LayerNormalization", [x, const(weight.numpy(), "ln_w"), const(bias.numpy(), "ln_b")],
                    axis=-1, epsilon=eps)

    act_scale = const(np.array(_ACT_SCALE, np.float32), "act_scale")
    act_zero = const(np.array(_ACT_ZERO_POINT, np.uint8), "act_zp")
    tiny = const(np.array(1e-12, np.float32), "tiny")

    def linear(x: str, lin) -> str:
        qweight = lin._gemm.weight()  # the torch path's int8 weights, (out, in)
        weight = qweight.int_repr().numpy().T  # (in, out) for MatMul
        w_scale = qweight.q_per_channel_scales().numpy().astype(np.float32)
        w_zero = qweight.q_per_channel_zero_points().numpy().astype(np.int8)
        row_max = node("Max", [node("ReduceMax", [node("Abs", [x])], axes=[1], keepdims=1), tiny])
        q = node("QuantizeLinear", [node("Div", [x, row_max]), act_scale, act_zero])
        y = node("MatMulIntegerToFloat", [q, const(weight, "w"), act_scale, const(w_scale, "w_scale"),
                                          act_zero, const(w_zero, "w_zp")], domain="com.microsoft")
        return node("Add", [node("Mul", [y, row_max]), const(lin._bias.numpy(), "bias")])

    word = packed._word.numpy()
    position = packed._position.numpy()
    token_type = packed._token_type.numpy()
    x = node("Add", [node("Add", [node("Gather", [const(word, "word"), "ids"], axis=0),
                                  node("Gather", [const(position, "pos"), "positions"], axis=0)]),
                     const(token_type, "type")])
    x = layer_norm(x, packed._emb_norm)
    qkv_shape = const(np.array([0, 0, 3, heads, head_dim], np.int64), "shape")
    flat_shape = const(np.array([-1, hidden], np.int64), "shape")
    scale = const(np.array(1.0 / math.sqrt(head_dim), np.float32), "scale")
    pick = [const(np.array(i, np.int64), "pick") for i in range(3)]
    for layer in packed._layers:
        qkv = linear(x, layer.qkv)  # (T, 3H)
        padded = node("Reshape", [node("Gather", [qkv, "gather"], axis=0), qkv_shape])  # (B, L, 3, h, d)
        qkv5 = node("Transpose", [padded], perm=[2, 0, 3, 1, 4])  # (3, B, h, L, d)
        q, k, v = (node("Gather", [qkv5, p], axis=0) for p in pick)
        scores = node("MatMul", [node("Mul", [q, scale]), node("Transpose", [k], perm=[0, 1, 3, 2])])
        probs = node("Softmax", [node("Add", [scores, "mask"])], axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # (B, L, h, d)
        context = node("Gather", [node("Reshape", [context, flat_shape]), "valid"], axis=0)  # (T, H)
        x = layer_norm(node("Add", [linear(context, layer.out), x]), layer.attn_norm)
        h = node("Gelu", [linear(x, layer.ffn_in)], domain="com.microsoft")
        x = layer_norm(node("Add", [linear(h, layer.ffn_out), x]), layer.ffn_norm)
    nodes.append(helper.make_node("MatMul", ["pool", x], ["pooled"], name="pooling"))

    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"]),
        helper.make_tensor_value_info("positions", TensorProto.INT64, ["T"]),
        helper.make_tensor_value_info("gather", TensorProto.INT64, ["B", "L"]),
        helper.make_tensor_value_info("valid", TensorProto.INT64, ["T"]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "L"]),
        helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["B", "T"]),
    ]
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", hidden])]
    graph = helper.make_graph(nodes, "packed_bert_int8", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def _feeds(token_ids: Sequence[Sequence[int]], group: list[int]) -> dict[str, np.ndarray]:
    """The graph's inputs for one group (indices into ``token_ids``, sorted by length)."""
    lengths = np.array([len(token_ids[i]) for i in group], np.int64)
    num_seqs, max_len, total = len(group), int(lengths.max()), int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    slots = np.arange(max_len)
    real = slots[None, :] < lengths[:, None]  # (B, L)
    gather = np.where(real, starts[:, None] + slots[None, :], 0)
    mask = np.where(real, 0.0, -np.inf).astype(np.float32).reshape(num_seqs, 1, 1, max_len)
    seq = np.repeat(np.arange(num_seqs), lengths)
    pool = np.zeros((num_seqs, total), np.float32)
    pool[seq, np.arange(total)] = (1.0 / lengths)[seq]
    return {
        "ids": np.fromiter((t for i in group for t in token_ids[i]), np.int64, total),
        "positions": np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
        "gather": gather.astype(np.int64),
        "valid": np.flatnonzero(real).astype(np.int64),
        "mask": mask,
        "pool": pool,
    }


class OrtBert:
    """Unit vectors from an int8 :class:`PackedBert`'s weights, computed by ONNX Runtime."""

    def __init__(self, packed, *, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        import onnxruntime as ort

        if not all(hasattr(layer.qkv, "_gemm") for layer in packed._layers):
            raise ValueError("OrtBert needs a PackedBert built with quantize=True")
        self.hidden = packed.hidden
        self.max_positions = len(packed._position)
        self.group_size = group_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # callers run groups in parallel threads instead
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(_graph(packed), options, providers=["CPUExecutionProvider"])

    def embed_group(self, token_ids: Sequence[Sequence[int]], group: list[int]) -> np.ndarray:
        """Unit vectors ``(len(group), hidden)`` for ``token_ids[i] for i in group``."""
        pooled = self._session.run(None, _feeds(token_ids, group))[0]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def embed(self, token_ids: Sequence[Sequence[int]],
              map_fn: Callable | None = None) -> np.ndarray:
        """Unit vectors ``(n, hidden)`` float32 for ``token_ids`` (with special tokens).
        ``map_fn`` (like ``ThreadPoolExecutor.map``) runs the groups; default: in order."""
        n = len(token_ids)
        if n == 0:
            return np.zeros((0, self.hidden), np.float32)
        lengths = [len(t) for t in token_ids]
        if min(lengths) < 1 or max(lengths) > self.max_positions:
            raise ValueError(f"token sequences must have 1..{self.max_positions} tokens")
        groups = plan_groups(lengths, self.group_size)
        # Longest groups first: with several threads, the short ones fill in at the end.
        groups.sort(key=lambda g: -sum(lengths[i] for i in g))
        run = lambda g: self.embed_group(token_ids, g)  # noqa: E731
        parts = list(map_fn(run, groups) if map_fn else map(run, groups))
        out = np.empty((n, self.hidden), np.float32)
        for group, part in zip(groups, parts, strict=True):
            out[group] = part
        return out
