"""Hostile bytes against the board's parsers for signed commands, beacons, queues, results and
its own sealed files: any input gives a value or an EdgeWardError naming what was wrong — never
another exception, never an allocation past the bound."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import crypto
from device_agent.commands.format import (
    QUEUE_MAGIC,
    Command,
    decode_queue,
    encode_command,
    encode_queue,
    verify_result,
    verify_signed,
)
from device_agent.errors import EdgeWardError, FormatError
from device_agent.trust import sealed
from device_agent.wire import HEX32_RE, ID_RE, parse_time, printable, str_field

KEY = Ed25519PrivateKey.generate()
PUB = crypto.ed25519_public_raw(KEY)
NOW = datetime(2027, 1, 1, tzinfo=UTC)


def test_identifiers_with_a_trailing_newline_are_refused() -> None:
    assert not ID_RE.match("pi-1\n") and not HEX32_RE.match("a" * 32 + "\n")
    with pytest.raises(FormatError):
        str_field("pi-1\n", "device_id", ID_RE)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2027-13-01T00:00:00Z"])
def test_times_out_of_range_are_a_format_error(text: str) -> None:
    with pytest.raises(FormatError):
        parse_time(text, "time")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_time_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(FormatError):
        parse_time(text, "time")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_any_string_prints_as_one_line_that_moves_no_cursor(text: str) -> None:
    """What the fleet and inspect text views print of a string they did not write: no C0, DEL, C1
    or reordering character survives, it encodes as UTF-8, and plain text is left as it is."""
    shown = printable(text)
    shown.encode("utf-8")  # no lone surrogate left
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029\u202a\u202b\u202c\u202d"
                   "\u202e\u2066\u2067\u2068\u2069" for c in shown), repr(shown)
    if text.isprintable():  # the reordering characters are format characters: not printable
        assert shown == text


def _signed_command() -> bytes:
    return encode_command(Command("retire", "pi-1", 1, NOW, NOW + timedelta(days=1), {"model_id": "m"}), KEY, PUB)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 400))
def test_commands_and_queues_from_any_bytes(junk: bytes, cut: int) -> None:
    good = _signed_command()
    for payload in (junk, good[:cut] + junk, QUEUE_MAGIC + junk, encode_queue([good])[:cut] + junk):
        try:
            for item in decode_queue(payload):
                verify_signed(item, [PUB])
        except EdgeWardError:
            pass
        with contextlib.suppress(EdgeWardError):
            verify_result(payload, PUB)


def test_a_queue_declaring_huge_counts_or_lengths_is_refused_before_reading() -> None:
    with pytest.raises(FormatError):
        decode_queue(QUEUE_MAGIC + struct.pack(">H", 65535))
    with pytest.raises(FormatError):
        decode_queue(QUEUE_MAGIC + struct.pack(">H", 1) + struct.pack(">I", 2**31) + b"x")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_sealed_files_from_any_bytes(junk: bytes) -> None:
    key = bytes(32)
    good = sealed.seal(key, "state.json", {"a": 1})
    for data in (junk, good[:40] + junk, sealed.MAGIC + junk):
        with contextlib.suppress(EdgeWardError):
            sealed.unseal(key, "state.json", data)


# --- bundle format version 2: the envelope and the release head (device_agent/bundle/release.py) ------


def _release(devices: int = 5) -> tuple[list[bytes], bytes]:
    """Envelopes and the signed payload head (with a 16-byte stand-in payload) of a tiny release."""
    from device_agent.bundle import release

    rid = "ab" * 16
    boxes = [crypto.new_box_keypair()[1] for _ in range(devices)]
    leaves = [release.leaf_bytes(rid, i, box, bytes(80), f"pi-{i}") for i, box in enumerate(boxes)]
    tree = crypto.MerkleTree(b"".join(release.leaf_hash(leaf) for leaf in leaves))
    head = release.ReleaseHead(
        release_id=rid, model_id="m", model_version=1, created=NOW, expires=None, end_of_life=None,
        publisher=crypto.fingerprint(PUB), profile="rpi4b", runtime="onnxruntime", cipher=crypto.SUITES[0],
        compression="none", chunk_size=4096, sealed_length=0, payload_length=16, payload_sha256="0" * 64,
        tags_sha256="0" * 64, devices=devices, merkle_root=tree.root.hex(),
    )
    signed = release.sign_head(head, PUB, lambda m: crypto.sign(KEY, release.SIGNING_DOMAIN, m))
    return [release.build_envelope(leaf, tree.proof(i)) for i, leaf in enumerate(leaves)], signed


RELEASE = _release()


def test_the_tiny_release_verifies_for_each_of_its_envelopes() -> None:
    from device_agent.bundle import release

    envelopes, head = RELEASE
    for i, env in enumerate(envelopes):
        m, _ = release.verify_release(env, head, len(head) + 16, [PUB])
        assert (m.device_id, m.bundle_id, m.format_version) == (f"pi-{i}", "ab" * 16, 2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200), st.integers(0, 1200), st.integers(0, 8 * 1200))
def test_fuzz_release_envelope_parser(junk: bytes, cut: int, bit: int) -> None:
    """Any envelope bytes: parsed or refused with an EdgeWard error; a changed valid envelope never
    proves its way under the signed root."""
    from device_agent.bundle import release

    envelopes, head = RELEASE
    good = envelopes[1]
    flipped = bytearray(good)
    flipped[bit % (8 * len(good)) // 8] ^= 1 << (bit % 8)
    for data in (junk, good[:cut] + junk, release.ENVELOPE_MAGIC + junk, bytes(flipped)):
        with contextlib.suppress(EdgeWardError):
            release.parse_envelope(data)
        try:
            release.verify_release(data, head, len(head) + 16, [PUB])
        except EdgeWardError:
            continue
        assert data == good  # only the untouched envelope verifies


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200), st.integers(0, 2000), st.integers(0, 8 * 2000))
def test_fuzz_release_head_parser(junk: bytes, cut: int, bit: int) -> None:
    """Any payload head bytes: verified or refused with an EdgeWard error, and a single bit changed
    anywhere in a signed head is refused."""
    from device_agent.bundle import release

    envelopes, good = RELEASE
    flipped = bytearray(good)
    flipped[bit % (8 * len(good)) // 8] ^= 1 << (bit % 8)
    for data in (junk, good[:cut] + junk, release.PAYLOAD_MAGIC + junk, bytes(flipped)):
        with contextlib.suppress(EdgeWardError):
            release.payload_head_length(data)
        try:
            release.verify_release(envelopes[0], data, len(data) + 16, [PUB])
        except EdgeWardError:
            continue
        assert data == good


def test_release_lengths_are_bounded_before_anything_is_read() -> None:
    from device_agent.bundle import release

    with pytest.raises(FormatError, match="envelope length"):
        release.envelope_length(release.PREFIX.pack(release.ENVELOPE_MAGIC, 2, 0, 2**32 - 1))
    with pytest.raises(FormatError, match="release head length"):
        release.payload_head_length(release.PAYLOAD_HEADER.pack(release.PAYLOAD_MAGIC, 2, 0, 2**32 - 1, bytes(16)))
    with pytest.raises(FormatError, match="version 3 is not supported"):
        release.envelope_length(release.PREFIX.pack(release.ENVELOPE_MAGIC, 3, 0, 200))
