"""``edgeward inspect``: what a bundle or release says in the clear, and its verification before it
ships.

Five things can be inspected: a version 1 bundle (``.ewb``); a version 2 single file (``.ewb``,
envelope then payload); a device's envelope with its release's payload (``ENVELOPE --payload
payload.ewp``); a release's payload alone (``payload.ewp``: its signed head); and a whole shared
release directory (``edgeward pack --layout shared --out``), whose payload head, ciphertext digest
and every envelope's inclusion proof are checked, one envelope at a time. Every form is described
by the same fields in text and JSON (:func:`describe`). Only bytes that verified are shown as
verified; without ``--publisher-pub`` the fields are shown as UNVERIFIED.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from device_agent.bundle import release
from device_agent.bundle.format import HEADER_BYTES, read_header, verify_head
from device_agent.bundle.reading import BundleFile, open_bundle, open_payload, open_release, read_envelope
from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.crypto import SIGNATURE_BYTES
from device_agent.errors import EdgeWardError, EnvironmentFault, FormatError, IntegrityError, UsageError
from device_agent.store.fsutil import read_bounded
from device_agent.wire import loads_json, printable

READ_STEP = 1 << 20  # ciphertext bytes hashed at a time
MAX_INDEX_BYTES = 64 * 1024**2  # release.json of 100,000 devices is about 15 MB


def _head_json(data: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(data))
    except ValueError as e:
        raise FormatError(f"{what} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def _envelope_fields(env: release.Envelope) -> dict[str, Any]:
    """What one device's envelope adds to its release's head."""
    return {
        "device_id": env.device_id,
        "device_key": env.device_key,
        "leaf_index": env.index,
        "sealed_key": base64.b64encode(env.sealed_key).decode(),
    }


def _unverified(head: bytes) -> tuple[str, int, str, dict[str, Any]]:
    """(kind, format version, publisher key id, fields) of a signed head, read without trusting it."""
    if head.startswith(release.ENVELOPE_MAGIC):  # envelope, then the payload's signed head
        env_bytes, payload_head = release.split_single(head)
        fields = _head_json(payload_head[release.PAYLOAD_HEADER_BYTES : -SIGNATURE_BYTES], "release head")
        fields.update(_envelope_fields(release.parse_envelope(env_bytes)))
        return "single", 2, bytes(payload_head[16:32]).hex(), fields
    if head.startswith(release.PAYLOAD_MAGIC):
        fields = _head_json(head[release.PAYLOAD_HEADER_BYTES : -SIGNATURE_BYTES], "release head")
        return "payload", 2, head[16:32].hex(), fields
    manifest_len, kid = read_header(head)
    return "bundle", 1, kid.hex(), _head_json(head[HEADER_BYTES : HEADER_BYTES + manifest_len], "manifest")


def _verified(head: bytes, length: int, publishers: list[bytes], limits: BundleLimits) -> dict[str, Any]:
    """The fields of a signed head that verified (raises otherwise); the same keys as
    :func:`_unverified` gives for that kind."""
    if head.startswith(release.PAYLOAD_MAGIC):
        rel, _ = release.verify_payload_head(head, publishers, limits)
        if length - len(head) != rel.payload_length:
            raise FormatError(
                f"payload.ewp holds {length - len(head)} bytes of ciphertext, its signed head says "
                f"{rel.payload_length}; fetch or copy payload.ewp again"
            )
        return rel.to_json()
    manifest, _, _ = verify_head(head, length, publishers, limits)
    if manifest.format_version == 1:
        return manifest.to_json()
    env_bytes, payload_head = release.split_single(head, limits)
    rel, _ = release.verify_payload_head(payload_head, publishers, limits)
    return rel.to_json() | _envelope_fields(release.parse_envelope(env_bytes, limits))


def _check_ciphertext(f: BundleFile, fields: dict[str, Any]) -> str:
    """Hash the ciphertext after the signed head (from the file's position, a step at a time) and
    compare it with the signed ``payload_sha256``; returns the SHA-256 of the whole payload file."""
    body = hashlib.sha256()
    whole = hashlib.sha256(f.head[-_payload_head_bytes(f.head) :])
    left = int(fields["payload_length"])  # verified against the file's length already
    while left and (step := os.read(f.fd, min(READ_STEP, left))):
        body.update(step)
        whole.update(step)
        left -= len(step)
    if left or os.read(f.fd, 1):
        raise FormatError(f"{f.path} changed length while it was read; check it again once it is complete")
    if body.hexdigest() != fields["payload_sha256"]:
        raise IntegrityError(
            f"{f.path}: the ciphertext's SHA-256 is not the signed payload_sha256: the payload was altered "
            "or corrupted; pack the release again (or copy it again)"
        )
    return whole.hexdigest()


def _payload_head_bytes(head: bytes) -> int:
    """How many of the head's last bytes are the payload file's own signed head."""
    if head.startswith(release.ENVELOPE_MAGIC):
        env_len = release.envelope_length(head)
        return len(head) - env_len
    return len(head)


def _open(path: Path, payload: Path | None, stack: ExitStack, limits: BundleLimits) -> BundleFile:
    if payload is not None:
        if path.is_dir():
            raise UsageError("--payload goes with a device's envelope (.ewe), not a release directory")
        return stack.enter_context(open_release(path, payload, limits))
    magic = b""
    if path.is_file():  # anything else: open_bundle names what it is and refuses it
        with open(path, "rb") as f:
            magic = f.read(len(release.PAYLOAD_MAGIC))
    if magic == release.PAYLOAD_MAGIC:
        return stack.enter_context(open_payload(path, limits))
    if magic == release.ENVELOPE_MAGIC and path.stat().st_size <= limits.max_envelope_bytes:
        raise UsageError(
            f"{path} is a device's envelope: inspect it with its release's payload, "
            f"'edgeward inspect {path} --payload payload.ewp', or inspect the release directory"
        )
    return stack.enter_context(open_bundle(path, limits))


def describe(
    path: Path, payload: Path | None, publishers: list[bytes] | None, limits: BundleLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], int]:
    """Describe and (with ``publishers``) verify ``path``; returns (document, exit code)."""
    if path.is_dir():
        if not (path / "payload.ewp").exists():
            raise UsageError(
                f"{path} is a directory, not a regular file, and not a release directory (it has no payload.ewp); "
                "give a .ewb, .ewe or payload.ewp file, or the directory 'edgeward pack --layout shared' wrote"
            )
        if publishers is None:
            raise UsageError(
                f"{path} is a directory: checking a release needs --publisher-pub (the public key it must be "
                "signed by)"
            )
        return check_release(path, publishers, limits)
    with ExitStack() as stack:
        f = _open(path, payload, stack, limits)
        kind, version, kid, fields = _unverified(f.head)
        if payload is not None:
            kind = "envelope"
        doc: dict[str, Any] = {
            "file": str(path),
            "payload": str(payload) if payload is not None else None,
            "kind": kind,
            "format_version": version,
            "publisher_key_id": kid,
            "file_bytes": f.length,
            "verified": None,
            "manifest": fields,
        }
        if publishers is None:
            return doc, 0
        try:
            doc["manifest"] = _verified(f.head, f.length, publishers, limits)
            if version == 2:
                _check_ciphertext(f, doc["manifest"])
        except EdgeWardError as e:
            doc.update(verified=False, error=str(e))
            return doc, e.exit_code
        doc["verified"] = True
        return doc, 0


def _envelopes(d: Path) -> Iterator[os.DirEntry[str]]:
    """The entries of a release's ``envelopes/``, scanned as read, never listed whole. It must be a
    directory itself, not a link to one: an upload that does not follow links would publish
    something else than what was checked."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        st = None
    if st is None or stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "missing" if st is None else "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise FormatError(f"{d} is {what}: a shared release has the directory envelopes/ next to payload.ewp; "
                          "pack the release again (or copy it without links)")
    with os.scandir(d) as entries:
        yield from entries


