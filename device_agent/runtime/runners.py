"""Inference runtimes behind one small adapter; models are always loaded from memory.

Two ways in: :func:`load_runner` takes the model as ``bytes`` (the host: hardening, the accuracy
gate), :func:`load_from_buffer` takes the decrypted buffer a bundle was opened into and keeps it
as the model's memory (the board: see ``docs/agent-service.md``, "Memory").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from device_agent import crypto
from device_agent.errors import EnvironmentFault, FormatError
from device_agent.runtime.onnx_weights import Weight, split_weights

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
WEIGHT_ALIGN = 64  # bytes: a cache line, and more than any element type needs
# onnxruntime's graph optimisation levels, highest first, tried in turn for weights served in place.
IN_PLACE_LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any
    shape: tuple[int | None, ...]


class Runner(Protocol):
    """A loaded model.

    Thread safety, for every runner: :meth:`run` may be called from any number of threads at
    once (the local API serves one thread per connection) and answers each call exactly as a
    call made alone would. onnxruntime's ``InferenceSession.run`` is thread-safe as it is; a
    LiteRT ``Interpreter`` is not (its input shapes and tensors are shared state), so
    :class:`LiteRtRunner` runs one call at a time under a lock.

    :meth:`close` releases the model and wipes the plaintext memory the runner owns; it is also
    called when the runner is garbage-collected, i.e. after the last call in flight returned.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EnvironmentFault("onnxruntime is not installed; pip install 'edgeward[device]'") from e
    return ort


