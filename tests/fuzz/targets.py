"""Fuzz targets: the parsers an attacker reaches on the board, each fed arbitrary bytes.

A target returns normally or raises an :class:`EdgeWardError` (the refusal the contract
promises); any other exception is a finding. The first byte of the input picks a mode. Modes
marked *signed* sign the rest with a key the target trusts, so the fuzzer also reaches the parser
behind the signature check (what a holder of a trusted key, or a flaw in the check, would reach).

Used by ``tests/fuzz/run_atheris.py`` (coverage-guided, libFuzzer through atheris) and by the
long hypothesis run in ``tests/test_fuzz.py``; ``seeds(name)`` are valid encodings to start from.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import crypto
from device_agent.bundle import enrolment as enrol
from device_agent.bundle import format as bundle
from device_agent.bundle import release
from device_agent.commands import format as cmdfmt
from device_agent.errors import EdgeWardError
from device_agent.runtime import arrays
from device_agent.telemetry import report
from device_agent.wire import canonical_json

# Deterministic keys: a crash input found once reproduces in every later run.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = crypto.ed25519_public_raw(KEY)
NOW = datetime(2027, 1, 1, tzinfo=UTC)
GOLDEN = Path(__file__).resolve().parent.parent / "data" / "v1" / "golden.ewb"
GOLDEN_V2 = Path(__file__).resolve().parent.parent / "data" / "v2" / "golden.ewb"
TOPIC = report.topic("pi-1", "telemetry")


def _signed_head(manifest: bytes) -> bytes:
    header = bundle.HEADER.pack(bundle.MAGIC, bundle.FORMAT_VERSION, 0, len(manifest), crypto.key_id(PUB))
    return header + manifest + crypto.sign(KEY, bundle.SIGNING_DOMAIN, header + manifest)


def fuzz_bundle(data: bytes) -> None:
    """Bundle header, manifest (signed mode) and the sealed contents' sidecar."""
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:  # any bytes as a bundle file
        bundle.verify_bundle(rest, [PUB])
    elif mode == 1:  # signed: rest = 2-byte manifest length, manifest, then payload bytes
        n = int.from_bytes(rest[:2], "big")
        manifest, payload = rest[2 : 2 + n], rest[2 + n :]
        if len(manifest) >= 2:
            bundle.verify_bundle(_signed_head(manifest) + payload, [PUB])
    else:  # decrypted contents: magic, sidecar length, sidecar JSON, model
        bundle.unpack_contents(bytearray(rest), 0, len(rest))


def fuzz_enrolment(data: bytes) -> None:
    enrol.load_enrolment(data)


def fuzz_command(data: bytes) -> None:
    """EWCMD1 commands, EWTIM1 beacons (signed modes reach their JSON), queues and results."""
    mode, rest = (data[0] % 4, data[1:]) if data else (0, b"")
    if mode == 0:
        for item in cmdfmt.decode_queue(rest):
            cmdfmt.verify_signed(item, [PUB])
    elif mode in (1, 2):  # signed command (1) or beacon (2) with this body
        magic, domain = ((cmdfmt.COMMAND_MAGIC, cmdfmt.COMMAND_DOMAIN) if mode == 1
                         else (cmdfmt.BEACON_MAGIC, cmdfmt.BEACON_DOMAIN))
        cmdfmt.verify_signed(magic + crypto.key_id(PUB) + crypto.sign(KEY, domain, rest) + rest, [PUB])
    else:  # a signed command result
        cmdfmt.verify_result(cmdfmt.RESULT_MAGIC + crypto.sign(KEY, cmdfmt.RESULT_DOMAIN, rest) + rest, PUB)


def fuzz_report(data: bytes) -> None:
    """Telemetry payloads: the frame of any bytes, and the reader of an authenticated body."""
    mode, rest = (data[0] % 2, data[1:]) if data else (0, b"")
    if mode == 0:
        report.verify_frame(report.frame(rest), PUB)
    else:
        report.parse_report(rest, TOPIC)


def fuzz_arrays(data: bytes) -> None:
    """The bounded .npy/.npz decoder behind predict --input and the local API."""
    arrays.load_arrays(data)


def _signed_release_head(head: bytes) -> bytes:
    header = release.PAYLOAD_HEADER.pack(release.PAYLOAD_MAGIC, release.FORMAT_VERSION, 0, len(head),
                                         crypto.key_id(PUB))
    return header + head + crypto.sign(KEY, release.SIGNING_DOMAIN, header + head)


