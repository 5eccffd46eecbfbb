"""Magnitude pruning that keeps accuracy, and structured removal of dead units (NCSC 2.6).

Unstructured: over all weight tensors (Conv, MatMul, Gemm; TFLite CONV_2D, FULLY_CONNECTED) the
smallest-magnitude fraction is set to zero under one global threshold; zeros cost almost nothing
once the bundle payload is compressed.

Structured (ONNX, where the graph is a chain producer -> bias/ReLU/pool/flatten -> consumer):
units that cannot contribute (all incoming weights zero with a non-positive bias behind a ReLU,
or all outgoing weights zero) are cut out of both layers exactly; units never active on the
calibration data are cut too, which is exact on that data only -- the accuracy gate judges the
result. The model itself shrinks. :func:`search` finds the largest sparsity within the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
PASS_THROUGH = frozenset({"Relu", "MaxPool", "Flatten"})
LAYERS = frozenset({"Conv", "MatMul", "Gemm"})


@dataclass(frozen=True)
class PruneOutcome:
    data: bytes
    sparsity: float  # requested fraction of all prunable weights set to zero
    zero_fraction: float  # measured over all prunable weights
    units_removed: int
    parameters: int
    prunable: int = 0  # weights the pruner could reach; 0 means pruning did nothing


def fold_constant_weights(data: bytes) -> bytes:
    """Turn top-level ``Constant`` nodes holding a tensor into initializers of the same name.

    Some exporters (RapidOCR's PaddlePaddle models) keep every weight in ``Constant`` nodes,
    where neither the pruner nor onnxruntime's quantiser looks. The arithmetic is unchanged.
    """
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    keep, folded = [], []
    for node in graph.node:
        attrs = [a.name for a in node.attribute]
        if node.op_type == "Constant" and not node.domain and attrs == ["value"]:
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            folded.append(t)
        else:
            keep.append(node)
    if not folded:
        return data
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(folded)
    return model.SerializeToString()


def _magnitude_all(weights: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """One global magnitude threshold over every layer: small, sensitive layers (the first
    convolution) keep their weights while large redundant ones (dense layers) give up more."""
    if not weights or sparsity <= 0:
        return weights
    flat = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    k = int(flat.size * sparsity)
    if k == 0:
        return weights
    threshold = np.partition(flat, k - 1)[k - 1]
    return {n: np.where(np.abs(w) <= threshold, np.zeros_like(w), w) for n, w in weights.items()}


# --- ONNX --------------------------------------------------------------------------------


@dataclass
class _Chain:
    """Producer layer -> element-wise/pooling steps -> consumer layer, along one unit axis."""

    producer: Any
    bias: str | None  # initializer holding the producer's per-unit bias
    bias_node: Any | None
    relu: bool
    observe: str  # tensor whose activations tell whether a unit is ever alive
    consumer: Any


def _weights(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _weight_name(node: Any, inits: dict[str, np.ndarray]) -> str | None:
    if node.op_type not in LAYERS or len(node.input) < 2 or node.input[1] not in inits:
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gemm" and (
        attrs.get("transB") and attrs["transB"].i or attrs.get("transA") and attrs["transA"].i
    ):
        return None
    if node.op_type == "Conv" and attrs.get("group") and attrs["group"].i != 1:
        return None
    w = inits[node.input[1]]
    return node.input[1] if w.ndim in (2, 4) and w.dtype == np.float32 else None


def _chains(model: Any, inits: dict[str, np.ndarray]) -> list[_Chain]:
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    chains = []
    for p in graph.node:
        if _weight_name(p, inits) is None:
            continue
        bias = p.input[2] if len(p.input) > 2 and p.input[2] in inits else None
        bias_node, relu, t = None, False, p.output[0]
        observe = t
        while True:
            nxt = consumers.get(t, [])
            if len(nxt) != 1 or t in outputs:
                break
            n = nxt[0]
            if n.op_type == "Add" and bias is None and bias_node is None and n.input[1] in inits:
                bias, bias_node = n.input[1], n
            elif n.op_type not in PASS_THROUGH:
                break
            relu = relu or n.op_type == "Relu"
            t = n.output[0]
            if n.op_type == "Relu":
                observe = t
        nxt = consumers.get(t, [])
        if (
            len(nxt) == 1
            and t not in outputs
            and nxt[0].input[0] == t
            and _weight_name(nxt[0], inits)
        ):
            chains.append(_Chain(p, bias, bias_node, relu, observe, nxt[0]))
    return chains


def _units(p: Any, w: np.ndarray) -> int:
    return w.shape[0] if p.op_type == "Conv" else w.shape[1]


def _active_units(
    model: Any, chains: list[_Chain], calibration: np.ndarray
) -> dict[str, np.ndarray]:
    """Per chain, whether each unit is ever non-zero on the calibration data."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [c.observe for c in chains if c.relu]
    for name in names:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: calibration}
    values = session.run(names, feed)
    return {
        name: np.moveaxis(np.abs(v), 1, 0).reshape(v.shape[1], -1).max(axis=1) > 0
        for name, v in zip(names, values, strict=True)
    }


