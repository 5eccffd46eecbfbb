"""Hostile bundles that are *validly signed*: the tests hold the publisher's key, so they can
sign whatever a compromised or careless publisher could.

- :func:`resign` takes a real bundle, changes fields of its manifest (any JSON value, even ones
  the packager would never write) and signs the result again, keeping the payload.
- :func:`with_sidecar` encrypts a real model for a real board under a sealed sidecar the test
  chooses (sealed settings a packager would refuse: threads, task, policy, pre-processing).
- :func:`splice` joins the signed head of one bundle to the payload of another.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import crypto
from device_agent.bundle.enrolment import Enrolment, load_enrolment
from device_agent.bundle.format import (
    CONTENTS_MAGIC,
    FORMAT_VERSION,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    SIDECAR_SCHEMA,
    SIGNING_DOMAIN,
    write_bundle,
)
from device_agent.wire import canonical_json


@dataclass(frozen=True)
class Publisher:
    """A publisher's signing key, as the tests hold it."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return crypto.ed25519_public_raw(self.key)

    @classmethod
    def load(cls, key_dir: Path) -> Publisher:
        from packager.keys import load_private_key

        return cls(load_private_key(key_dir / "publisher.key"))


def parts(bundle: bytes) -> tuple[bytes, dict[str, Any], bytes, bytes]:
    """(header, manifest as JSON, signature, payload) of a bundle, without verifying it."""
    _, _, _, manifest_len, _ = HEADER.unpack_from(bundle, 0)
    end = HEADER_BYTES + manifest_len
    manifest = json.loads(bundle[HEADER_BYTES:end])
    sig_end = end + crypto.SIGNATURE_BYTES
    return bundle[:HEADER_BYTES], manifest, bundle[end:sig_end], bundle[sig_end:]


def sign_head(manifest: dict[str, Any] | bytes, publisher: Publisher, key_id_of: bytes | None = None) -> bytes:
    """Header, manifest and signature for ``manifest`` (a dict is written as canonical JSON; bytes
    are signed exactly as given)."""
    body = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), crypto.key_id(key_id_of or publisher.public))
    return header + body + crypto.sign(publisher.key, SIGNING_DOMAIN, header + body)


def resign(bundle: bytes, publisher: Publisher, payload: bytes | None = None, **changes: Any) -> bytes:
    """``bundle`` with manifest fields replaced by ``changes`` (raw JSON values) and signed again by
    ``publisher``; the payload is kept unless another is given."""
    _, manifest, _, old_payload = parts(bundle)
    manifest.update(changes)
    return sign_head(manifest, publisher) + (old_payload if payload is None else payload)


def splice(head_of: bytes, payload_of: bytes) -> bytes:
    """The signed head (header, manifest, signature) of one bundle and the payload of another."""
    header, manifest, signature, _ = parts(head_of)
    return header + canonical_json(manifest) + signature + parts(payload_of)[3]


def sidecar_json(model: bytes, fmt: str = "onnx", **fields: Any) -> dict[str, Any]:
    """A sidecar as the packager writes it for ``model``, with ``fields`` replaced."""
    doc: dict[str, Any] = {
        "schema": SIDECAR_SCHEMA,
        "model": {"format": fmt, "sha256": crypto.sha256_hex(model), "length": len(model)},
        "task": {"kind": "classifier", "output": 1, "scores": "probabilities"},
        "policy": {},
        "runtime": {"threads": 1},
        "preprocess": None,
        "model_card": None,
    }
    doc.update(fields)
    return doc


def with_sidecar(
    model: bytes,
    enrolment: Path | Enrolment,
    publisher: Publisher,
    sidecar: dict[str, Any],
    *,
    model_id: str = "digits",
    version: int = 1,
    created: datetime | None = None,
    expires: datetime | None = None,
    end_of_life: datetime | None = None,
    profile: str = "rpi4b",
    runtime: str = "onnxruntime",
    cipher: str = crypto.CHACHA20,
) -> bytes:
    """A validly signed, encrypted bundle for one board whose sealed sidecar is exactly
    ``sidecar`` (written as canonical JSON, however hostile its values)."""
    e = enrolment if isinstance(enrolment, Enrolment) else load_enrolment(enrolment.read_bytes())
    side = canonical_json(sidecar)
    contents = CONTENTS_MAGIC + struct.pack(">I", len(side)) + side + model
    out = bytearray()
    write_bundle(
        out.extend,
        sign_manifest=lambda msg: crypto.sign(publisher.key, SIGNING_DOMAIN, msg),
        publisher_public=publisher.public,
        sealed=contents,
        device_id=e.device_id,
        device_box_public=e.box_public,
        model_id=model_id,
        model_version=version,
        created=created or datetime.now(UTC).replace(microsecond=0),
        expires=expires,
        end_of_life=end_of_life,
        profile=profile,
        runtime=runtime,
        cipher=cipher,
        compression="none",
        chunk_size=64 * 1024,
    )
    return bytes(out)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
