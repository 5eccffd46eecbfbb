"""``edgeward pack``: one signed bundle per device, encrypted to that device's key.

The model is read, checked and sealed once; each device then costs one fresh content key, one
encryption pass and one file. Everything is written into a staging directory inside ``--out``
and moved into place only after the whole run has succeeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.bundle.enrolment import Enrolment, load_enrolment
from device_agent.bundle.format import SIGNING_DOMAIN, Sidecar, pack_contents, write_bundle
from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import EdgeWardError, FormatError, UsageError
from device_agent.runtime import settings as sealed_settings
from device_agent.store.fsutil import atomic_write, fsync_dir
from device_agent.wire import ID_RE, format_time

from . import __version__
from .harden.modelcard import CardFacts
from .harden.modelcard import build as build_card
from .jsonfile import read_json_object
from .modelfile import ModelFile
from .profiles import Profile
from .signers import Signer

CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class PackOptions:
    model_id: str
    model_version: int
    expires: datetime | None = None
    end_of_life: datetime | None = None
    task: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    compression: str = "auto"  # auto (zlib when it pays), zlib or none: see seal()
    created: datetime | None = None
    preprocess: dict[str, Any] | None = None  # sealed pre-processing (packager.harden)
    card_facts: CardFacts | None = None  # what hardening measured, for the model card
    hardening: dict[str, Any] | None = None  # the hardening report, kept in report.json

    def __post_init__(self) -> None:
        if not ID_RE.match(self.model_id):
            raise UsageError("--model-id must be 1-64 letters, digits, '.', '_' or '-'")
        if not 1 <= self.model_version <= 2**53:
            raise UsageError("--model-version must be a positive integer")
        if self.expires and self.end_of_life and self.end_of_life < self.expires:
            raise UsageError("--end-of-life is before --expires: a bundle cannot outlive its model")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}")


def read_enrolment(path: str | Path) -> Enrolment:
    """Read and verify one enrolment file, bounded by the board's document limits."""
    limits = DEFAULT_CONFIG.documents
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_enrolment_bytes + 1)  # one byte over: load_enrolment refuses it
    except FileNotFoundError as e:
        raise UsageError(f"enrolment {path} does not exist") from e
    try:
        return load_enrolment(data, str(path), limits)
    except EdgeWardError as err:
        raise type(err)(f"{path}: {err}") from err


def load_enrolments(files: Iterable[Path]) -> list[Enrolment]:
    """Read and verify every enrolment before anything is written; duplicates are refused.
    Enrolments are a board format: the board's limits bound them."""
    seen: dict[str, Path] = {}
    out: list[Enrolment] = []
    for path in files:
        enrolment = read_enrolment(path)
        if enrolment.device_id in seen:
            raise UsageError(
                f"device {enrolment.device_id} is enrolled twice: "
                f"{seen[enrolment.device_id]} and {path}"
            )
        seen[enrolment.device_id] = path
        out.append(enrolment)
    if not out:
        raise UsageError("no devices to pack for: pass --device FILE or --devices-dir DIR")
    return out


def build_sidecar(
    model: ModelFile, profile: Profile, opts: PackOptions, model_card: dict[str, Any] | None
) -> Sidecar:
    return Sidecar(
        model_format=model.format,
        model_sha256=model.sha256,
        model_length=len(model.data),
        task=opts.task,
        policy=opts.policy,
        runtime={"threads": profile.threads},
        preprocess=opts.preprocess,
        model_card=model_card,
    )


# Compression (the bundle's "none" or "zlib"). zlib saves at least MIN_SAVING of small contents
# for next to nothing. On large contents it costs: on float32 weights it saves only 5-8% (their
# exponent bytes) at any level, deflating at about 45 MB/s on a 2-core host, and every load on the
# board then inflates the whole model. So past WHOLE_BYTES, spread-out SAMPLE_SLICES of
# SAMPLE_BYTES are deflated at level 1 first, and the whole is compressed only when they save at
# least PAYING_SAVING (quantised weights and text save 15% and more).
COMPRESSIONS = ("auto", "zlib", "none")
MIN_SAVING = 0.05
PAYING_SAVING = 0.10
WHOLE_BYTES = 1024 * 1024
SAMPLE_SLICES = 16
SAMPLE_BYTES = 64 * 1024


