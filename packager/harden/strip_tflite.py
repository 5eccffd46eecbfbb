"""Strip a TFLite model through the flatbuffer schema ai-edge-litert ships (NCSC 1.3, 3.3).

Removed: the description, every metadata entry and its buffer (``TFLITE_METADATA``,
``min_runtime_version``, ``CONVERSION_METADATA``, label files), signature definitions, subgraph
and tensor names, and anything appended after the flatbuffer (metadata zip archives), which
re-serialising through the object API drops, and every buffer that no tensor references
(vendor tools leave build paths, converter flags and model names in buffers nothing points
at; removing a metadata entry alone leaves its buffer behind). Weights and operators are
untouched; the kept buffers are renumbered.

A final self-check reads the result back and refuses the model when anything identifying of the
original survives: every string of the original's object tree (4+ characters) is looked for in
every string of the result's, and every printable run of the original's bytes (8+ characters)
is looked for in every byte of the result -- except the custom-operator codes the runtime needs
to run the model, and runs inside the numbers the result keeps (weights of the buffers tensors
use, shapes, quantisation parameters, operator options).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from device_agent.errors import FormatError

from .strip_onnx import MIN_SECRET, Unstrippable
from .tflite_util import read_tflite

STRUCTURAL = frozenset({("OperatorCodeT", "customCode")})
POSITIONAL = re.compile(r"t\d+")
MIN_PRINTABLE = 8  # a run this long cannot turn up in weights by chance (1 in 2^48 per offset)
PRINTABLE = re.compile(rb"[\x20-\x7e]{%d,}" % MIN_PRINTABLE)
IDENTIFIER = b"TFL3"  # the flatbuffer file identifier: in every TFLite file


def _strings(obj: Any, skip_structural: bool) -> Iterator[tuple[str, str]]:
    """(where, text) for every string in a schema object tree, found by reflection."""
    stack = [obj]
    while stack:
        o = stack.pop()
        kind = type(o).__name__
        for name, value in vars(o).items():
            items = value if isinstance(value, list) else [value]
            for v in items:
                if isinstance(v, bytes | str):
                    if not (skip_structural and (kind, name) in STRUCTURAL):
                        text = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                        yield f"{kind}.{name}", text
                elif hasattr(v, "__dict__") and not isinstance(v, type):
                    stack.append(v)


def _numbers(model: Any) -> bytes:
    """The bytes of the numeric arrays of a model's object tree that a tensor or an operator
    uses (the weights of referenced buffers, shapes, quantisation scales and zero points,
    operator options...), NUL-separated: numbers, whatever printable runs they happen to
    contain. A buffer no tensor references is no number of the model's."""
    used = {t.buffer for sub in model.subgraphs or [] for t in sub.tensors or []}
    parts = [
        np.asarray(b.data).tobytes()
        for i, b in enumerate(model.buffers or [])
        if i in used and b.data is not None
    ]
    stack = [model]
    while stack:
        o = stack.pop()
        if type(o).__name__ == "BufferT":
            continue
        for value in vars(o).values():
            items = value if isinstance(value, list) else [value]
            if isinstance(value, np.ndarray):
                parts.append(value.tobytes())
                continue
            for v in items:
                if isinstance(v, np.ndarray):
                    parts.append(v.tobytes())
                elif hasattr(v, "__dict__") and not isinstance(v, type):
                    stack.append(v)
    return b"\0".join(parts)


def _printable_runs(data: bytes) -> set[bytes]:
    """Printable ASCII runs of ``data``, ``strings``-style."""
    return {m.group() for m in PRINTABLE.finditer(data)}


def check_stripped(original: bytes, stripped: bytes) -> None:
    """Refuse when an identifying string of ``original`` survives in ``stripped``: a string of
    its object tree among the result's strings, or a printable run of its bytes (not inside the
    numbers the result keeps) anywhere in the result's bytes."""
    secrets: dict[str, str] = {}
    for where, text in _strings(read_tflite(original), skip_structural=True):
        if len(text) >= MIN_SECRET and not POSITIONAL.fullmatch(text):
            secrets.setdefault(text, where)
    result = read_tflite(stripped)
    carriers = [t for _, t in _strings(result, skip_structural=True)]
    for secret, where in secrets.items():
        if any(secret in c for c in carriers):
            raise Unstrippable(
                f"an identifying string from {where} ({len(secret)} characters) survives "
                "stripping; export the model without it and harden again"
            )
    inherent = [
        c if isinstance(c, bytes) else str(c).encode()
        for c in (code.customCode for code in result.operatorCodes or [])
        if c
    ]
    numbers = _numbers(result)
    for run in _printable_runs(original):
        if run == IDENTIFIER or any(run in c for c in inherent) or run in numbers:
            continue
        if run in stripped:
            raise Unstrippable(
                f"a printable string of the original ({len(run)} characters, not in its numbers) "
                "survives stripping; export the model without it and harden again"
            )


def strip_tflite(data: bytes) -> bytes:
    """Return the model rebuilt without names, description, metadata, signatures or buffers no
    tensor uses."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = read_tflite(data)
    model.description = None
    model.metadata = None
    model.metadataBuffer = None
    model.signatureDefs = None
    buffers = model.buffers or []
    used = {0}  # buffer 0 is the empty buffer every tensor without data points at
    for sub in model.subgraphs or []:
        sub.name = None
        for i, t in enumerate(sub.tensors or []):
            t.name = f"t{i}"
            if not 0 <= t.buffer < len(buffers):
                raise FormatError(f"tensor {i} refers to buffer {t.buffer}, which does not exist")
            used.add(t.buffer)
    keep = sorted(used)
    renumber = {old: new for new, old in enumerate(keep)}
    for b in keep:
        if buffers and (getattr(buffers[b], "offset", 0) or 0) > 1:
            raise FormatError("TFLite models with buffers outside the flatbuffer (over 2 GB) are not supported")
    model.buffers = [buffers[b] for b in keep] if buffers else [s.BufferT()]
    for sub in model.subgraphs or []:
        for t in sub.tensors or []:
            t.buffer = renumber[t.buffer]
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    check_stripped(data, out)
    return out
