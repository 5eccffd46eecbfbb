"""Whether a classifier's output is already a probability, decided from the model's graph.

The agent shows scores to the roles its policy allows. An output that is already a probability
is shown as it is; any other output ("logits": raw scores, decision values) goes through a
softmax first. Getting this wrong is silent: a softmax over probabilities flattens every answer
(a 0.997 becomes 0.085 and every band reads "low"). So the decision looks at what produces the
output, through the ops that only move or relabel values:

- ``Softmax``, ``Sigmoid``, ``ZipMap``; TFLite ``SOFTMAX`` and ``LOGISTIC``;
- ``Normalizer`` with ``norm="L1"`` (scikit-learn's LogisticRegression ends so);
- the ai.onnx.ml classifiers' score output: ``LinearClassifier`` and ``TreeEnsembleClassifier``
  with a probability ``post_transform`` (``SOFTMAX``, ``LOGISTIC``, ``SOFTMAX_ZERO``, ``PROBIT``),
  ``TreeEnsembleClassifier`` without one whose leaf weights all lie in [0, 1] (forests average
  class fractions), ``SVMClassifier`` with Platt coefficients (``prob_a``, SVC(probability=True))
  or a probability ``post_transform``;
- ``Concat`` of probabilities and ``1 - p`` (binary classifiers build both columns so).

``pack``/``harden --scores probabilities|logits`` overrides the decision when a model ends in
something this does not know.
"""

from __future__ import annotations

from typing import Any

PROBABILITY_OPS = frozenset({"Softmax", "Sigmoid", "ZipMap"})
PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"})
ML_CLASSIFIERS = frozenset({"LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier"})
PROBABILITY_TRANSFORMS = frozenset({"SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT"})
FLOAT_TYPES = frozenset({1, 10, 11, 16})  # float, float16, double, bfloat16
TFLITE_PROBABILITY = frozenset({"SOFTMAX", "LOGISTIC"})
TFLITE_PASS_THROUGH = frozenset({"RESHAPE", "SQUEEZE", "DEQUANTIZE", "QUANTIZE", "EXPAND_DIMS"})
MAX_DEPTH = 32  # ops walked back from the output


def _attr(node: Any, name: str) -> Any:
    from .onnxproto import attribute_value

    for a in node.attribute:
        if a.name == name:
            value = attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def _is_one(graph: Any, name: str) -> bool:
    """Whether ``name`` is a constant whose every element is 1."""
    from onnx import numpy_helper

    tensors = [t for t in graph.initializer if t.name == name]
    tensors += [_attr(n, "value") for n in graph.node if n.op_type == "Constant" and name in n.output]
    for t in tensors:
        if t is not None:
            values = numpy_helper.to_array(t)
            return bool(values.size) and bool((values == 1).all())
    return False


def _onnx_probability(graph: Any, name: str, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    node = next((n for n in graph.node if name in n.output), None)
    if node is None:
        return False
    op = node.op_type
    if op in PROBABILITY_OPS:
        return True
    if op in PASS_THROUGH:
        if op == "Cast" and _attr(node, "to") not in FLOAT_TYPES:
            return False
        return _onnx_probability(graph, node.input[0], depth + 1)
    if op == "Normalizer":
        return _attr(node, "norm") == "L1"
    if op in ML_CLASSIFIERS:
        if list(node.output).index(name) != 1:
            return False  # output 0 is the label
        if (_attr(node, "post_transform") or "NONE") in PROBABILITY_TRANSFORMS:
            return True
        if op == "SVMClassifier":
            return bool(_attr(node, "prob_a"))
        if op == "TreeEnsembleClassifier":
            weights = _attr(node, "class_weights") or []
            return bool(weights) and all(0.0 <= w <= 1.0 for w in weights)
        return False
    if op == "Sub":
        return _is_one(graph, node.input[0]) and _onnx_probability(graph, node.input[1], depth + 1)
    if op == "Concat":
        return all(_onnx_probability(graph, i, depth + 1) for i in node.input)
    return False


def _tflite_probability(data: bytes, output_index: int) -> bool:
    from ai_edge_litert import schema_py_generated as s

    from .harden.tflite_util import read_tflite

    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    model = read_tflite(data)
    sub = model.subgraphs[0]
    tensor = int(sub.outputs[output_index])
    for _ in range(MAX_DEPTH):
        op = next((o for o in sub.operators or [] if tensor in list(o.outputs)), None)
        if op is None:
            return False
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
        if kind in TFLITE_PROBABILITY:
            return True
        if kind not in TFLITE_PASS_THROUGH:
            return False
        tensor = int(op.inputs[0])
    return False


def output_is_probability(data: bytes, model_format: str, output_name: str, output_index: int) -> bool:
    """Whether the classifier output ``output_name`` (index ``output_index``) of the model in
    ``data`` is already a probability."""
    if model_format == "tflite":
        return _tflite_probability(data, output_index)
    from .onnxproto import parse_model

    graph = parse_model(data, "the model").graph
    return _onnx_probability(graph, output_name)
