"""Quantisation to int8: onnxruntime.quantization for ONNX, ai-edge-quantizer for TFLite (NCSC 2.6).

A model the quantiser cannot handle (classical-ML ``ai.onnx.ml`` operators with nothing to
quantise, control flow, unsupported ops) raises :class:`Unquantisable`; the pipeline records the
stage as skipped with that reason and carries on with the float model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from device_agent.errors import FormatError

from .tflite_util import read_tflite

MODES = ("none", "dynamic", "static")
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
QUANTISABLE_ONNX = frozenset({"MatMul", "Gemm", "Conv"})


class Unquantisable(FormatError):
    """The quantiser cannot handle this model; the stage is skipped, not failed."""


def _onnx_blockers(data: bytes) -> list[str]:
    """Reasons found by looking at the graph before any quantiser runs."""
    import onnx

    graph = onnx.load_from_string(data).graph
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.node}
    reasons = []
    flow = sorted(op for _, op in ops if op in CONTROL_FLOW)
    if flow:
        reasons.append(f"control flow ({', '.join(flow)}) is not quantised by onnxruntime")
    if not any(d == "ai.onnx" and op in QUANTISABLE_ONNX for d, op in ops):
        ml = sorted(op for d, op in ops if d == "ai.onnx.ml")
        reasons.append(
            "no MatMul, Gemm or Conv to quantise"
            + (f" (ai.onnx.ml operators: {', '.join(ml)})" if ml else "")
        )
    return reasons


class _Reader:
    """onnxruntime's CalibrationDataReader over already pre-processed samples."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self._it = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # onnxruntime may call it; one pass is all we give
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantisers print progress and warnings on stdout/stderr; CI logs do not need them."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantise_onnx(data: bytes, mode: str, calibration: np.ndarray | None) -> bytes:
    """Dynamic (int8 weights, float activations) or static QDQ (per-channel int8, calibrated)."""
    reasons = _onnx_blockers(data)
    if reasons:
        raise Unquantisable("; ".join(reasons))
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="edgeward-q-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        try:
            with _quiet():
                if mode == "dynamic":
                    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False)
                else:
                    if calibration is None or not len(calibration):
                        raise FormatError(
                            "static quantisation needs --calibration FILE.npz (array x)"
                        )
                    name = onnx.load_from_string(data).graph.input[0].name
                    quantize_static(
                        src,
                        dst,
                        _Reader(name, calibration),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"QDQDisableWeightAdjustForInt32Bias": True},
                    )
        except FormatError:
            raise
        except Exception as e:  # the quantiser raises whatever its passes raise
            # the message names the model's own tensors and nodes: not for the report or card
            raise Unquantisable(f"onnxruntime.quantization failed ({type(e).__name__})") from e
        return dst.read_bytes()


def quantise_tflite(data: bytes, mode: str, calibration: np.ndarray | None) -> bytes:
    """ai-edge-quantizer recipes: dynamic_wi8_afp32, or static_wi8_ai8 with calibration data."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as e:
        raise Unquantisable(
            "ai-edge-quantizer is not installed; pip install 'edgeward[host]'"
        ) from e
    try:
        with _quiet():
            q = quantizer.Quantizer(bytearray(data))
            if mode == "dynamic":
                q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
                result = q.quantize()
            else:
                if calibration is None or not len(calibration):
                    raise FormatError("static quantisation needs --calibration FILE.npz (array x)")
                q.load_quantization_recipe(recipe.static_wi8_ai8())
                key, name = _tflite_signature_input(data)
                samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
                result = q.quantize(q.calibrate({key: samples}, num_threads=1))
                if result.quantized_model:
                    return _float_io(bytes(result.quantized_model))
    except FormatError:
        raise
    except Exception as e:  # the quantiser raises whatever its passes raise
        # the message names the model's own tensors: not for the report or card
        raise Unquantisable(f"ai-edge-quantizer failed ({type(e).__name__})") from e
    if not result.quantized_model:
        raise Unquantisable("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)


def _float_io(data: bytes) -> bytes:
    """Give a fully int8 TFLite model float inputs and outputs (QUANTIZE in, DEQUANTIZE out).

    The agent and the application keep sending and receiving floats; the scales stay inside the
    sealed model instead of leaking into the pre-processing.
    """
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = read_tflite(data)
    sub = model.subgraphs[0]
    sub.inputs, sub.outputs = [int(i) for i in sub.inputs], [int(i) for i in sub.outputs]

    def opcode(code: int) -> int:
        for i, oc in enumerate(model.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
                return i
        oc = s.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    def float_twin(index: int) -> int:
        t, twin = sub.tensors[index], s.TensorT()
        twin.name, twin.shape, twin.shapeSignature = t.name, t.shape, t.shapeSignature
        twin.type, twin.buffer = s.TensorType.FLOAT32, 0
        t.name = (t.name or b"") + b"_int8"
        sub.tensors.append(twin)
        return len(sub.tensors) - 1

    def op(code: int, src: int, dst: int) -> s.OperatorT:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = opcode(code), [src], [dst]
        return o

    remap: dict[int, int] = {}
    for i, idx in enumerate(sub.inputs):
        if sub.tensors[idx].type != s.TensorType.FLOAT32:
            remap[idx] = sub.inputs[i] = float_twin(idx)
            sub.operators.insert(0, op(s.BuiltinOperator.QUANTIZE, remap[idx], idx))
    for i, idx in enumerate(sub.outputs):
        if sub.tensors[idx].type != s.TensorType.FLOAT32:
            remap[idx] = sub.outputs[i] = float_twin(idx)
            sub.operators.append(op(s.BuiltinOperator.DEQUANTIZE, idx, remap[idx]))
    for sig in model.signatureDefs or []:
        for tm in (*(sig.inputs or []), *(sig.outputs or [])):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _tflite_signature_input(data: bytes) -> tuple[str, str]:
    """The first signature's key and its single input name (the calibrator feeds by signature)."""
    model = read_tflite(data)
    if not model.signatureDefs or len(model.signatureDefs[0].inputs or []) != 1:
        raise Unquantisable(
            "static TFLite quantisation needs a model with one signature and one input"
        )
    sig = model.signatureDefs[0]
    return sig.signatureKey.decode(), sig.inputs[0].name.decode()


def quantise(data: bytes, fmt: str, mode: str, calibration: np.ndarray | None) -> bytes:
    """Quantise a model of format ``onnx`` or ``tflite``; ``mode`` ``none`` returns it unchanged."""
    if mode not in MODES:
        raise FormatError(f"quantisation mode must be one of {', '.join(MODES)}")
    if mode == "none":
        return data
    return (quantise_onnx if fmt == "onnx" else quantise_tflite)(data, mode, calibration)