def fuzz_release(data: bytes) -> None:
    """Format v2: a single file (envelope, payload head, payload), the release head behind the
    signature (signed mode) with the envelope's inclusion proof, and the envelope's structure."""
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:  # any bytes as a v2 single file
        bundle.verify_bundle(rest, [PUB])
    elif mode == 1:  # signed: 2-byte head length, head, 2-byte envelope length, envelope, payload
        n = int.from_bytes(rest[:2], "big")
        head, rest = rest[2 : 2 + n], rest[2 + n :]
        e = int.from_bytes(rest[:2], "big")
        envelope, payload = rest[2 : 2 + e], rest[2 + e :]
        if len(head) >= 2:
            bundle.verify_bundle(envelope + _signed_release_head(head) + payload, [PUB])
    else:  # the envelope alone
        release.parse_envelope(rest)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "bundle": fuzz_bundle,
    "release": fuzz_release,
    "enrolment": fuzz_enrolment,
    "command": fuzz_command,
    "report": fuzz_report,
    "arrays": fuzz_arrays,
}


def check(name: str, data: bytes) -> None:
    """Run one input; an EdgeWardError is the expected refusal, anything else propagates."""
    with contextlib.suppress(EdgeWardError):
        TARGETS[name](data)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def seeds(name: str) -> list[bytes]:
    """Valid (and nearly valid) inputs for ``name``, mode byte included."""
    if name == "bundle":
        golden = GOLDEN.read_bytes()
        n, _ = bundle.parse_header(golden)
        manifest = json.loads(golden[bundle.HEADER_BYTES : bundle.HEADER_BYTES + n])
        manifest["publisher"] = crypto.fingerprint(PUB)
        m = canonical_json(manifest)
        payload = golden[bundle.HEADER_BYTES + n + crypto.SIGNATURE_BYTES :]
        model = b"\x08\x07model"
        sidecar = bundle.Sidecar("onnx", crypto.sha256_hex(model), len(model), task={"labels": ["a", "b"]},
                                 preprocess={"schema": "edgeward.preprocess/1", "steps": []})
        contents = bytes(bundle.pack_contents(sidecar, model))
        return [b"\x00" + golden, b"\x01" + len(m).to_bytes(2, "big") + m + payload, b"\x02" + contents]
    if name == "release":
        golden = GOLDEN_V2.read_bytes()
        env_len = release.envelope_length(golden)
        envelope = golden[:env_len]
        end = env_len + release.payload_head_length(golden[env_len:])
        head = json.loads(golden[env_len + release.PAYLOAD_HEADER_BYTES : end - crypto.SIGNATURE_BYTES])
        head["publisher"] = crypto.fingerprint(PUB)
        h = canonical_json(head)
        signed = b"\x01" + len(h).to_bytes(2, "big") + h + len(envelope).to_bytes(2, "big") + envelope + golden[end:]
        return [b"\x00" + golden, signed, b"\x02" + envelope]
    if name == "enrolment":
        sign_key = Ed25519PrivateKey.from_private_bytes(bytes(32))
        e = enrol.Enrolment("pi-1", bytes(range(32)), crypto.ed25519_public_raw(sign_key), NOW)
        return [e.signed_bytes(crypto.sign(sign_key, enrol.DOMAIN, canonical_json(e.body())))]
    if name == "command":
        cmd = cmdfmt.Command("retire", "pi-1", 1, NOW, NOW + timedelta(days=1), {"model_id": "m"}, "0" * 32)
        rot = cmdfmt.Command("rotate-key", "pi-1", 2, NOW, NOW + timedelta(days=1),
                             {"role": "operator", "keys": [base64.b64encode(PUB).decode()]}, "1" * 32)
        beacon = cmdfmt.Beacon(NOW, "2" * 32)
        result = cmdfmt.Result("pi-1", 1, "retire", "a" * 64, "applied", "", NOW, {"model_id": "m"})
        queue = cmdfmt.encode_queue([cmdfmt.encode_command(cmd, KEY, PUB), cmdfmt.encode_beacon(beacon, KEY, PUB)])
        return [b"\x00" + queue, b"\x01" + canonical_json(cmd.body()), b"\x01" + canonical_json(rot.body()),
                b"\x02" + canonical_json(beacon.body()), b"\x03" + canonical_json(result.body())]
    if name == "report":
        r = report.Report("pi-1", 7, "telemetry", NOW, {"predictions": 3, "latency_ms": {"p50": 1.5}})
        return [b"\x00" + report.encode_report(r, KEY), b"\x01" + canonical_json(r.body())]
    if name == "arrays":
        zipped = io.BytesIO()
        np.savez_compressed(zipped, x=np.zeros((2, 3), np.float32), y=np.arange(4))
        stored = io.BytesIO()
        with zipfile.ZipFile(stored, "w") as z:
            z.writestr("x.npy", _npy(np.ones(5, np.uint8)))
        return [_npy(np.arange(6, dtype=np.float32).reshape(2, 3)), _npy(np.asfortranarray(np.eye(3))),
                zipped.getvalue(), stored.getvalue()]
    raise KeyError(name)
