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
from device_agent.wire import HEX32_RE, ID_RE, parse_time, str_field

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
