"""Strip an ONNX model of everything that tells an attacker about it (NCSC 1.3, 3.3).

Doc strings, producer, domain, model version, ``metadata_props``, graph/node/initializer/value
names, value-info, symbolic dimension names and the input/output names are removed or replaced
by short positional names. One rename map covers the graph and every sub-graph (``If``/``Loop``
bodies), so outer-scope references keep resolving. The arithmetic is untouched: predictions are
bit-for-bit the same.
"""

from __future__ import annotations

from typing import Any


def _renamer() -> Any:
    names: dict[str, str] = {"": ""}

    def rename(name: str) -> str:
        if name not in names:
            names[name] = f"t{len(names) - 1}"
        return names[name]

    return rename, names


def _strip_type(t: Any) -> None:
    """Symbolic dimension names (``batch``, ``p2o.DynamicDimension.0``) become anonymous."""
    t.denotation = ""
    which = t.WhichOneof("value")
    if which == "tensor_type" and t.tensor_type.HasField("shape"):
        for d in t.tensor_type.shape.dim:
            d.denotation = ""
            if d.HasField("dim_param"):
                d.dim_param = "N"
    elif which == "sequence_type":
        _strip_type(t.sequence_type.elem_type)
    elif which == "optional_type":
        _strip_type(t.optional_type.elem_type)


def _strip_graph(graph: Any, rename: Any, io_names: dict[str, str], name: str = "g") -> None:
    graph.name = name  # required non-empty for sub-graphs; positional, so it says nothing
    graph.doc_string = ""
    del graph.value_info[:]
    for init in graph.initializer:
        init.name = io_names.get(init.name) or rename(init.name)
        init.doc_string = ""
        if init.HasField("data_location") and init.data_location:
            raise ValueError("external data must be inlined before stripping")
    for sp in graph.sparse_initializer:
        sp.values.name = rename(sp.values.name)
        sp.indices.name = rename(sp.indices.name)
    for vi in (*graph.input, *graph.output):
        vi.name = io_names.get(vi.name) or rename(vi.name)
        vi.doc_string = ""
        _strip_type(vi.type)
    for k, node in enumerate(graph.node):
        node.name = ""
        node.doc_string = ""
        node.input[:] = [io_names.get(n) or rename(n) for n in node.input]
        node.output[:] = [io_names.get(n) or rename(n) for n in node.output]
        for attr in node.attribute:
            attr.doc_string = ""
            if attr.HasField("t"):  # Constant values carry the exporter's tensor names
                attr.t.name = ""
                attr.t.doc_string = ""
            for t in attr.tensors:
                t.name = ""
                t.doc_string = ""
            if attr.HasField("g"):
                _strip_graph(attr.g, rename, io_names, f"{name}_{k}_{attr.name}")
            for i, g in enumerate(attr.graphs):
                _strip_graph(g, rename, io_names, f"{name}_{k}_{attr.name}{i}")


def strip_onnx(data: bytes) -> bytes:
    """The model without names, doc strings or metadata; inputs ``x0..``, outputs ``y0..``."""
    import onnx

    model = onnx.load_from_string(data)
    rename, _ = _renamer()
    graph = model.graph
    initialisers = {i.name for i in graph.initializer}
    io_names = {
        vi.name: f"x{i}"
        for i, vi in enumerate(v for v in graph.input if v.name not in initialisers)
    }
    io_names.update({vi.name: f"y{i}" for i, vi in enumerate(graph.output)})
    _strip_graph(graph, rename, io_names)
    model.doc_string = ""
    model.producer_name = ""
    model.producer_version = ""
    model.domain = ""
    model.model_version = 0
    del model.metadata_props[:]
    del model.training_info[:]
    for fn in model.functions:
        fn.doc_string = ""
    return model.SerializeToString()
