"""Incident records: a board's security events over a time range, exported as signed JSON.

NCSC 5.2 (lessons learned): what the monitor and the board recorded about an incident leaves
the store as a document an investigator can check on its own, long after retention has pruned
the store. The document is canonical JSON (``device_agent.wire.canonical_json``) carried
base64 in an envelope with the operator key's Ed25519 signature over it, made and checked with
the project's signing recipe in its own domain (``edgeward/incident-export/v1``), so that no
command, beacon or bundle signature can pass for an export, nor the other way round.

:func:`export_events` and :func:`verify_export` are pure: the store's rows, the time and the key
in; bytes or a verified document out.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import TYPE_CHECKING, Any

from device_agent import crypto
from device_agent.errors import BadSignature, FormatError
from device_agent.wire import canonical_json, format_time, loads_json

if TYPE_CHECKING:
    from packager.signers import Signer

EXPORT_DOMAIN = b"edgeward/incident-export/v1"
FORMAT = "edgeward-incidents/1"
PAYLOAD_TYPE = "application/vnd.edgeward.incidents+json"
MAX_EXPORT_BYTES = 64 * 1024 * 1024  # what verify-export reads at most
MAX_EVENTS = 100_000  # what one export holds at most


def export_document(
    events: list[dict[str, Any]],
    device_id: str | None,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
    store_name: str,
) -> dict[str, Any]:
    """The unsigned document: the selection and every event in it, oldest first."""
    return {
        "format": FORMAT,
        "device_id": device_id,
        "since": format_time(since) if since else None,
        "until": format_time(until) if until else None,
        "exported": format_time(now),
        "store": store_name,
        "count": len(events),
        "events": events,
    }


def sign_export(doc: dict[str, Any], signer: Signer) -> bytes:
    """The signed envelope, as the bytes to write (the operator's key, from a file or a token)."""
    payload = canonical_json(doc)
    public = signer.public_raw
    envelope = {
        "payload_type": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": crypto.fingerprint(public),
                "sig": base64.b64encode(crypto.sign(signer, EXPORT_DOMAIN, payload)).decode(),
            }
        ],
    }
    return canonical_json(envelope) + b"\n"


def verify_export(blob: bytes, operator_public: bytes) -> dict[str, Any]:
    """The exported document, once the operator key's signature over its exact bytes verifies;
    :class:`BadSignature` or :class:`FormatError` otherwise (nothing of the payload is read
    before)."""
    if len(blob) > MAX_EXPORT_BYTES:
        raise FormatError(f"an incident export is at most {MAX_EXPORT_BYTES} bytes; this one is {len(blob)}")
    env = loads_json(blob, "incident export")
    if not isinstance(env, dict) or set(env) != {"payload_type", "payload", "signatures"}:
        raise FormatError("incident export: expected an envelope with payload_type, payload and signatures")
    if env["payload_type"] != PAYLOAD_TYPE:
        raise FormatError(f"incident export: payload_type must be {PAYLOAD_TYPE}")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= 8 or not isinstance(env["payload"], str):
        raise FormatError("incident export: payload must be base64 text and signatures a list of 1 to 8")
    try:
        payload = base64.b64decode(env["payload"], validate=True)
        signatures = [base64.b64decode(s["sig"], validate=True) for s in sigs if isinstance(s, dict)]
    except (binascii.Error, KeyError, TypeError) as e:
        raise FormatError(f"incident export: bad base64: {e}") from e
    for sig in signatures:
        try:
            crypto.verify(operator_public, EXPORT_DOMAIN, payload, sig)
        except BadSignature:
            continue
        doc = loads_json(payload, "incident export payload")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"incident export payload is not {FORMAT}")
        return doc
    raise BadSignature(
        "incident export: no signature verifies with this operator key; the file was changed or "
        "signed with another key"
    )
