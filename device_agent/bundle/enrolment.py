"""A device's public enrolment: what ``edgeward-agent provision --export`` writes and
``edgeward pack --device`` reads. Self-signed with the device's identity key (proof of possession)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime

from device_agent import crypto
from device_agent.config import DEFAULT_CONFIG, DocumentLimits
from device_agent.errors import FormatError
from device_agent.wire import ID_RE, canonical_json, format_time, loads_json, obj_fields, parse_time, str_field

SCHEMA = "edgeward.enrolment/1"
DOMAIN = b"edgeward/enrolment/v1"


@dataclass(frozen=True)
class Enrolment:
    device_id: str
    box_public: bytes
    sign_public: bytes
    created: datetime

    @property
    def box_fingerprint(self) -> str:
        return crypto.fingerprint(self.box_public)

    @property
    def sign_fingerprint(self) -> str:
        return crypto.fingerprint(self.sign_public)

    def body(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "device_id": self.device_id,
            "box_public": base64.b64encode(self.box_public).decode(),
            "sign_public": base64.b64encode(self.sign_public).decode(),
            "box_fingerprint": self.box_fingerprint,
            "sign_fingerprint": self.sign_fingerprint,
            "created": format_time(self.created),
        }

    def signed_bytes(self, signature: bytes) -> bytes:
        doc = self.body() | {"signature": base64.b64encode(signature).decode()}
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def load_enrolment(
    data: bytes, source: str = "enrolment", limits: DocumentLimits = DEFAULT_CONFIG.documents
) -> Enrolment:
    """Parse and verify an enrolment file (at most ``limits.max_enrolment_bytes``); raises
    FormatError or BadSignature."""
    if len(data) > limits.max_enrolment_bytes:
        raise FormatError(f"{source} is larger than {limits.max_enrolment_bytes} bytes")
    raw = loads_json(data, source, limits)
    fields = {"schema", "device_id", "box_public", "sign_public", "box_fingerprint",
              "sign_fingerprint", "created", "signature"}
    doc = obj_fields(raw, source, fields, fields)
    if doc["schema"] != SCHEMA:
        raise FormatError(f"{source} schema is not {SCHEMA}")
    try:
        box = base64.b64decode(str_field(doc["box_public"], "box_public"), validate=True)
        sign = base64.b64decode(str_field(doc["sign_public"], "sign_public"), validate=True)
        sig = base64.b64decode(str_field(doc["signature"], "signature"), validate=True)
    except ValueError as e:
        raise FormatError(f"{source} has a field that is not base64") from e
    if len(box) != crypto.KEY_BYTES or len(sign) != crypto.KEY_BYTES:
        raise FormatError(f"{source} has a public key of the wrong length")
    enrolment = Enrolment(
        device_id=str_field(doc["device_id"], "device_id", ID_RE),
        box_public=box,
        sign_public=sign,
        created=parse_time(doc["created"], "created"),
    )
    if (doc["box_fingerprint"], doc["sign_fingerprint"]) != (enrolment.box_fingerprint, enrolment.sign_fingerprint):
        raise FormatError(f"{source} fingerprints do not match its keys")
    crypto.verify(sign, DOMAIN, canonical_json(enrolment.body()), sig)
    return enrolment
