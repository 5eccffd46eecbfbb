"""ONNX's protobuf messages (``ModelProto``, ``TensorProto``...) without the cost of ``import onnx``.

``import onnx`` takes about 0.45 s on a 2-core host (``onnx.helper`` pulls in ml_dtypes, whose
extension alone takes 0.4 s), more than ``edgeward pack`` spends on everything else for a 100 MB
model apart from reading, loading and writing it. Packing a plain model only parses it, walks its
graph and, for external data, serialises it again: the generated protobuf module that the onnx
package ships does all of that, so pack loads that one file. Where onnx is already imported, or
its generated module cannot be loaded alone, this is the onnx package itself: the same classes,
from the same descriptor pool, either way.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from device_agent.errors import FormatError

_PRIVATE = "packager._onnx_ml_pb2"


@cache
def _generated() -> ModuleType | None:
    """onnx's generated ``onnx_ml_pb2`` module, loaded from the installed package without running
    the package's ``__init__``; None when that cannot be done."""
    try:
        spec = importlib.util.find_spec("onnx")  # finds the package, does not import it
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            return None
        path = Path(locations[0]) / "onnx_ml_pb2.py"
        file_spec = importlib.util.spec_from_file_location(_PRIVATE, path)
        if file_spec is None or file_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[_PRIVATE] = module
        file_spec.loader.exec_module(module)
        return module
    except Exception:  # any surprise in onnx's layout: the full package, below
        sys.modules.pop(_PRIVATE, None)
        return None


def messages() -> Any:
    """A module with ONNX's message classes (``ModelProto``, ``TensorProto``, ``AttributeProto``)."""
    if "onnx" not in sys.modules:  # (None there: onnx is known to be missing; the import says so)
        generated = _generated()
        if generated is not None:
            return generated
    import onnx

    return onnx


def parse_model(data: bytes, name: str) -> Any:
    """Parse ONNX bytes as ``onnx.load_from_string`` does; a corrupt file is malformed input
    (exit 3), not an internal error."""
    from google.protobuf.message import DecodeError

    model = messages().ModelProto()
    try:
        decoded = model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{name} is not a valid ONNX model: {e}; export it again") from e
    if decoded is not None and decoded != len(data):
        raise FormatError(
            f"{name} is not a valid ONNX model: Protobuf decoding consumed too few bytes: {decoded} out of "
            f"{len(data)}; export it again"
        )
    return model


def attribute_value(attr: Any) -> Any:
    """An ``AttributeProto``'s value, as ``onnx.helper.get_attribute_value`` gives it."""
    if attr.ref_attr_name:
        raise ValueError(f"Cannot get value of reference attribute: {attr}")
    fields = {1: "f", 2: "i", 3: "s", 4: "t", 5: "g", 11: "sparse_tensor", 13: "tp"}
    repeated = {6: "floats", 7: "ints", 8: "strings", 9: "tensors", 10: "graphs", 12: "sparse_tensors",
                14: "type_protos"}
    if attr.type in fields:
        return getattr(attr, fields[attr.type])
    if attr.type in repeated:
        return list(getattr(attr, repeated[attr.type]))
    if attr.type == 0:  # UNDEFINED
        return None
    raise ValueError(f"Unsupported ONNX attribute: {attr}")
