"""One way to read a TFLite flatbuffer into the schema's object API (ai-edge-litert ships it)."""

from __future__ import annotations

from typing import Any

from device_agent.errors import FormatError


def read_tflite(data: bytes) -> Any:
    """``ModelT`` for ``data``; a malformed flatbuffer is malformed input (exit 3)."""
    from ai_edge_litert import schema_py_generated as s

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise FormatError("the model is not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        return s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    except Exception as e:  # flatbuffers raises struct/index errors on corrupt input
        raise FormatError(f"the TFLite model is corrupt: {type(e).__name__}") from e