def _remove_units(model: Any, chains: list[_Chain], calibration: np.ndarray | None) -> int:
    """Cut dead units out of producer and consumer; returns how many units went."""
    from onnx import numpy_helper

    inits = _weights(model)
    active = _active_units(model, chains, calibration) if calibration is not None and chains else {}
    replaced: dict[str, np.ndarray] = {}
    removed = 0
    for c in chains:
        pw_name, cw_name = c.producer.input[1], c.consumer.input[1]
        # A layer is the consumer of one chain and the producer of the next: the two cuts are on
        # different axes, so each chain works on the arrays as the previous one left them.
        pw, cw = replaced.get(pw_name, inits[pw_name]), replaced.get(cw_name, inits[cw_name])
        units = _units(c.producer, pw)
        conv_in = c.consumer.op_type == "Conv"
        fan_in = cw.shape[1] if conv_in else cw.shape[0]
        if fan_in % units:
            continue
        block = fan_in // units  # a flattened feature map feeds block rows per channel
        incoming = (
            np.abs(pw).reshape(units, -1).max(axis=1)
            if c.producer.op_type == "Conv"
            else np.abs(pw).max(axis=0)
        )
        b = inits[c.bias].reshape(-1) if c.bias else np.zeros(units, np.float32)
        if b.size != units:
            continue
        out_rows = (
            np.abs(cw).max(axis=(0, 2, 3))
            if conv_in
            else np.abs(cw).reshape(units, block, -1).max(axis=(1, 2))
        )
        dead = (out_rows == 0) | ((incoming == 0) & ((b <= 0) if c.relu else (b == 0)))
        if c.observe in active:
            dead |= ~active[c.observe]
        keep = np.flatnonzero(~dead)
        if len(keep) in (0, units):
            continue
        removed += units - len(keep)
        replaced[pw_name] = pw[keep] if c.producer.op_type == "Conv" else pw[:, keep]
        if c.bias:
            bias = inits[c.bias]
            replaced[c.bias] = (
                bias.reshape(-1)[keep].reshape(*bias.shape[:-1], len(keep))
                if bias.ndim > 1
                else bias[keep]
            )
        rows = (keep[:, None] * block + np.arange(block)).ravel()
        replaced[cw_name] = cw[:, keep] if conv_in else cw[rows]
    for init in model.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(
                numpy_helper.from_array(np.ascontiguousarray(replaced[init.name]), init.name)
            )
    return removed


def prune_onnx(data: bytes, sparsity: float, calibration: np.ndarray | None) -> PruneOutcome:
    """Zero the smallest weights, then remove the units that became dead."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    inits = _weights(model)
    names = {n for node in model.graph.node if (n := _weight_name(node, inits))}
    pruned = _magnitude_all({n: inits[n] for n in names}, sparsity)
    for init in model.graph.initializer:
        if init.name in pruned:
            init.CopyFrom(numpy_helper.from_array(pruned[init.name], init.name))
    removed = _remove_units(model, _chains(model, _weights(model)), calibration)
    del model.graph.value_info[:]  # shapes changed; the runtime infers them again
    after = _weights(model)
    weights = [after[n] for n in names]
    zero = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.size for w in weights))
    params = sum(int(w.size) for w in after.values() if w.dtype.kind == "f")
    prunable = sum(int(inits[n].size) for n in names)
    return PruneOutcome(model.SerializeToString(), sparsity, zero, removed, params, prunable)


# --- TFLite ------------------------------------------------------------------------------


def prune_tflite(data: bytes, sparsity: float) -> PruneOutcome:
    """Zero the smallest float weights of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    from .tflite_util import read_tflite

    model = read_tflite(data)
    kinds = {
        s.BuiltinOperator.CONV_2D,
        s.BuiltinOperator.DEPTHWISE_CONV_2D,
        s.BuiltinOperator.FULLY_CONNECTED,
    }
    weights: dict[str, np.ndarray] = {}
    params = 0
    for sub in model.subgraphs:
        for op in sub.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) not in kinds or len(op.inputs) < 2:
                continue
            t = sub.tensors[op.inputs[1]]
            if t.type == s.TensorType.FLOAT32 and model.buffers[t.buffer].data is not None:
                raw = np.asarray(model.buffers[t.buffer].data, np.uint8).tobytes()
                weights[str(t.buffer)] = np.frombuffer(raw, np.float32)
        params += sum(
            len(model.buffers[t.buffer].data) // 4
            for t in sub.tensors
            if t.type == s.TensorType.FLOAT32 and model.buffers[t.buffer].data is not None
        )
    pruned = _magnitude_all(weights, sparsity)
    for key, w in pruned.items():
        model.buffers[int(key)].data = np.frombuffer(w.astype(np.float32).tobytes(), np.uint8)
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    total = sum(w.size for w in pruned.values())
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return PruneOutcome(out, sparsity, zeros / max(1, total), 0, params, int(total))


def prune(data: bytes, fmt: str, sparsity: float, calibration: np.ndarray | None) -> PruneOutcome:
    """Prune a model of format ``onnx`` or ``tflite`` to ``sparsity`` (0 <= s < 1)."""
    if fmt == "onnx":
        return prune_onnx(data, sparsity, calibration)
    return prune_tflite(data, sparsity)


def search(
    try_sparsity: Callable[[float], tuple[Any, bool]], grid: tuple[float, ...] = GRID
) -> tuple[float, Any] | None:
    """Binary search over ``grid`` for the largest sparsity whose result passes the gate.

    ``try_sparsity(s)`` builds the candidate (pruned and otherwise hardened as it will ship) and
    returns (candidate, within_bound). Accuracy falls with sparsity, so the search assumes that
    order; ``None`` when not even the smallest sparsity passes.
    """
    lo, hi, best = 0, len(grid) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate, ok = try_sparsity(grid[mid])
        if ok:
            best, lo = (grid[mid], candidate), mid + 1
        else:
            hi = mid - 1
    return best
