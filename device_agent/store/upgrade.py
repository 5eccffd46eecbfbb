"""Upgrading a data directory written by release 0.1 (unsealed state, two wrapped keys).

Runs once, on the first command that unlocks the keys, under the data-dir lock, and resumes
after a power cut at any instant:

1. the keys are rewrapped with a new board secret into ``keys.wrapped.upgrade``;
2. ``state.json``, ``trust.json`` and ``tokens.json`` are rewritten sealed (state records gain
   the digest of their stored bundle, taken now: the upgrade is the moment the board starts
   vouching for its files);
3. every file is narrowed to the mode the layout gives it, and ``keys.wrapped.upgrade``
   replaces ``keys.wrapped``.

Until step 3, ``keys.wrapped`` still holds release 0.1's keys, so a resumed upgrade finds the
same board secret in step 1's file and the files it already sealed verify. After step 3, an
unsealed file is refused as tampering.

What this cannot stop (docs/threat-model.md): someone who kept a copy of the board's 0.1
``keys.wrapped`` from before the upgrade can put it back with unsealed files *of their choosing*
(a publisher key of their own, an empty state), and the next start seals them, because a 0.1
board's files carry no authentication to check. The fleet sees it: heartbeats carry the
fingerprint of the board's trust anchors and its versions.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from device_agent import crypto
from device_agent.errors import FormatError, TamperedState
from device_agent.store import layout
from device_agent.store.datadir import DataDir
from device_agent.store.fsutil import fsync_dir, read_bounded
from device_agent.store.keys import DeviceKeys, KeySource
from device_agent.trust import sealed
from device_agent.trust.state import TOKENS_SCHEMA, TOKENS_SCHEMA_V1, TRUST_SCHEMA_V1, State, TrustAnchors


def needed(keys: DeviceKeys, store: DataDir) -> bool:
    return keys.board_secret is None or store.layout.path(layout.KEYS_UPGRADE).exists()


def upgrade(store: DataDir, source: KeySource, kek_cache: dict[bytes, bytearray] | None = None) -> DeviceKeys:
    """Bring ``store`` to the current format (the caller holds the data-dir lock); returns the
    unlocked current keys."""
    staged = store.layout.path(layout.KEYS_UPGRADE)
    old = store.unlock(source, kek_cache)
    if old.board_secret is not None:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()  # left by an upgrade that had already completed its rename
        return old
    try:
        if staged.exists():
            new = store.unlock(source, kek_cache, name=layout.KEYS_UPGRADE)
            same = new.board_secret is not None and crypto.constant_time_equal(
                bytes(new.box_private + new.sign_seed), bytes(old.box_private + old.sign_seed)
            )
            if not same:
                new.wipe()
                raise TamperedState(f"{staged} does not hold this board's keys; remove it only if you placed it")
        else:
            new = DeviceKeys(bytearray(old.box_private), bytearray(old.sign_seed), crypto.new_secret_key())
            store.write_keys(new, source, layout.KEYS_UPGRADE)
    finally:
        old.wipe()
    key = store.sealing_key(new)
    try:
        _local_bundle_keys(store, new, list(_anchors(store, key).publishers))
        _seal_state(store, key)
        _seal(store, layout.TRUST, key, lambda raw: TrustAnchors.from_json(raw, TRUST_SCHEMA_V1).to_json())
        _seal(store, layout.TOKENS, key, _tokens_v2)
    finally:
        crypto.wipe(key)
    store.layout.tighten_modes()  # release 0.1 left its SQLite stores at the umask's mode
    os.replace(staged, store.keys_file)
    fsync_dir(store.path)
    return new


def _legacy(store: DataDir, name: str, key: bytearray) -> object | None:
    """The parsed release-0.1 document in ``name``, or None when it is absent or already sealed."""
    try:
        data = read_bounded(store.layout.path(name), store.limits.max_board_file_bytes)
    except FileNotFoundError:
        return None
    if sealed.is_sealed(data):
        sealed.unseal(key, name, data)  # sealed by this upgrade before a power cut: must verify
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise FormatError(f"{name} from release 0.1 is not JSON: {e}") from e


def _seal(store: DataDir, name: str, key: bytearray, convert: Callable[[Any], Any]) -> None:
    raw = _legacy(store, name, key)
    if raw is not None:
        store.write_sealed(name, convert(raw), key)


def _seal_state(store: DataDir, key: bytearray) -> None:
    raw = _legacy(store, layout.STATE, key)
    if raw is not None:
        digests = {}
        for bundle_id in State.v1_bundle_ids(raw):
            with contextlib.suppress(FileNotFoundError):
                digests[bundle_id] = store.bundle_digest(bundle_id)
        store.save_state(State.from_v1(raw, digests), key)


def _tokens_v2(raw: object) -> dict[str, object]:
    if not isinstance(raw, dict) or raw.get("schema") != TOKENS_SCHEMA_V1 or not isinstance(raw.get("tokens"), list):
        raise FormatError(f"tokens.json is not {TOKENS_SCHEMA_V1}")
    return {"schema": TOKENS_SCHEMA, "tokens": raw["tokens"]}


def _anchors(store: DataDir, key: bytearray) -> TrustAnchors:
    """The publishers the board trusted: release 0.1's trust.json, or the sealed one when a
    resumed upgrade already sealed it."""
    data = read_bounded(store.layout.path(layout.TRUST), store.limits.max_board_file_bytes)
    if sealed.is_sealed(data):
        return TrustAnchors.from_json(sealed.unseal(key, layout.TRUST, data))
    try:
        return TrustAnchors.from_json(json.loads(data), TRUST_SCHEMA_V1)
    except ValueError as e:
        raise FormatError(f"trust.json from release 0.1 is not JSON: {e}") from e


def _local_bundle_keys(store: DataDir, keys: DeviceKeys, publishers: list[bytes]) -> None:
    """Give every stored bundle its local key (release 0.1 opened them with the encryption key
    each time). The bundle's signed head is verified first; a bundle that fails is left without
    a key, for the serving check to refuse."""
    from device_agent.bundle.format import verify_head
    from device_agent.errors import EdgeWardError

    for path in sorted(store.bundles.glob("*.ewb")) if store.bundles.is_dir() else []:
        bundle_id = path.stem
        if store.bundle_key_path(bundle_id).exists() or layout.entry_for(f"{layout.BUNDLES}/{path.name}") is None:
            continue
        try:
            head, length = store.read_bundle_head(bundle_id)
            m, _, _ = verify_head(head, length, publishers)
            content_key = crypto.open_content_key(keys.box_private, m.sealed_key)
        except EdgeWardError:
            continue
        try:
            store.write_bundle_key(bundle_id, content_key, keys)
        finally:
            crypto.wipe(content_key)
