"""Supply-chain checks on the input model (NCSC 2.2, 2.3): allow-listed digests, one-file ONNX."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from device_agent.errors import FormatError, SecurityRefusal, UsageError

_LINE = re.compile(r"^([0-9a-fA-F]{64})(?:\s+\*?(.+))?$")


def read_allow_list(path: Path) -> dict[str, str]:
    """``sha256sum``-style lines (``HEX  name``; ``#`` comments) -> {digest: name}."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError(f"--allow-list {path} does not exist") from e
    allowed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise FormatError(
                f"--allow-list {path}:{number}: expected 'SHA256HEX  name', got {line[:60]!r}"
            )
        allowed[m.group(1).lower()] = (m.group(2) or "").strip()
    if not allowed:
        raise FormatError(f"--allow-list {path} lists no digests")
    return allowed


def check_allowed(sha256: str, name: str, allow_list: Path) -> None:
    """Refuse a model whose digest the allow-list does not name."""
    if sha256 not in read_allow_list(allow_list):
        raise SecurityRefusal(
            f"{name} (SHA-256 {sha256}) is not on the allow-list {allow_list}; "
            "review the model and add its digest if it is approved"
        )


def load_onnx(data: bytes, name: str) -> Any:
    """Parse ONNX bytes; a corrupt file is malformed input (exit 3), not an internal error."""
    from ..onnxproto import parse_model

    return parse_model(data, name)


def _side_file(base: Path, location: str, name: str) -> Path:
    """The external-data file ``location`` names, only inside the model's own directory."""
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise SecurityRefusal(
            f"{name}: external data location {location[:80]!r} leaves the model's directory"
        )
    path = base / rel
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as e:
        raise FormatError(f"{name}: its external data file {location[:80]} is missing") from e
    if not real.is_relative_to(base.resolve()) or not real.is_file():
        raise SecurityRefusal(
            f"{name}: external data {location[:80]!r} is not a file in the model's directory"
        )
    return real


def inline_external_data(path: Path, data: bytes, max_bytes: int) -> tuple[bytes, list[str]]:
    """Re-serialise an ONNX model that keeps tensors in side files into one self-contained file.

    Returns (model bytes, external file names). The graph is parsed from the bytes already read
    (and pinned by the caller only once inlined: the digest covers every weight); each side file
    is read once, bounded by ``max_bytes`` in total, and only from the model's own directory.
    The board loads models from bytes in memory, so side files could never follow.
    """
    from ..onnxproto import messages

    external = messages().TensorProto.EXTERNAL

    def uses_external_data(t: Any) -> bool:  # onnx.external_data_helper.uses_external_data
        return bool(t.HasField("data_location") and t.data_location == external)

    model = load_onnx(data, path.name)
    tensors = [
        t
        for g in _graphs(model.graph)
        for t in (*g.initializer, *_constant_tensors(g))
        if uses_external_data(t)
    ]
    if not tensors:
        return data, []
    total = len(data)
    files: dict[str, Any] = {}
    try:
        for t in tensors:
            info = {e.key: e.value for e in t.external_data}
            location = info.get("location", "")
            if location not in files:
                files[location] = open(_side_file(path.parent, location, path.name), "rb")  # noqa: SIM115
            f = files[location]
            try:
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else None
            except ValueError as e:
                raise FormatError(f"{path.name}: bad external data offset/length") from e
            size = os.fstat(f.fileno()).st_size
            want = size - offset if length is None else length
            if not (0 <= offset <= size and 0 <= want <= size - offset):
                raise FormatError(f"{path.name}: external data range is outside {location[:80]}")
            total += want
            if total > max_bytes:
                raise FormatError(
                    f"{path.name} is over {max_bytes} bytes with its external data; "
                    "pick a larger board profile or a smaller model"
                )
            f.seek(offset)
            raw = f.read(want)
            if len(raw) != want:
                raise FormatError(f"{path.name}: external data {location[:80]} is truncated")
            t.raw_data = raw
            t.data_location = messages().TensorProto.DEFAULT
            del t.external_data[:]
    finally:
        for f in files.values():
            f.close()
    out = model.SerializeToString()
    if len(out) >= 2**31 - 1:
        raise FormatError(
            f"{path.name} is 2 GB or more once inlined; ONNX cannot hold it in one file"
        )
    return out, sorted(files)


def _graphs(graph: Any) -> list[Any]:
    """The graph and every sub-graph under it."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                out += _graphs(attr.g)
            for g in attr.graphs:
                out += _graphs(g)
    return out


def _constant_tensors(graph: Any) -> list[Any]:
    return [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
