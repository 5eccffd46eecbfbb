"""Serving an ONNX model's weights from the decrypted buffer itself (no copy into the runtime).

onnxruntime copies a model given as bytes several times while it builds a session (the protobuf
it parses, then its own initializers): loading cost about 4x the model at peak. Initializers
handed over with ``SessionOptions.add_initializer`` are used where they lie, so the loader
rewrites the model's top-level graph with every large initializer's ``raw_data`` replaced by an
external-data placeholder, and gives onnxruntime one array per initializer that views the
decrypted buffer. The buffer then *is* the model's weights for the session's life, and can be
wiped when the model is unloaded (an onnxruntime-owned copy could not be).

:func:`split_weights` is pure: it takes the model's bytes and returns the small graph and where
each weight lies. It walks the protobuf wire format with every length checked against the bytes
present; anything it does not understand is a :class:`~device_agent.errors.FormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.errors import FormatError

# ONNX TensorProto.DataType -> numpy dtype name, for the types a weight is stored in as raw bytes
# (little-endian, as onnx writes raw_data). Other types stay inline in the graph.
DTYPES = {
    1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2",
    11: "<f8", 12: "<u4", 13: "<u8",
}
# A tuning choice, not a bound: initializers smaller than this stay in the graph (copying them
# costs little). The walk itself is bounded by the model's length: every field takes 2+ bytes.
INLINE_UNDER = 1024
# The placeholder names a path that always exists (the model directory) and is never read:
# onnxruntime takes the data from add_initializer before it would open it.
PLACEHOLDER = "."

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_T_DIMS, _T_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
# Packed repeated fields whose bytes are the little-endian array itself (as raw_data would be):
# float_data for FLOAT, double_data for DOUBLE. (Other typed fields are varints.)
_PACKED_AS_RAW = {4: 1, 10: 11}


@dataclass(frozen=True)
class Weight:
    """One initializer's raw data: ``buffer[offset:offset + length]`` of the model bytes."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    offset: int
    length: int


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise FormatError("the ONNX model is malformed (a truncated or overlong varint)")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of one message's fields."""
    out = []
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise FormatError(f"the ONNX model is malformed (protobuf wire type {wire})")
        if value_end > end or number == 0:
            raise FormatError("the ONNX model is malformed (a field runs past its message)")
        out.append((number, wire, field_start, pos, value_end))
        pos = value_end
    return out


def _len_field(number: int, value: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value


def _external_tensor(
    buf: memoryview, fields: list[tuple[int, int, int, int, int]], always: frozenset[str] = frozenset()
) -> tuple[bytes, Weight] | None:
    """The placeholder TensorProto for one initializer and where its data lies, or None when it
    stays inline (small, no raw_data or packed float/double data, already external, or a type
    kept as is). Several data fields in one tensor (malformed) keep it inline too."""
    dims: list[int] = []
    dtype = 0
    name: str | None = None
    raw: tuple[int, int] | None = None
    data_field = _T_RAW
    for number, wire, _, vstart, vend in fields:
        if number in (_T_EXTERNAL, _T_LOCATION):
            return None
        if number == _T_DIMS:
            if wire == 0:
                dims.append(_varint(buf, vstart, vend)[0])
            elif wire == 2:  # packed
                p = vstart
                while p < vend:
                    d, p = _varint(buf, p, vend)
                    dims.append(d)
        elif number == _T_TYPE and wire == 0:
            dtype = _varint(buf, vstart, vend)[0]
        elif number == _T_NAME and wire == 2:
            try:
                name = bytes(buf[vstart:vend]).decode("utf-8")
            except UnicodeDecodeError:
                return None
        elif wire == 2 and (number == _T_RAW or number in _PACKED_AS_RAW):
            if raw is not None:
                return None
            raw = (vstart, vend)
            data_field = number
    if name is None or raw is None or dtype not in DTYPES or (raw[1] - raw[0] < INLINE_UNDER and name not in always):
        return None
    if data_field != _T_RAW and _PACKED_AS_RAW[data_field] != dtype:
        return None
    count = 1
    for d in dims:
        count *= d
    if count * np.dtype(DTYPES[dtype]).itemsize != raw[1] - raw[0]:
        return None  # let onnxruntime report the inconsistent tensor itself
    kept = b"".join(bytes(buf[s:e]) for number, _, s, _, e in fields if number != data_field)
    entries = b"".join(
        _len_field(_T_EXTERNAL, _len_field(1, key.encode()) + _len_field(2, value.encode()))
        for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(raw[1] - raw[0])))
    )
    tensor = kept + entries + _encode_varint(_T_LOCATION << 3 | 0) + _encode_varint(1)
    return tensor, Weight(name, DTYPES[dtype], tuple(dims), raw[0], raw[1] - raw[0])


def split_weights(
    model: bytes | bytearray | memoryview, always: frozenset[str] = frozenset()
) -> tuple[bytes, list[Weight]]:
    """The model with its large top-level initializers (and those named in ``always``, whatever
    their size) turned into placeholders, and where each one's data lies in ``model`` (in
    increasing offset order)."""
    buf = memoryview(model).cast("B")
    weights: list[Weight] = []
    graph_parts: list[bytes] = []
    model_parts: list[bytes] = []
    graphs = 0
    for number, wire, fstart, vstart, vend in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != 2:
            model_parts.append(bytes(buf[fstart:vend]))
            continue
        graphs += 1
        for gnum, gwire, gfstart, gvstart, gvend in _fields(buf, vstart, vend):
            external = None
            if gnum == _GRAPH_INITIALIZER and gwire == 2:
                external = _external_tensor(buf, _fields(buf, gvstart, gvend), always)
            if external is None:
                graph_parts.append(bytes(buf[gfstart:gvend]))
            else:
                tensor, weight = external
                graph_parts.append(_len_field(_GRAPH_INITIALIZER, tensor))
                weights.append(weight)
        model_parts.append(_len_field(_MODEL_GRAPH, b"".join(graph_parts)))
    if graphs != 1:
        raise FormatError(f"the ONNX model has {graphs} graphs, not one")
    return b"".join(model_parts), weights
