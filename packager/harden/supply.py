"""Supply-chain checks on the input model (NCSC 2.2, 2.3): allow-listed digests, one-file ONNX."""

from __future__ import annotations

import re
from pathlib import Path

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


def inline_external_data(path: Path, data: bytes) -> tuple[bytes, list[str]]:
    """Re-serialise an ONNX model that keeps tensors in side files into one self-contained file.

    Returns (model bytes, external file names). The board loads models from bytes in memory, so
    side files could never follow; onnx refuses locations outside the model's directory.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load_from_string(data)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        return data, []
    files = sorted({e.value for t in external for e in t.external_data if e.key == "location"})
    try:
        full = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # onnx raises ValidationError/OSError for missing or escaping files
        raise FormatError(
            f"{path.name}: cannot read its external data ({', '.join(files)}): {e}"
        ) from e
    for t in full.graph.initializer:
        if uses_external_data(t):
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    out = full.SerializeToString()
    if len(out) >= 2**31 - 1:
        raise FormatError(
            f"{path.name} is 2 GB or more once inlined; ONNX cannot hold it in one file"
        )
    return out, files
