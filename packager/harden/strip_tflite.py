"""Strip a TFLite model through the flatbuffer schema ai-edge-litert ships (NCSC 1.3, 3.3).

Removed: the description, every metadata entry and its buffer (``TFLITE_METADATA``,
``min_runtime_version``, ``CONVERSION_METADATA``, label files), signature definitions, subgraph
and tensor names, and anything appended after the flatbuffer (metadata zip archives), which
re-serialising through the object API drops. Weights and operators are untouched.
"""

from __future__ import annotations

from .tflite_util import read_tflite


def strip_tflite(data: bytes) -> bytes:
    """Return the model rebuilt without names, description, metadata or signatures."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    model = read_tflite(data)
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
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