def estimate_saving(contents: bytes | bytearray) -> float:
    """The fraction of ``contents`` that zlib would save, estimated from SAMPLE_SLICES slices of
    SAMPLE_BYTES spread evenly from its first byte to its last, deflated at level 1."""
    view = memoryview(contents)
    if len(view) <= SAMPLE_SLICES * SAMPLE_BYTES:  # no larger than the sample: the whole
        return 1.0 - len(zlib.compress(view, 1)) / max(len(view), 1)
    step = (len(view) - SAMPLE_BYTES) / (SAMPLE_SLICES - 1)
    sampled = packed = 0
    for i in range(SAMPLE_SLICES):
        start = round(i * step)
        piece = view[start : start + SAMPLE_BYTES]
        sampled += len(piece)
        packed += len(zlib.compress(piece, 1))
    return 1.0 - packed / sampled


def seal(sidecar: Sidecar, model: bytes, compression: str = "auto") -> tuple[bytes | bytearray, str]:
    """The plaintext to encrypt and how it is compressed. ``auto``: zlib when it pays (see
    above) and saves at least MIN_SAVING; ``zlib``: whenever it saves at least MIN_SAVING;
    ``none``: never."""
    if compression not in COMPRESSIONS:
        raise UsageError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    contents = pack_contents(sidecar, model)
    if compression == "none":
        return contents, "none"
    if compression == "auto" and len(contents) > WHOLE_BYTES and estimate_saving(contents) < PAYING_SAVING:
        return contents, "none"
    packed = zlib.compress(contents, 6)
    if len(packed) <= (1 - MIN_SAVING) * len(contents):
        return packed, "zlib"
    return contents, "none"


def model_card(
    model: ModelFile, profile: Profile, opts: PackOptions, created: datetime
) -> dict[str, Any]:
    """A CycloneDX 1.6 ML-BOM describing the model as an asset (NCSC 2.5)."""
    facts = opts.card_facts or CardFacts(
        input_sha256=model.sha256,
        input_name=model.path.name,
        input_bytes=len(model.data),
        output_sha256=model.sha256,
        output_bytes=len(model.data),
        model_format=model.format,
        task=str(opts.task.get("kind", "classifier")),
        scores=opts.task.get("scores"),
    )
    return build_card(
        facts,
        model_id=opts.model_id,
        model_version=opts.model_version,
        profile=profile.name,
        runtime=profile.runtime_for(model.format),
        created=created,
        tool_version=__version__,
        end_of_life=opts.end_of_life,
        expires=opts.expires,
    )


@dataclass(frozen=True)
class Prepared:
    """The model checked against its profile and sealed once, for every device of a run."""

    runtime: str
    created: datetime
    card: dict[str, Any]
    sealed: bytes | bytearray
    compression: str


def prepare(model: ModelFile, profile: Profile, opts: PackOptions, now: datetime | None = None) -> Prepared:
    """Check the model against the profile, build its model card and sidecar, and seal them."""
    if len(model.data) > profile.max_model_bytes:
        raise UsageError(
            f"model is {len(model.data)} bytes, over profile {profile.name}'s limit of "
            f"{profile.max_model_bytes}; quantise or prune it, or pick a larger board"
        )
    runtime = profile.runtime_for(model.format)
    created = opts.created or now or datetime.now().astimezone()
    card = model_card(model, profile, opts, created)
    sidecar = build_sidecar(model, profile, opts, card)
    try:  # the board refuses these at install: never write a bundle it would refuse
        sealed_settings.check(sidecar, None)
    except FormatError as e:
        raise UsageError(f"{e} (from --task, --labels, --policy or the pre-processing)") from e
    sealed, compression = seal(sidecar, model.data, opts.compression)
    return Prepared(runtime, created, card, sealed, compression)


@dataclass
class PackResult:
    out_dir: Path
    bundles: list[dict[str, Any]]
    report: dict[str, Any]