def _read_index(path: Path) -> dict[str, Any] | None:
    """``release.json``, if there is one: a regular file (not a link, a FIFO or a device) read
    whole only once it is known to be at most :data:`MAX_INDEX_BYTES`."""
    try:
        data = read_bounded(path, MAX_INDEX_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FormatError(f"{path} is a symbolic link: a release directory holds its own release.json; "
                              "pack the release again (or copy it without links)") from e
        raise EnvironmentFault(f"cannot read {path}: {e.strerror}") from e
    doc = loads_json(data, str(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), dict) or not isinstance(doc.get("payload"),
                                                                                                dict):
        raise FormatError(f"{path} is not an EdgeWard release index")
    return doc


def check_release(d: Path, publishers: list[bytes], limits: BundleLimits = DEFAULT_LIMITS) -> tuple[dict[str, Any],
                                                                                                     int]:
    """Check a shared release directory before it ships: the payload's signed head and its
    ciphertext's digest, then every envelope in ``envelopes/`` (one at a time, each bounded before
    it is read): its inclusion proof leads to the signed root, its file is named for its device, no
    leaf appears twice and every leaf is there; ``release.json``, which the rollout tool reads,
    names the same release, payload and envelopes. Stops at the first problem."""
    payload_path = d / "payload.ewp"
    with open_payload(payload_path, limits) as f:
        kid = f.head[16:32].hex()
        doc: dict[str, Any] = {
            "file": str(d),
            "payload": str(payload_path),
            "kind": "release",
            "format_version": 2,
            "publisher_key_id": kid,
            "file_bytes": f.length,
            "verified": None,
            "manifest": _unverified(f.head)[3],
            "envelopes": 0,
        }
        try:
            rel, _ = release.verify_payload_head(f.head, publishers, limits)
            doc["manifest"] = rel.to_json()
            if f.length - len(f.head) != rel.payload_length:
                raise FormatError(
                    f"{payload_path} holds {f.length - len(f.head)} bytes of ciphertext, its signed head says "
                    f"{rel.payload_length}"
                )
            payload_sha256 = _check_ciphertext(f, doc["manifest"])
            index = _read_index(d / "release.json")
            if index is not None and (
                index.get("release_id") != rel.release_id
                or index["payload"].get("sha256") != payload_sha256
                or index["payload"].get("length") != f.length
            ):
                raise FormatError(
                    f"{d / 'release.json'} does not describe this payload.ewp (release id, length or SHA-256); "
                    "the release directory mixes two packs: pack it again"
                )
            seen = bytearray((rel.devices + 7) // 8)
            count = 0
            for entry in _envelopes(d / "envelopes"):
                where = f"envelopes/{printable(entry.name)}"  # a name may hold any byte but '/'
                if not entry.name.endswith(".ewe") or not entry.is_file(follow_symlinks=False):
                    raise FormatError(f"{where} is not a device's envelope: a release directory holds only .ewe files")
                data = read_envelope(entry.path, limits)
                try:
                    env = release.parse_envelope(data, limits)
                    release.prove_envelope(env, rel)
                except EdgeWardError as e:
                    raise type(e)(f"{where}: {e}") from e
                if entry.name != f"{env.device_id}.ewe":
                    raise FormatError(f"{where} holds the envelope of device {env.device_id}: its file is misnamed")
                if seen[env.index // 8] & (1 << env.index % 8):
                    raise FormatError(f"{where}: leaf {env.index} appears in two envelopes")
                seen[env.index // 8] |= 1 << env.index % 8
                if index is not None:
                    listed = index["devices"].get(env.device_id)
                    if not isinstance(listed, dict) or listed.get("length") != len(data) or listed.get(
                        "sha256"
                    ) != hashlib.sha256(data).hexdigest():
                        raise FormatError(f"{where} is not the envelope release.json lists for {env.device_id}")
                count += 1
                doc["envelopes"] = count
            if count != rel.devices:
                raise FormatError(
                    f"envelopes/ holds {count} of the release's {rel.devices} envelopes; pack the release again"
                )
            if index is not None and len(index["devices"]) != count:
                raise FormatError(f"release.json lists {len(index['devices'])} devices, envelopes/ holds {count}")
        except EdgeWardError as e:
            doc.update(verified=False, error=str(e))
            return doc, e.exit_code
        doc["verified"] = True
        return doc, 0


def text(doc: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`'s document: the same fields as its JSON."""
    state = {
        True: "VERIFIED",
        False: f"REFUSED: {doc.get('error')}",
        None: "UNVERIFIED (pass --publisher-pub)",
    }[doc["verified"]]
    lines = [f"{doc['file']}: {state}"]  # every line escaped: unverified fields are anyone's text
    for k in ("kind", "payload", "format_version", "publisher_key_id", "file_bytes", "envelopes"):
        if doc.get(k) is not None:
            lines.append(f"  {k:<17} {doc[k]}")
    for k, v in doc["manifest"].items():
        if k == "sealed_key":
            v = f"<{len(str(v))} base64 chars>"
        lines.append(f"  {k:<17} {v}")
    return "\n".join(printable(line) for line in lines)
