"""Inference runtimes behind one small adapter; models are always loaded from bytes in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from device_agent.errors import EnvironmentFault, FormatError

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any
    shape: tuple[int | None, ...]


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


class OnnxRunner:
    """An onnxruntime session from model bytes. ``initializers`` replace named weights of the
    model at session creation (a learnt local head, device_agent.learning), from memory."""

    def __init__(self, model: bytes, threads: int = 0, initializers: dict[str, np.ndarray] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EnvironmentFault("onnxruntime is not installed; pip install 'edgeward[device]'") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # The OrtValues must outlive the session: onnxruntime reads them, it does not copy them.
        self._overrides = [
            (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
            for name, value in (initializers or {}).items()
        ]
        for name, value in self._overrides:
            opts.add_initializer(name, value)
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise FormatError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:200]}") from e
        # InferenceSession keeps the bytes it was given for its whole life (only to rebuild itself
        # on set_providers, which EdgeWard never calls). Dropping that reference frees the plaintext
        # model copy as soon as the session is built: less memory, and less plaintext lying around.
        if hasattr(self._session, "_model_bytes"):
            self._session._model_bytes = None
        self.inputs = [
            TensorSpec(i.name, _ORT_DTYPES.get(i.type, np.float32), tuple(_dim(d) for d in i.shape))
            for i in self._session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, _ORT_DTYPES.get(o.type, np.float32), tuple(_dim(d) for d in o.shape or ()))
            for o in self._session.get_outputs()
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._session.run(None, feeds)]

    def run_named(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """Only the named outputs (the learnable head's features, for local learning)."""
        return [np.asarray(o) for o in self._session.run(names, feeds)]


class LiteRtRunner:
    def __init__(self, model: bytes, threads: int = 0) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise EnvironmentFault("ai-edge-litert is not installed; pip install 'edgeward[tflite]'") from e
        try:
            self._interp = Interpreter(model_content=model, num_threads=threads or None)
            self._interp.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with C++ messages
            raise FormatError(f"LiteRT cannot load the model: {str(e).splitlines()[0][:200]}") from e
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = [
            TensorSpec(d["name"], d["dtype"], tuple(int(x) if x > 0 else None for x in d["shape_signature"]))
            for d in self._in
        ]
        self.outputs = [
            TensorSpec(d["name"], d["dtype"], tuple(int(x) if x > 0 else None for x in d["shape_signature"]))
            for d in self._out
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for d in self._in:
            x = feeds[d["name"]]
            if tuple(d["shape"]) != x.shape:
                self._interp.resize_tensor_input(d["index"], x.shape)
                self._interp.allocate_tensors()
            self._interp.set_tensor(d["index"], x)
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(d["index"])) for d in self._out]


def load_runner(
    runtime: str, model: bytes, threads: int = 0, initializers: dict[str, np.ndarray] | None = None
) -> Runner:
    if runtime == "onnxruntime":
        return OnnxRunner(model, threads, initializers)
    if initializers:
        raise FormatError("local learning needs onnxruntime: a LiteRT model cannot take a learnt head")
    if runtime == "litert":
        return LiteRtRunner(model, threads)
    raise FormatError(f"unknown runtime {runtime!r}")
