"""``edgeward pack --learnable DATA.npz``: mark a model's final linear layer for local learning
on the board (``docs/learning.md``) and seal the learning policy with it.

The marking adds the tensor that feeds the final linear layer as one more model output (the
board refits the layer on it, in numpy) and records, in the sealed policy, the layer's weight and
bias initializers (the board overrides them from memory when it creates the session), the
publisher's own weights, the gate set, the canaries (their expected answers are the model's own)
and the replay set. The clear bundle header says nothing of any of it.

Supported: float ONNX models whose class scores come from ``MatMul`` + ``Add`` (or ``Gemm``)
with initializer weights, optionally followed by ``Softmax`` and ``Identity``. Refused with a
message: TFLite models, quantised models (integer or quantise/dequantise weights), and any other
shape of head.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from device_agent.errors import UsageError
from device_agent.learning.policy import BOUNDS, LEARNING_SCHEMA, encode_array
from device_agent.runtime.runners import OnnxRunner
from device_agent.service.detect import features

from .modelfile import ModelFile

DATA_ARRAYS = ("gate_x", "gate_y", "replay_x")  # canary_x is optional (default: the first 20 of gate_x)
_QUANTISED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger", "QLinearConv",
                  "ConvInteger", "DynamicQuantizeLinear"}


def read_data(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in DATA_ARRAYS if k not in z.files]
            if missing:
                raise UsageError(f"--learnable {path}: missing arrays {', '.join(missing)} "
                                 f"(need {', '.join(DATA_ARRAYS)}, optionally canary_x)")
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"--learnable {path}: need an .npz with {', '.join(DATA_ARRAYS)}: {e}") from e


def _find_head(graph: Any, output_name: str) -> tuple[Any, str, str, str, str]:
    """(the node making the head's output, weight name, bias name, features tensor, what follows)."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    name, after = output_name, []
    for _ in range(4):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("Identity", "Softmax"):
            after.append(node.op_type)
            name = node.input[0]
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if any(attrs[k].i for k in ("transA", "transB") if k in attrs) or any(
                    attrs[k].f != 1.0 for k in ("alpha", "beta") if k in attrs) or len(node.input) < 3:
                break
            if node.input[1] in inits and node.input[2] in inits:
                return node, node.input[1], node.input[2], node.input[0], "+".join(after)
            break
        if node.op_type == "Add":
            bias = next((i for i in node.input if i in inits), None)
            other = next((i for i in node.input if i != bias), None)
            mm = producers.get(other or "")
            if bias and mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits:
                return node, mm.input[1], bias, mm.input[0], "+".join(after)
        break
    raise UsageError(
        "--learnable: the model's scores do not come from a final linear layer EdgeWard can refit "
        "(MatMul+Add or Gemm with initializer weights, then optionally Softmax): not learnable on the board"
    )


def mark(model: ModelFile, task: dict[str, Any], data: dict[str, np.ndarray],
         bounds: dict[str, Any] | None = None, enabled: bool = True, carry_feedback: bool = False
         ) -> tuple[ModelFile, dict[str, Any]]:
    """The model with its head's input exposed, and the sealed learning policy."""
    if model.format != "onnx":
        raise UsageError("--learnable supports ONNX models only: a TFLite model cannot take a learnt head on the "
                         "board (pack it without --learnable)")
    if task.get("kind") != "classifier":
        raise UsageError("--learnable supports classifiers only (task kind 'classifier')")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load_from_string(model.data)
    g = m.graph
    if any(n.op_type in _QUANTISED_OPS for n in g.node):
        raise UsageError("--learnable: the model is quantised; local learning refits float weights only. "
                         "Pack the float model with --learnable (quantised models: not supported)")
    out_name = g.output[int(task.get("output", 0))].name
    _, w_name, b_name, feat_name, _after = _find_head(g, out_name)
    inits = {i.name: i for i in g.initializer}
    w = numpy_helper.to_array(inits[w_name])
    b = numpy_helper.to_array(inits[b_name])
    if w.dtype != np.float32 or b.dtype != np.float32 or w.ndim != 2:
        raise UsageError("--learnable: the final layer's weights are not float32 (quantised models are not "
                         "supported)")
    uses = sum(1 for n in g.node for i in n.input if i in (w_name, b_name))
    if uses != 2:
        raise UsageError("--learnable: the final layer's weights are shared with other layers")
    dims, classes = w.shape
    if b.size != classes:
        raise UsageError("--learnable: the final layer's bias does not match its weights")
    if feat_name not in {o.name for o in g.output}:
        g.output.append(helper.make_tensor_value_info(feat_name, TensorProto.FLOAT, [None, dims]))
    marked = ModelFile(model.path, m.SerializeToString(), model.format)
    runner = OnnxRunner(marked.data)
    if len(runner.inputs) != 1:
        raise UsageError("--learnable supports models with one input only")
    gate_x = np.asarray(data["gate_x"], dtype=np.float32)
    gate_y = np.asarray(data["gate_y"]).astype(np.int64)
    replay_x = np.asarray(data["replay_x"], dtype=np.float32)
    canary_x = np.asarray(data.get("canary_x", gate_x[:20]), dtype=np.float32)
    feed = runner.inputs[0].name
    score_name = runner.outputs[int(task.get("output", 0))].name
    canary_y = np.asarray(runner.run_named({feed: canary_x}, [score_name])[0]).reshape(len(canary_x), -1).argmax(1)
    (feat,) = runner.run_named({feed: gate_x[:2]}, [feat_name])
    if feat.reshape(2, -1).shape[1] != dims:
        raise UsageError("--learnable: the final layer's input is not a flat feature vector")
    if len(gate_x) < 20 or len(gate_x) != len(gate_y) or gate_y.min() < 0 or gate_y.max() >= classes:
        raise UsageError("--learnable: gate_x/gate_y need at least 20 labelled examples with labels in range")
    merged = dict(bounds or {})
    unknown = set(merged) - set(BOUNDS)
    if unknown:
        raise UsageError(f"--policy learning.bounds: unknown bounds {', '.join(sorted(unknown))}")
    merged.setdefault("near_duplicate_distance", near_duplicate_distance(np.concatenate([gate_x, replay_x])))
    policy = {
        "schema": LEARNING_SCHEMA,
        "enabled": enabled,
        "carry_feedback": carry_feedback,
        "head": {"weight": w_name, "bias": b_name, "features": feat_name, "output": int(task.get("output", 0)),
                 "classes": int(classes), "dims": int(dims), "bias_shape": list(b.shape),
                 "base": {"weight": encode_array(w), "bias": encode_array(b.reshape(-1))}},
        "gate": {"x": encode_array(gate_x), "y": encode_array(gate_y)},
        "canaries": {"x": encode_array(canary_x), "y": encode_array(canary_y.astype(np.int64))},
        "replay": {"x": encode_array(replay_x)},
        "bounds": merged,
    }
    return marked, policy


def near_duplicate_distance(x: np.ndarray) -> float:
    """Half the 1% quantile of the distance from each example to its nearest neighbour in the
    publisher's data: closer than that, two inputs are one input lightly perturbed."""
    rows = np.stack([features(r) for r in x])
    sq = (rows**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    d2[d2 <= 1e-12] = np.inf
    nearest = np.sqrt(d2.min(axis=1))
    nearest = nearest[np.isfinite(nearest)]
    return round(float(np.quantile(nearest, 0.01) / 2), 6) if len(nearest) else 0.0


def apply(model: ModelFile, task: dict[str, Any], extra: dict[str, Any], policy: dict[str, Any],
          data_path: str) -> tuple[ModelFile, dict[str, Any]]:
    """For ``pack``: mark ``model``, put the learning policy into ``policy`` (merging the bounds
    and switches a ``--policy`` file gave under ``learning``), and keep the model card's facts true."""
    given = policy.get("learning") or {}
    if not isinstance(given, dict) or set(given) - {"bounds", "enabled", "carry_feedback"}:
        raise UsageError("--policy learning may set only bounds, enabled and carry_feedback")
    marked, learning = mark(model, task, read_data(data_path), given.get("bounds"),
                            bool(given.get("enabled", True)), bool(given.get("carry_feedback", False)))
    policy["learning"] = learning
    facts = extra.get("card_facts")
    if facts is not None:
        extra["card_facts"] = replace(facts, output_sha256=marked.sha256, output_bytes=len(marked.data))
    return marked, policy
