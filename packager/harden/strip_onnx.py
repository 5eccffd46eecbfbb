"""Strip an ONNX model of everything that tells an attacker about it (NCSC 1.3, 3.3).

Doc strings, producer, domain, model version, ``metadata_props`` (on the model and, from IR 10,
on every graph, node, value-info, tensor and function), graph/node/initializer/value names,
value-info, quantisation annotations, symbolic dimension names and the input/output names are
removed or replaced by short positional names. One rename map covers the graph and every
sub-graph (``If``/``Loop`` bodies), so outer-scope references keep resolving. Model-local
functions get positional names and domains, inside and at every call. ``ai.onnx.ml`` classifier
string labels become integer labels; :func:`onnx_class_labels` gives the original strings for
the sealed sidecar. The arithmetic is untouched: the scores are bit-for-bit the same.

After stripping, :func:`check_stripped` parses the result again and refuses it if any
identifying string of the original (4+ characters) survives in any string field: a generic
walk over every field of the protobuf, so a field this module does not know about cannot leak
silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from device_agent.errors import FormatError

MIN_SECRET = 4
# The names this module gives: positional, so they say nothing (and re-stripping may reuse them).
POSITIONAL = re.compile(r"(?:[txyvF]\d+|N|local\.f\d+|g(?:_\d+_[A-Za-z_]+?\d*)*)")
# Strings the runtime needs to run the model: they name the standard, not the model.
STRUCTURAL = frozenset(
    {
        ("NodeProto", "op_type"),
        ("NodeProto", "domain"),
        ("OperatorSetIdProto", "domain"),
        ("AttributeProto", "name"),
        ("AttributeProto", "s"),
        ("AttributeProto", "ref_attr_name"),
        ("FunctionProto", "attribute"),
        ("StringStringEntryProto", "key"),  # only external_data keys survive: "location"...
    }
)
# ai.onnx.ml operators whose string labels move into the sidecar: attribute -> int attribute
ML_LABELS = {
    "LinearClassifier": ("classlabels_strings", "classlabels_ints"),
    "SVMClassifier": ("classlabels_strings", "classlabels_ints"),
    "TreeEnsembleClassifier": ("classlabels_strings", "classlabels_int64s"),
    "ZipMap": ("classlabels_strings", "classlabels_int64s"),
}


class Unstrippable(FormatError):
    """The model carries identifying strings stripping cannot remove without changing it."""


def _renamer(prefix: str = "t") -> Callable[[str], str]:
    names: dict[str, str] = {"": ""}

    def rename(name: str) -> str:
        if name not in names:
            names[name] = f"{prefix}{len(names) - 1}"
        return names[name]

    return rename


def _messages(msg: Any) -> Iterator[Any]:
    """Every message in the tree under ``msg`` (itself first), by protobuf reflection."""
    stack = [msg]
    while stack:
        m = stack.pop()
        yield m
        for fd, value in m.ListFields():
            if fd.message_type is None:
                continue
            if fd.is_repeated:
                if fd.message_type.GetOptions().map_entry:
                    continue
                stack.extend(value)
            else:
                stack.append(value)


def _scrub_everywhere(model: Any) -> None:
    """Doc strings, metadata_props, denotations and quantisation annotations, on every message
    that has them (generic, so new IR versions' fields are covered too)."""
    for m in _messages(model):
        fields = m.DESCRIPTOR.fields_by_name
        for name in ("doc_string", "denotation"):
            if name in fields and m.HasField(name):
                m.ClearField(name)
        for name in ("metadata_props", "quantization_annotation"):
            if name in fields:
                m.ClearField(name)


def _strip_type(t: Any) -> None:
    """Symbolic dimension names (``batch``, ``p2o.DynamicDimension.0``) become anonymous."""
    which = t.WhichOneof("value")
    if which == "tensor_type" and t.tensor_type.HasField("shape"):
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = "N"
    elif which == "sparse_tensor_type" and t.sparse_tensor_type.HasField("shape"):
        for d in t.sparse_tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = "N"
    elif which == "sequence_type":
        _strip_type(t.sequence_type.elem_type)
    elif which == "optional_type":
        _strip_type(t.optional_type.elem_type)
    elif which == "map_type":
        _strip_type(t.map_type.value_type)


def _strip_nodes(
    nodes: Any, rename: Callable[[str], str], io_names: dict[str, str], scope: str, fns: Any
) -> None:
    for k, node in enumerate(nodes):
        node.name = ""
        node.input[:] = [io_names.get(n) or rename(n) for n in node.input]
        node.output[:] = [io_names.get(n) or rename(n) for n in node.output]
        key = (node.domain, node.op_type)
        if key in fns:
            node.domain, node.op_type = fns[key]
        for attr in node.attribute:
            if attr.HasField("t"):  # Constant values carry the exporter's tensor names
                attr.t.name = ""
            for t in attr.tensors:
                t.name = ""
            if attr.HasField("g"):
                _strip_graph(attr.g, rename, io_names, f"{scope}_{k}_{attr.name}", fns)
            for i, g in enumerate(attr.graphs):
                _strip_graph(g, rename, io_names, f"{scope}_{k}_{attr.name}{i}", fns)


def _strip_graph(
    graph: Any, rename: Callable[[str], str], io_names: dict[str, str], name: str, fns: Any
) -> None:
    graph.name = name  # required non-empty for sub-graphs; positional, so it says nothing
    del graph.value_info[:]
    for init in graph.initializer:
        init.name = io_names.get(init.name) or rename(init.name)
        if init.HasField("data_location") and init.data_location:
            raise FormatError("external data must be inlined before stripping")
    for sp in graph.sparse_initializer:
        sp.values.name = rename(sp.values.name)
        sp.indices.name = rename(sp.indices.name)
    for vi in (*graph.input, *graph.output):
        vi.name = io_names.get(vi.name) or rename(vi.name)
        _strip_type(vi.type)
    _strip_nodes(graph.node, rename, io_names, name, fns)


def _strip_functions(model: Any) -> dict[tuple[str, str], tuple[str, str]]:
    """Model-local functions get positional names and domains; returns the call-site map."""
    fns: dict[tuple[str, str], tuple[str, str]] = {}
    domains: dict[str, str] = {}
    for i, fn in enumerate(model.functions):
        domain = domains.setdefault(fn.domain, f"local.f{len(domains)}")
        fns[(fn.domain, fn.name)] = (domain, f"F{i}")
    for fn in model.functions:
        rename = _renamer("v")
        fn.domain, fn.name = fns[(fn.domain, fn.name)]
        fn.input[:] = [rename(n) for n in fn.input]
        fn.output[:] = [rename(n) for n in fn.output]
        if "value_info" in fn.DESCRIPTOR.fields_by_name:
            del fn.value_info[:]
        _strip_nodes(fn.node, rename, {}, fn.name, fns)
    for op in model.opset_import:
        if op.domain in domains:
            op.domain = domains[op.domain]
    for fn in model.functions:
        for op in fn.opset_import:
            if op.domain in domains:
                op.domain = domains[op.domain]
    return fns


def _ml_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type in ML_LABELS:
            yield node


def onnx_class_labels(data: bytes) -> list[str] | None:
    """The string class labels an ``ai.onnx.ml`` classifier carries, in class order, or None."""
    import onnx

    graph = onnx.load_from_string(data).graph
    for node in _ml_nodes(graph):
        attrs = {a.name: a for a in node.attribute}
        if ML_LABELS[node.op_type][0] in attrs:
            return [s.decode("utf-8") for s in attrs[ML_LABELS[node.op_type][0]].strings]
    return None


def _ml_labels_to_ints(graph: Any) -> None:
    """Replace classifier string labels by their index; the label outputs become int64."""
    from onnx import TensorProto, helper

    retyped: set[str] = set()
    for node in _ml_nodes(graph):
        strings, ints = ML_LABELS[node.op_type]
        for i, attr in enumerate(node.attribute):
            if attr.name != strings:
                continue
            n = len(attr.strings)
            node.attribute[i].CopyFrom(helper.make_attribute(ints, list(range(n))))
            retyped.add(node.output[0])
    if not retyped:
        return
    for node in graph.node:  # topological order: Identity chains carry the labels on
        if node.op_type == "Identity" and not node.domain and node.input[0] in retyped:
            retyped.add(node.output[0])
    for user in graph.node:
        if any(i in retyped for i in user.input) and user.op_type != "Identity":
            raise Unstrippable(
                f"the classifier's string labels feed a {user.op_type} node; export the model "
                "with integer class labels (the sidecar carries the names)"
            )
    for vi in graph.output:
        if vi.name not in retyped:
            continue
        t = vi.type
        if t.WhichOneof("value") == "tensor_type":
            t.tensor_type.elem_type = TensorProto.INT64
        elif t.WhichOneof("value") == "sequence_type":
            inner = t.sequence_type.elem_type
            if inner.WhichOneof("value") == "map_type":
                inner.map_type.key_type = TensorProto.INT64


def strip_onnx(data: bytes) -> bytes:
    """The model without names, doc strings, metadata or string labels; inputs ``x0..``,
    outputs ``y0..``. Refuses (:class:`Unstrippable`) if an identifying string survives."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError) as e:
        raise FormatError(f"the model is not a valid ONNX protobuf: {e}") from e
    original = onnx.ModelProto()
    original.CopyFrom(model)
    model.DiscardUnknownFields()  # fields this onnx cannot see could carry anything
    _scrub_everywhere(model)
    _ml_labels_to_ints(model.graph)
    fns = _strip_functions(model)
    rename = _renamer()
    graph = model.graph
    initialisers = {i.name for i in graph.initializer}
    io_names = {
        vi.name: f"x{i}"
        for i, vi in enumerate(v for v in graph.input if v.name not in initialisers)
    }
    io_names.update({vi.name: f"y{i}" for i, vi in enumerate(graph.output)})
    _strip_graph(graph, rename, io_names, "g", fns)
    model.producer_name = ""
    model.producer_version = ""
    model.domain = ""
    model.model_version = 0
    del model.training_info[:]
    out = model.SerializeToString()
    check_stripped(original, out)
    return out


def _strings(msg: Any, skip_structural: bool) -> Iterator[tuple[str, str]]:
    """(where, value) for every string and bytes field in the tree, by reflection; tensor
    payloads (``raw_data``) are numbers, not strings, and are skipped."""
    stack: list[tuple[Any, str]] = [(msg, msg.DESCRIPTOR.name)]
    while stack:
        m, where = stack.pop()
        kind = m.DESCRIPTOR.name
        for fd, value in m.ListFields():
            path = f"{where}.{fd.name}"
            if fd.message_type is not None:
                items = value if fd.is_repeated else [value]
                stack.extend((v, path) for v in items)
                continue
            if fd.type not in (fd.TYPE_STRING, fd.TYPE_BYTES) or fd.name == "raw_data":
                continue
            if skip_structural and (kind, fd.name) in STRUCTURAL:
                continue
            for v in value if fd.is_repeated else [value]:
                text = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                yield path, text


def identifying_strings(model: Any) -> dict[str, str]:
    """{string: where} for the model's names, doc strings, metadata and labels (4+ characters;
    multi-line values also line by line)."""
    found: dict[str, str] = {}
    for where, text in _strings(model, skip_structural=True):
        for piece in (text, *text.splitlines()):
            piece = piece.strip()
            if len(piece) >= MIN_SECRET and not POSITIONAL.fullmatch(piece):
                found.setdefault(piece, where)
    return found


def check_stripped(original: Any, stripped: bytes) -> None:
    """Refuse when any identifying string of ``original`` survives in ``stripped``: in any of its
    string fields but those the runtime needs (operator types, opset domains, attribute names
    and string values), which are checked by value, not by name."""
    import onnx

    model = onnx.load_from_string(stripped)
    carriers = [t for _, t in _strings(model, skip_structural=True)]
    for secret, where in identifying_strings(original).items():
        if any(secret in c for c in carriers):
            raise Unstrippable(
                f"an identifying string from {where} ({len(secret)} characters) survives "
                "stripping; export the model without it and harden again"
            )