def pack(
    model: ModelFile,
    profile: Profile,
    signer: Signer,
    devices: list[Enrolment],
    opts: PackOptions,
    out_dir: Path,
    *,
    progress: Callable[[Iterable[Enrolment]], Iterable[Enrolment]] = lambda it: it,
    now: datetime | None = None,
) -> PackResult:
    """Pack ``model`` for every enrolled device into ``out_dir`` (all or nothing), each bundle
    signed by ``signer`` (a key file or a key in a PKCS#11 token: the same signature either way)."""
    t0 = time.perf_counter()
    prepared = prepare(model, profile, opts, now)
    runtime, created, card = prepared.runtime, prepared.created, prepared.card
    sealed, compression = prepared.sealed, prepared.compression
    publisher_public = signer.public_raw

    def sign_manifest(msg: bytes) -> bytes:
        return crypto.sign(signer, SIGNING_DOMAIN, msg)

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o755)  # explicit: the umask may be 000
    staging = Path(tempfile.mkdtemp(prefix=".edgeward-staging-", dir=out_dir))
    records: list[dict[str, Any]] = []
    try:
        t1 = time.perf_counter()
        for dev in progress(devices):
            name = f"{dev.device_id}.ewb"
            digest = hashlib.sha256()
            size = 0
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:

                def write(chunk: bytes | memoryview, f: Any = f, digest: Any = digest) -> None:
                    nonlocal size
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)

                m = write_bundle(
                    write,
                    sign_manifest=sign_manifest,
                    publisher_public=publisher_public,
                    sealed=sealed,
                    device_id=dev.device_id,
                    device_box_public=dev.box_public,
                    model_id=opts.model_id,
                    model_version=opts.model_version,
                    created=created,
                    expires=opts.expires,
                    end_of_life=opts.end_of_life,
                    profile=profile.name,
                    runtime=runtime,
                    cipher=profile.cipher,
                    compression=compression,
                    chunk_size=CHUNK_SIZE,
                )
                f.flush()
                os.fsync(f.fileno())
            records.append(
                {
                    "device_id": dev.device_id,
                    "device_key": dev.box_fingerprint,
                    "bundle_id": m.bundle_id,
                    "file": name,
                    "size": size,
                    "sha256": digest.hexdigest(),
                }
            )
        t2 = time.perf_counter()
        report = {
            "schema": "edgeward.pack-report/1",
            "created": format_time(created),
            "model": {
                "id": opts.model_id,
                "version": opts.model_version,
                "format": model.format,
                "sha256": model.sha256,
                "size_bytes": len(model.data),
                "sealed_bytes": len(sealed),
                "compression": compression,
            },
            "profile": profile.name,
            "runtime": runtime,
            "cipher": profile.cipher,
            "publisher": crypto.fingerprint(publisher_public),
            "publisher_signer": signer.uri,  # which key signed: a file or a token object (no PIN)
            "expires": format_time(opts.expires) if opts.expires else None,
            "end_of_life": format_time(opts.end_of_life) if opts.end_of_life else None,
            "bundles": records,
            "hardening": opts.hardening,
            "seconds": {"prepare": round(t1 - t0, 4), "bundles": round(t2 - t1, 4)},
        }
        atomic_write(staging / "model-card.cdx.json", (json.dumps(card, indent=2) + "\n").encode(), 0o644)
        atomic_write(staging / "report.json", (json.dumps(report, indent=2) + "\n").encode(), 0o644)
        fsync_dir(staging)
        for entry in sorted(staging.iterdir()):
            os.replace(entry, out_dir / entry.name)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PackResult(out_dir, records, report)


def build_policy(
    policy_file: str | None, calibration_file: str | None, sensor_noise: float | None = None
) -> dict[str, Any]:
    """The sealed serving policy: a JSON file (roles, bands, throttle, audit retention) plus, from
    ``--calibrate-ood``, OoD and probing thresholds calibrated on validation inputs (``x``), with
    the sensor's read noise (``--sensor-noise``) when the publisher measured it."""
    policy: dict[str, Any] = read_json_object(policy_file, "--policy") or {}
    if sensor_noise is not None and not calibration_file:
        raise UsageError("--sensor-noise is sealed in the OoD calibration: give --calibrate-ood too")
    if calibration_file:
        from device_agent.service.detect import calibrate

        from .arrays import load_npz

        z = load_npz(calibration_file, "--calibrate-ood")
        if not z:
            raise FormatError(f"--calibrate-ood {calibration_file}: need an .npz with validation inputs x")
        x = z["x"] if "x" in z else next(iter(z.values()))
        policy["ood"] = calibrate(x, read_noise=sensor_noise)
    return policy


def discover_devices(files: list[str] | None, devices_dir: str | None) -> list[Path]:
    paths = [Path(f) for f in files or []]
    if devices_dir:
        d = Path(devices_dir)
        if not d.is_dir():
            raise UsageError(f"--devices-dir {d} is not a directory")
        found = sorted(d.glob("*.json"))
        if not found:
            raise UsageError(f"--devices-dir {d} holds no *.json enrolment files")
        paths += found
    return paths


def parse_cli_time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    from device_agent.wire import parse_time

    try:
        return parse_time(text, what)
    except FormatError as e:
        raise UsageError(f"{what}: {e} (example: 2027-01-31T00:00:00Z)") from e