class OnnxRunner:
    """An onnxruntime session. ``InferenceSession.run`` is thread-safe: no lock is needed.
    ``initializers`` are handed to onnxruntime from memory: the weights served in place, and
    any named weights a learnt local head replaces (device_agent.learning)."""

    def __init__(
        self, model: bytes, threads: int = 0, *, initializers: list[tuple[str, Any]] | None = None,
        owned: bytearray | None = None, optimisation: str = "ORT_ENABLE_ALL", quiet: bool = False,
        prepack: bool = True,
    ) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Arrays over the caller's memory: the session reads them where they lie, for its whole
        # life. Pre-packing would add a packed copy of each weight beside them, so it is off.
        self._initializers = initializers or []
        self._owned: bytearray | None = None  # taken over only once the session exists
        for name, value in self._initializers:
            opts.add_initializer(name, value)
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimisation)
        self.optimisation = optimisation
        if quiet:  # an attempt whose failure is expected and handled: no error line in the log
            opts.log_severity_level = 4
        if self._initializers or not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self._session: Any = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise FormatError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:200]}") from e
        # InferenceSession keeps the bytes it was given for its whole life (only to rebuild itself
        # on set_providers, which EdgeWard never calls). Dropping that reference frees the plaintext
        # model copy as soon as the session is built: less memory, and less plaintext lying around.
        if hasattr(self._session, "_model_bytes"):
            self._session._model_bytes = None
        self._owned = owned
        self.inputs = [
            TensorSpec(i.name, _ORT_DTYPES.get(i.type, np.float32), tuple(_dim(d) for d in i.shape))
            for i in self._session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, _ORT_DTYPES.get(o.type, np.float32), tuple(_dim(d) for d in o.shape or ()))
            for o in self._session.get_outputs()
        ]

    @classmethod
    def from_buffer(
        cls, buffer: bytearray, offset: int, length: int, threads: int = 0,
        overrides: dict[str, np.ndarray] | None = None,
    ) -> OnnxRunner:
        """Load the model lying in ``buffer[offset:offset + length]`` and keep ``buffer`` as its
        weights' memory (the runner owns it from now on and wipes it at :meth:`close`).

        The large initializers are moved, in place, to aligned positions in the buffer and
        handed to onnxruntime as arrays over it; everything else in the buffer is wiped. Peak
        extra memory is the small rewritten graph plus onnxruntime's own working memory."""
        ort = _ort()
        view = memoryview(buffer)[offset : offset + length]
        try:
            graph, weights = split_weights(view, frozenset(overrides or ()))
        finally:
            view.release()
        arrays = _place_weights(buffer, offset, weights)
        try:
            values = [(w.name, ort.OrtValue.ortvalue_from_numpy(a)) for w, a in zip(weights, arrays, strict=True)]
            if overrides:  # a learnt head: its weights replace the shipped ones of the same name
                shipped = {w.name: w.dims for w in weights}
                wrong = sorted(n for n, v in overrides.items() if shipped.get(n) != tuple(np.shape(v)))
                if wrong:
                    raise FormatError(f"the learnt head's weights {wrong} are not weights of this model's shape")
                replaced = _overrides(overrides)
                names = {name for name, _ in replaced}
                values = [(n, v) for n, v in values if n not in names] + replaced
            # An optimisation that needs a weight's bytes in the graph (the NCHWc layout of
            # convolutions reorders them; constant folding reads them) fails on a placeholder,
            # loudly: the session is then built at the next lower level, where none does.
            # Serving in place bounds the memory; those optimisations are what it costs.
            for level in IN_PLACE_LEVELS[:-1]:
                try:
                    return cls(graph, threads, initializers=values, owned=buffer, optimisation=level, quiet=True)
                except FormatError:
                    if not values:
                        raise
                    _log.info("onnxruntime %s needs the weights in the graph; trying the next level", level)
            return cls(graph, threads, initializers=values, owned=buffer, optimisation=IN_PLACE_LEVELS[-1])
        except BaseException:
            crypto.wipe(buffer)
            raise

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._session.run(None, feeds)]

    def run_named(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """Only the named outputs (the learnable head's features, for local learning)."""
        return [np.asarray(o) for o in self._session.run(names, feeds)]

    def close(self) -> None:
        self._session = None
        self._initializers = []
        if self._owned is not None:
            crypto.wipe(self._owned)
            self._owned = None

    def __del__(self) -> None:
        if getattr(self, "_owned", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter exit the modules may be gone
                self.close()


def _aligned(address: int, position: int, align: int) -> int:
    """The first position >= ``position`` whose address is a multiple of ``align``."""
    return position + (-(address + position)) % align


def _place_weights(buffer: bytearray, offset: int, weights: list[Weight]) -> list[np.ndarray]:
    """Move each weight (in increasing offset order) down to an aligned position of ``buffer``,
    wipe every byte between them (graph, sidecar: plaintext no longer needed), and return one
    array per weight over the buffer. A weight that cannot move down without overwriting the
    next stays where it is when its elements are aligned, else it is copied out (neither happens
    with the framing the protobuf puts between two initializers)."""
    base = np.frombuffer(buffer, np.uint8)
    address = int(base.ctypes.data)
    cursor = 0
    arrays: list[np.ndarray] = []
    kept: list[tuple[int, int]] = []
    for w in weights:
        src = offset + w.offset
        dtype = np.dtype(w.dtype)
        target = _aligned(address, cursor, WEIGHT_ALIGN)
        if target > src:
            target = _aligned(address, cursor, dtype.itemsize)
        if target > src:
            target = src
        if target != src:
            ctypes.memmove(address + target, address + src, w.length)
        if (address + target) % dtype.itemsize:
            a = np.frombuffer(buffer, dtype, w.length // dtype.itemsize, target).copy()
        else:
            a = np.frombuffer(buffer, dtype, w.length // dtype.itemsize, target)
            kept.append((target, target + w.length))
        arrays.append(a.reshape(w.dims))
        cursor = target + w.length
    position = 0
    for start, end in [*kept, (len(buffer), len(buffer))]:
        if start > position:
            ctypes.memset(address + position, 0, start - position)
        position = max(position, end)
    del base
    return arrays


class LiteRtRunner:
    """A LiteRT interpreter. An ``Interpreter`` is not thread-safe (resizing and invoking share
    its tensors), so calls run one at a time under a lock; each answer is copied out before the
    lock is released."""

    def __init__(self, model: bytes, threads: int = 0) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise EnvironmentFault("ai-edge-litert is not installed; pip install 'edgeward[tflite]'") from e
        try:
            self._interp: Any = Interpreter(model_content=model, num_threads=threads or None)
            self._interp.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with C++ messages
            raise FormatError(f"LiteRT cannot load the model: {str(e).splitlines()[0][:200]}") from e
        self._lock = threading.Lock()
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        # The shape each input is allocated for now (the details above keep the first one).
        self._shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in self._in}
        self.inputs = [
            TensorSpec(d["name"], d["dtype"], tuple(int(x) if x > 0 else None for x in d["shape_signature"]))
            for d in self._in
        ]
        self.outputs = [
            TensorSpec(d["name"], d["dtype"], tuple(int(x) if x > 0 else None for x in d["shape_signature"]))
            for d in self._out
        ]

    @classmethod
    def from_buffer(cls, buffer: bytearray, offset: int, length: int, threads: int = 0) -> LiteRtRunner:
        """Load the model in ``buffer[offset:offset + length]``. LiteRT takes only ``bytes``: the
        model is copied once, then ``buffer`` is wiped and, when nothing else holds a view of
        it, freed before the interpreter is built, so the two never add up with LiteRT's own."""
        with memoryview(buffer) as view:
            model = bytes(view[offset : offset + length])
        crypto.wipe(buffer)
        with contextlib.suppress(BufferError):  # a view elsewhere keeps it: wiped, freed with the view
            buffer.clear()
        return cls(model, threads)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            for d in self._in:
                x = feeds[d["name"]]
                if self._shapes[d["index"]] != x.shape:
                    self._interp.resize_tensor_input(d["index"], x.shape)
                    self._interp.allocate_tensors()
                    self._shapes[d["index"]] = x.shape
                self._interp.set_tensor(d["index"], x)
            self._interp.invoke()
            return [np.array(self._interp.get_tensor(d["index"])) for d in self._out]

    def close(self) -> None:
        self._interp = None


def _overrides(initializers: dict[str, np.ndarray] | None) -> list[tuple[str, Any]]:
    """Named weights as onnxruntime values (each keeps its array alive for the session's life)."""
    ort = _ort()
    return [
        (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))) for name, v in (initializers or {}).items()
    ]


def load_runner(
    runtime: str, model: bytes, threads: int = 0, initializers: dict[str, np.ndarray] | None = None,
    *, prepack: bool = True,
) -> Runner:
    """A runner over ``model`` bytes (the host's way in); ``initializers`` replace named weights.
    ``prepack=False``: onnxruntime keeps no pre-packed copy of the weights (as on the board, which
    serves them from the decrypted buffer): a faster load, for a session that only checks."""
    if runtime == "onnxruntime":
        return OnnxRunner(model, threads, initializers=_overrides(initializers), prepack=prepack)
    if initializers:
        raise FormatError("local learning needs onnxruntime: a LiteRT model cannot take a learnt head")
    if runtime == "litert":
        return LiteRtRunner(model, threads)
    raise FormatError(f"unknown runtime {runtime!r}")


def load_from_buffer(
    runtime: str, buffer: bytearray, offset: int, length: int, threads: int = 0,
    overrides: dict[str, np.ndarray] | None = None,
) -> Runner:
    """A runner over the model in ``buffer[offset:offset + length]``, the decrypted bundle; the
    runner takes ``buffer`` over (the caller must not wipe or reuse it) and wipes it at close."""
    if runtime == "onnxruntime":
        return OnnxRunner.from_buffer(buffer, offset, length, threads, overrides)
    if overrides:
        crypto.wipe(buffer)
        raise FormatError("local learning needs onnxruntime: a LiteRT model cannot take a learnt head")
    if runtime == "litert":
        return LiteRtRunner.from_buffer(buffer, offset, length, threads)
    crypto.wipe(buffer)
    raise FormatError(f"unknown runtime {runtime!r}")
