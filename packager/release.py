"""``edgeward pack --layout shared|single-v2``: one release in bundle format version 2.

The model is sealed and encrypted once, under a fresh content key, into ``payload.ewp``; each
device gets an envelope (``envelopes/<device-id>.ewe``) holding the content key sealed to its
key and the inclusion proof of its leaf in the Merkle tree whose root the publisher signs once
(``device_agent/bundle/release.py`` defines the format; ``docs/bundle-format.md``, "Version 2").

Memory stays flat in the device count: enrolments are read one at a time, each device's leaf
bytes go to a scratch file, and only the 32-byte leaf hashes (and the tree above them, as many
again) stay in memory. Envelopes are written without an fsync each: the whole staging directory's
filesystem is synced once (``syncfs``), then the directories, before anything is moved into
``--out`` -- the same all-or-nothing result as one fsync per file at a fraction of the cost.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from device_agent import crypto
from device_agent.bundle import release
from device_agent.errors import UsageError
from device_agent.store.fsutil import atomic_write, fsync_dir
from device_agent.wire import format_time

from .modelfile import ModelFile
from .pack import CHUNK_SIZE, PackOptions, PackResult, prepare, read_enrolment
from .profiles import Profile
from .signers import Signer

LAYOUTS = ("v1", "shared", "single-v2")
INDEX_SCHEMA = "edgeward.release-index/1"
COPY_STEP = 1 << 20


def iter_devices(files: list[str] | None, devices_dir: str | None) -> Iterator[str]:
    """The enrolment files of ``--device`` and ``--devices-dir``, one at a time: a directory is
    scanned as it is read (its ``*.json`` files in directory order), never listed whole. Plain
    strings: a ``Path`` interns its parts, which would keep every name of a large fleet."""
    yield from files or []
    if devices_dir:
        d = Path(devices_dir)
        if not d.is_dir():
            raise UsageError(f"--devices-dir {d} is not a directory")
        with os.scandir(d) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file():
                    yield entry.path


def sync_filesystem(path: Path) -> None:
    """Flush every written file of the filesystem holding ``path`` to disk in one call
    (Linux ``syncfs``; ``sync`` where it is missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
    finally:
        os.close(fd)


def _create(path: Path) -> IO[bytes]:
    """A new file (never an existing one: two enrolments of one device meet here)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError as e:
        raise UsageError(f"device {path.stem} is enrolled twice: give each device's enrolment once") from e
    return os.fdopen(fd, "wb")


def pack_release(
    model: ModelFile,
    profile: Profile,
    signer: Signer,
    enrolments: Iterable[str | Path],
    opts: PackOptions,
    out_dir: Path,
    *,
    layout: str = "shared",
    progress: Callable[[Iterable[str | Path]], Iterable[str | Path]] = lambda it: it,
    now: datetime | None = None,
) -> PackResult:
    """Pack ``model`` as one version 2 release for every enrolled device into ``out_dir`` (all or
    nothing), signed once by ``signer``. ``shared`` writes ``payload.ewp``, ``envelopes/`` and the
    release index ``release.json``; ``single-v2`` writes one single file ``<device-id>.ewb``
    (envelope then payload) per device, for installing without a network. Both write
    ``report.json``, the asset record with one entry per device (:func:`_record`); the returned
    report is the same without those entries."""
    if layout not in ("shared", "single-v2"):
        raise UsageError(f"--layout {layout} is not a version 2 layout (shared, single-v2)")
    t0 = time.perf_counter()
    prep = prepare(model, profile, opts, now)
    publisher_public = signer.public_raw
    release_id = uuid.uuid4().hex
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o755)  # explicit: the umask may be 000
    staging = Path(tempfile.mkdtemp(prefix=".edgeward-staging-", dir=out_dir))
    try:
        scratch = staging / ".scratch"
        scratch.mkdir(mode=0o700)
        # 1. The payload, encrypted once under a fresh content key.
        key = crypto.new_content_key()
        try:
            cipher_path = scratch / "ciphertext"
            body_hash = hashlib.sha256()
            with _create(cipher_path) as f:

                def write(chunk: memoryview, f: IO[bytes] = f) -> None:
                    body_hash.update(chunk)
                    f.write(chunk)

                tags = crypto.encrypt_payload(
                    profile.cipher, key, release.PAYLOAD_AAD_PREFIX_V2 + bytes.fromhex(release_id), prep.sealed,
                    CHUNK_SIZE, write,
                )
            payload_length = cipher_path.stat().st_size
            # 2. One leaf per device, streamed: its bytes and its hash to scratch files.
            count = 0
            with _create(scratch / "leaves") as records, _create(scratch / "hashes") as hashes:
                for path in progress(enrolments):
                    dev = read_enrolment(path)
                    leaf = release.leaf_bytes(
                        release_id, count, dev.box_public, crypto.seal_content_key(dev.box_public, key), dev.device_id
                    )
                    records.write(leaf)
                    hashes.write(release.leaf_hash(leaf))
                    count += 1
        finally:
            crypto.wipe(key)
        if count == 0:
            raise UsageError("no devices to pack for: pass --device FILE or --devices-dir DIR")
        t1 = time.perf_counter()
        # 3. The release head, with the Merkle root over every leaf, signed once. The leaf hashes
        # (32 bytes a device) and the levels above them (as many again) are all that is held.
        leaves = bytearray(count * crypto.HASH_BYTES)
        with (scratch / "hashes").open("rb") as f:
            if f.readinto(leaves) != len(leaves):
                raise OSError(f"scratch file {scratch / 'hashes'} is short")
        tree = crypto.MerkleTree(leaves)
        head = release.ReleaseHead(
            release_id=release_id,
            model_id=opts.model_id,
            model_version=opts.model_version,
            created=prep.created,
            expires=opts.expires,
            end_of_life=opts.end_of_life,
            publisher=crypto.fingerprint(publisher_public),
            profile=profile.name,
            runtime=prep.runtime,
            cipher=profile.cipher,
            compression=prep.compression,
            chunk_size=CHUNK_SIZE,
            sealed_length=len(prep.sealed),
            payload_length=payload_length,
            payload_sha256=body_hash.hexdigest(),
            tags_sha256=tags,
            devices=count,
            merkle_root=tree.root.hex(),
        )
        signed = release.sign_head(head, publisher_public, lambda msg: crypto.sign(signer, release.SIGNING_DOMAIN, msg))
        payload_path = scratch / "payload.ewp" if layout == "single-v2" else staging / "payload.ewp"
        file_hash = hashlib.sha256(signed)
        with _create(payload_path) as out, cipher_path.open("rb") as src:
            out.write(signed)
            while step := src.read(COPY_STEP):
                file_hash.update(step)
                out.write(step)
        cipher_path.unlink()
        payload_bytes = len(signed) + payload_length
        # 4. The envelopes (or single files), in leaf order, each with its inclusion proof.
        env_dir = staging / "envelopes"
        if layout == "shared":
            env_dir.mkdir(mode=0o755)
        envelope_bytes = 0
        device_bytes = 0  # what each device is given to fetch: its envelope, or its single file
        with (
            (scratch / "leaves").open("rb") as records,
            _index(staging, layout) as index,
            _create(scratch / "bundles") as bundles,
        ):
            index.begin(head, payload_bytes, file_hash.hexdigest())
            for i in range(count):
                fixed = records.read(release.LEAF.size)
                leaf = fixed + records.read(fixed[-1])
                envelope = release.build_envelope(leaf, tree.proof(i))
                device_id = leaf[release.LEAF.size :].decode("ascii")
                envelope_bytes += len(envelope)
                if layout == "shared":
                    name = f"envelopes/{device_id}.ewe"
                    with _create(env_dir / f"{device_id}.ewe") as f:
                        f.write(envelope)
                    index.device(device_id, envelope)
                    digest, size = hashlib.sha256(envelope).hexdigest(), len(envelope)
                else:
                    name = f"{device_id}.ewb"
                    digest, size = _write_single(staging / name, envelope, payload_path)
                device_bytes += size
                bundles.write(_record(leaf, i, name, size, digest) + b"\n")
        t2 = time.perf_counter()
        report: dict[str, Any] = {
            "schema": "edgeward.pack-report/1",
            "layout": layout,
            "created": format_time(prep.created),
            "model": {
                "id": opts.model_id,
                "version": opts.model_version,
                "format": model.format,
                "sha256": model.sha256,
                "size_bytes": len(model.data),
                "sealed_bytes": len(prep.sealed),
                "compression": prep.compression,
            },
            "profile": profile.name,
            "runtime": prep.runtime,
            "cipher": profile.cipher,
            "publisher": crypto.fingerprint(publisher_public),
            "publisher_signer": signer.uri,
            "expires": format_time(opts.expires) if opts.expires else None,
            "end_of_life": format_time(opts.end_of_life) if opts.end_of_life else None,
            "release": {
                "release_id": release_id,
                "devices": count,
                "payload_bytes": payload_bytes,
                "envelope_bytes": envelope_bytes,
                "output_bytes": device_bytes + (payload_bytes if layout == "shared" else 0),
                "bytes_per_device": round(device_bytes / count, 1),
                "index": "release.json" if layout == "shared" else None,
            },
            "bundles": BUNDLES_STREAMED,
            "hardening": opts.hardening,
            "seconds": {"prepare": round(t1 - t0, 4), "bundles": round(t2 - t1, 4)},
        }
        atomic_write(staging / "model-card.cdx.json", (json.dumps(prep.card, indent=2) + "\n").encode(), 0o644)
        write_report(staging / "report.json", report, scratch / "bundles")
        shutil.rmtree(scratch)
        # One sync of the filesystem for every file written, then the directories that name them.
        sync_filesystem(staging)
        if layout == "shared":
            fsync_dir(env_dir)
        fsync_dir(staging)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    del report["bundles"]  # the device records are in report.json only: never all held in memory
    return PackResult(out_dir, [], report)


# report.json's "bundles" is streamed from a scratch file of one record a line; the in-memory
# report holds this marker in its place (a string JSON renders unambiguously).
BUNDLES_STREAMED = "\x00bundles"


def _record(leaf: bytes, index: int, name: str, size: int, sha256: str) -> bytes:
    """One device's asset record: who it is, the key its content key is sealed to, what it was
    given (a file under ``--out``), its length and SHA-256."""
    rid, _, key_digest, _, _ = release.LEAF.unpack_from(leaf)
    doc = {
        "device_id": leaf[release.LEAF.size :].decode("ascii"),
        "device_key": "sha256:" + bytes(key_digest).hex(),
        "bundle_id": bytes(rid).hex(),  # a v2 release's id is the bundle id the board reports
        "leaf_index": index,
        "file": name,
        "size": size,
        "sha256": sha256,
    }
    return json.dumps(doc).encode("ascii")


def _write_single(path: Path, envelope: bytes, payload_path: Path) -> tuple[str, int]:
    """A v2 single file (envelope, then the payload file); returns its SHA-256 and length."""
    digest = hashlib.sha256(envelope)
    size = len(envelope)
    with _create(path) as f, payload_path.open("rb") as src:
        f.write(envelope)
        while step := src.read(COPY_STEP):
            digest.update(step)
            f.write(step)
            size += len(step)
    return digest.hexdigest(), size


def write_report(path: Path, report: dict[str, Any], records: Path) -> None:
    """Write ``report`` as JSON with the device records of ``records`` (one JSON object a line) in
    place of its ``bundles`` marker, copied a line at a time: memory flat in the device count.
    The file lands in the staging directory, synced and moved into ``--out`` with the rest."""
    before, after = json.dumps(report, indent=2).split(json.dumps(BUNDLES_STREAMED), 1)
    with path.open("x", encoding="ascii") as out, records.open("rb") as src:
        os.chmod(path, 0o644)
        out.write(before + "[")
        first = True
        for line in src:
            out.write(("\n    " if first else ",\n    ") + line.decode("ascii").rstrip("\n"))
            first = False
        out.write("\n  ]" + after + "\n")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged release into ``out_dir``; a previous release's envelopes there go with it
    (moved aside into the staging directory, removed with it)."""
    old = out_dir / "envelopes"
    if (staging / "envelopes").exists() and old.is_dir():
        os.replace(old, staging / ".replaced-envelopes")
    for entry in sorted(staging.iterdir()):
        if not entry.name.startswith("."):
            os.replace(entry, out_dir / entry.name)
    fsync_dir(out_dir)


class _Index:
    """The release index (``release.json``), written as it goes: one entry per device."""

    def __init__(self, f: IO[str] | None) -> None:
        self.f = f
        self.first = True

    def begin(self, head: release.ReleaseHead, payload_bytes: int, payload_sha256: str) -> None:
        if self.f is None:
            return
        doc = {
            "schema": INDEX_SCHEMA,
            "release_id": head.release_id,
            "model_id": head.model_id,
            "model_version": head.model_version,
            "created": format_time(head.created),
            "expires": format_time(head.expires) if head.expires else None,
            "end_of_life": format_time(head.end_of_life) if head.end_of_life else None,
            "payload": {"file": "payload.ewp", "length": payload_bytes, "sha256": payload_sha256},
        }
        self.f.write(json.dumps(doc, indent=1)[:-2] + ',\n "devices": {')

    def device(self, device_id: str, envelope: bytes) -> None:
        if self.f is None:
            return
        entry = {"file": f"envelopes/{device_id}.ewe", "length": len(envelope),
                 "sha256": hashlib.sha256(envelope).hexdigest()}
        self.f.write(("\n  " if self.first else ",\n  ") + json.dumps(device_id) + ": " + json.dumps(entry))
        self.first = False

    def end(self) -> None:
        if self.f is not None:
            self.f.write("\n }\n}\n")


@contextmanager
def _index(staging: Path, layout: str) -> Iterator[_Index]:
    """The release index of a shared layout (a single-v2 run has none), completed on success."""
    if layout != "shared":
        yield _Index(None)
        return
    path = staging / "release.json"
    with path.open("x", encoding="ascii") as f:
        os.chmod(path, 0o644)
        index = _Index(f)
        yield index
        index.end()
