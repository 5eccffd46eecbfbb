"""Bundle format v1: verify-before-parse, bounds, tamper detection, and what the clear part reveals."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from device_agent import crypto
from device_agent.bundle.format import HEADER, HEADER_BYTES, MAGIC, Manifest, read_header, verify_bundle
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.errors import (
    BadSignature,
    EdgeWardError,
    FormatError,
    IntegrityError,
    SecurityRefusal,
    UnknownPublisher,
)
from device_agent.store.keys import KeySource
from tests.conftest import tree_snapshot

FAST_KEYS = KeySource(kek=bytes(range(32)))  # Argon2 would make thousands of refusals slow


@pytest.fixture
def pub(publisher: Path) -> bytes:
    return load_public_key_file(publisher / "publisher.pub")


def _split(data: bytes) -> tuple[int, int]:
    manifest_len, _ = read_header(data)
    return HEADER_BYTES + manifest_len, HEADER_BYTES + manifest_len + crypto.SIGNATURE_BYTES


def test_roundtrip_decrypts_the_exact_model(digits, make_board, pack_for, pub):
    board = make_board()
    data = (pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes()
    vb = verify_bundle(data, [pub])
    keys = board.agent().store.unlock(board.keys)
    contents = vb.decrypt(keys.box_private)
    assert bytes(contents.model) == digits.onnx.read_bytes()
    assert contents.sidecar.model_sha256 == crypto.sha256_hex(digits.onnx.read_bytes())
    assert vb.manifest.device_id == "pi-001" and vb.manifest.model_version == 1


def test_clear_part_reveals_nothing_about_the_model(digits, make_board, pack_for, tmp_path):
    """Invariant 6: no architecture, input names or shapes, labels, producer or framework version."""
    import onnx

    board = make_board()
    labels = [f"class-{c}" for c in "abcdefghij"]
    out = pack_for(digits.onnx, [board], task={"labels": labels})
    data = (out / "pi-001.ewb").read_bytes()
    clear_end, _ = _split(data)
    manifest = json.loads(data[HEADER_BYTES:clear_end])
    assert set(manifest) == set(Manifest.FIELDS)
    model = onnx.load(digits.onnx)
    secrets = [model.producer_name, model.producer_version, *labels]
    secrets += [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
    secrets += [n.op_type for n in model.graph.node] + [n.name for n in model.graph.node if n.name]
    # Every clear string except the random sealed key (base64 may spell anything short by chance).
    values = [v for k, v in manifest.items() if isinstance(v, str) and k != "sealed_key"]
    for secret in filter(None, secrets):
        assert not any(secret in v for v in values), secret
    # Nor does the payload: the model is encrypted (no 32-byte block of it appears anywhere).
    raw = digits.onnx.read_bytes()
    assert not any(raw[i : i + 32] in data for i in range(0, len(raw) - 32, 32))


def test_unknown_publisher_is_refused_before_parsing(digits, make_board, pack_for):
    board = make_board()
    data = (pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes()
    other = os.urandom(32)
    with pytest.raises(UnknownPublisher, match="does not trust"):
        verify_bundle(data, [other])


def test_signature_is_checked_before_the_manifest_is_parsed(pub, publisher):
    """A manifest that is not even JSON must fail on its signature, not on parsing."""
    body = b"\xff not json"
    header = HEADER.pack(MAGIC, 1, 0, len(body), crypto.key_id(pub))
    data = header + body + bytes(64)
    with pytest.raises(BadSignature):
        verify_bundle(data, [pub])


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda d: b"NOTABUND" + d[8:], FormatError, "bad magic"),
        (lambda d: d[:8] + struct.pack(">H", 2) + d[10:], FormatError, "format version 2 is not supported"),
        (lambda d: d[:10] + struct.pack(">H", 1) + d[12:], FormatError, "flags"),
        (lambda d: d[:12] + struct.pack(">I", 10**9) + d[16:], FormatError, "exceeds the limit"),
        (lambda d: d[:20], FormatError, "truncated"),
        (lambda d: d[:-1], FormatError, "truncated"),
        (lambda d: d[: len(d) // 2], FormatError, "truncated"),
        (lambda d: d + b"\0", FormatError, "appended"),
    ],
)
def test_malformed_bundles_are_refused_with_a_clear_reason(digits, make_board, pack_for, pub, mutate, error, message):
    board = make_board()
    data = (pack_for(digits.onnx, [board]) / "pi-001.ewb").read_bytes()
    with pytest.raises(error, match=message):
        verify_bundle(mutate(data), [pub])


def test_payload_from_someone_holding_only_the_device_public_key_is_refused(digits, make_board, pack_for, pub):
    """AEAD alone does not authenticate the publisher: a swapped payload must fail the signed tags digest."""
    board = make_board()
    out_a = pack_for(digits.onnx, [board], version=1, compression="none")
    out_b = pack_for(digits.onnx, [board], version=2, compression="none")
    a = (out_a / "pi-001.ewb").read_bytes()
    b = (out_b / "pi-001.ewb").read_bytes()
    _, pa = _split(a)
    _, pb = _split(b)
    spliced = a[:pa] + b[pb:]  # a's signed manifest, b's genuine (but other-key) payload
    vb = verify_bundle(spliced, [pub])
    keys = board.agent().store.unlock(board.keys)
    with pytest.raises(IntegrityError, match="tags digest"):
        vb.decrypt(keys.box_private)


def test_every_header_and_manifest_bit_flip_and_a_payload_sample_is_refused(digits, make_board, pack_for):
    """Flip each bit of the header, manifest and signature, and 256 payload bits: each install is
    refused (exit 1 or 3) and the board's data dir stays byte-for-byte the same, still serving v1."""
    import numpy as np

    board = make_board(key_source=FAST_KEYS)
    agent = board.agent()
    agent.install((pack_for(digits.onnx, [board], version=1) / "pi-001.ewb").read_bytes())
    x = np.load(digits.test)["x"][:20]
    before_pred = agent.predict(x)
    good = (pack_for(digits.onnx, [board], version=2, compression="none") / "pi-001.ewb").read_bytes()
    _, payload_start = _split(good)
    before = tree_snapshot(board.data_dir)
    rng = np.random.default_rng(7)
    payload_bits = rng.choice((len(good) - payload_start) * 8, size=256, replace=False) + payload_start * 8
    positions = [*range(payload_start * 8), *payload_bits.tolist()]
    codes: dict[int, int] = {}
    for bit in positions:
        data = bytearray(good)
        data[bit // 8] ^= 1 << (bit % 8)
        # Alternate the copying path (bytes) and the in-place path (bytearray, stored first and
        # discarded on failure): both must leave the data dir untouched.
        with pytest.raises(EdgeWardError) as info:
            agent.install(data if bit % 2 else bytes(data))
        assert isinstance(info.value, SecurityRefusal | FormatError), (bit, info.value)
        codes[info.value.exit_code] = codes.get(info.value.exit_code, 0) + 1
    assert set(codes) <= {1, 3}
    assert tree_snapshot(board.data_dir) == before
    assert agent.predict(x) == before_pred
    assert agent.status()["models"][0]["version"] == 1
    # The unflipped bundle installs: the refusals above were about the flips, not the bundle.
    assert agent.install(good).model_version == 2


def test_bundle_ids_and_content_keys_are_fresh_per_device(digits, make_board, pack_for, pub):
    a, b = make_board("pi-a"), make_board("pi-b")
    out = pack_for(digits.onnx, [a, b])
    ma = verify_bundle((out / "pi-a.ewb").read_bytes(), [pub]).manifest
    mb = verify_bundle((out / "pi-b.ewb").read_bytes(), [pub]).manifest
    assert ma.bundle_id != mb.bundle_id
    assert ma.sealed_key != mb.sealed_key
    assert ma.tags_sha256 != mb.tags_sha256
    # One board cannot open the other's bundle.
    vb = verify_bundle((out / "pi-b.ewb").read_bytes(), [pub])
    with pytest.raises(IntegrityError, match="not sealed to this device"):
        vb.decrypt(a.agent().store.unlock(a.keys).box_private)


def test_chunking_detects_truncation_and_reordering():
    key = crypto.new_content_key()
    plain = os.urandom(3 * 4096 + 100)
    out = bytearray()
    digest = crypto.encrypt_payload(crypto.CHACHA20, key, b"aad", plain, 4096, out.extend)
    layout = crypto.ChunkLayout(len(plain), 4096)
    assert bytes(crypto.decrypt_payload(crypto.CHACHA20, key, b"aad", bytes(out), layout, digest)) == plain
    stride = 4096 + crypto.TAG_BYTES
    swapped = out[stride : 2 * stride] + out[:stride] + out[2 * stride :]
    with pytest.raises(IntegrityError):
        crypto.decrypt_payload(crypto.CHACHA20, key, b"aad", bytes(swapped), layout, digest)
    short = crypto.ChunkLayout(2 * 4096, 4096)
    with pytest.raises(IntegrityError):
        crypto.decrypt_payload(crypto.CHACHA20, key, b"aad", bytes(out[: 2 * stride]), short, digest)


@pytest.mark.parametrize("suite", crypto.SUITES)
def test_both_cipher_suites_roundtrip_and_reject_a_flipped_tag(suite):
    key = crypto.new_content_key()
    plain = os.urandom(10_000)
    out = bytearray()
    digest = crypto.encrypt_payload(suite, key, b"a", plain, 4096, out.extend)
    layout = crypto.ChunkLayout(len(plain), 4096)
    assert bytes(crypto.decrypt_payload(suite, key, b"a", bytes(out), layout, digest)) == plain
    out[5] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        crypto.decrypt_payload(suite, key, b"a", bytes(out), layout, digest)
