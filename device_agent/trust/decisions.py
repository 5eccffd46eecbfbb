"""The board's trust decisions as pure functions: a verified manifest, the board's identity, its
trusted state and a reference time in; a new state out, or a :class:`SecurityRefusal` raised.

The agent (``device_agent.agent``) only loads what these need, calls one of them and persists
the result; nothing here reads a file, a clock or the network.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from device_agent import crypto
from device_agent.bundle.format import Manifest
from device_agent.errors import (
    Expired,
    NotInstalled,
    RollbackRefused,
    TamperedState,
    UnknownPublisher,
    UsageError,
    WrongDevice,
)
from device_agent.trust.state import Identity, InstalledRecord, ModelSlot, State
from device_agent.wire import format_time


def trusted_now(system_now: datetime, floor: datetime | None) -> datetime:
    """The board's notion of now never moves backwards: a Pi has no real-time clock."""
    return system_now if floor is None or system_now >= floor else floor


def check_target(m: Manifest, me: Identity) -> None:
    if not crypto.constant_time_equal(m.device_id, me.device_id):
        raise WrongDevice(
            f"bundle is for device {m.device_id!r}, this board is {me.device_id!r}; "
            "install the bundle packed for this device"
        )
    if not crypto.constant_time_equal(m.device_key, me.box_fingerprint):
        raise WrongDevice(
            "bundle was sealed to another key of this device id (re-provisioned board?); "
            "repack with the board's current enrolment"
        )


def check_serving_life(m: Manifest, now: datetime) -> None:
    """A model past its end of life never serves again."""
    if m.end_of_life is not None and now >= m.end_of_life:
        raise Expired(f"model {m.model_id} v{m.model_version} reached end of life at {format_time(m.end_of_life)}")


@dataclass(frozen=True)
class Installed:
    """The outcome of an accepted install: the new state, and the bundle no longer referenced."""

    state: State
    dropped: str | None


def advance_floor(state: State, signed_time: datetime, hold_s: float) -> State:
    """The state after a *signed* time was seen (a bundle's creation, a command's issue time).
    The floor only moves forward, and a held beacon that this time comes within ``hold_s`` of
    is confirmed and applied. The board's unsigned system clock never moves the floor."""
    floor = signed_time if state.clock_floor is None else max(state.clock_floor, signed_time)
    held = state.held_beacon
    if held is not None and signed_time >= held - timedelta(seconds=hold_s):
        floor, held = max(floor, held), None
    return replace(state, clock_floor=floor, held_beacon=held)


def decide_beacon(beacon_time: datetime, state: State, system_now: datetime, hold_s: float) -> tuple[State, bool]:
    """The state after a verified time beacon, and whether it was held. A beacon more than
    ``hold_s`` ahead of both the system clock and the floor (a wrong fleet clock, a typo) is held
    instead of applied, until a signed bundle or command time comes within ``hold_s`` of it
    (:func:`advance_floor`); a later beacon that is applied and contradicts it (more than
    ``hold_s`` behind it) drops it. Neither the unsigned system clock nor another held beacon
    ever confirms one."""
    ref = trusted_now(system_now, state.clock_floor)
    if beacon_time > ref + timedelta(seconds=hold_s):
        ahead = beacon_time if state.held_beacon is None else max(state.held_beacon, beacon_time)
        return replace(state, held_beacon=ahead), True
    floor = beacon_time if state.clock_floor is None else max(state.clock_floor, beacon_time)
    held: datetime | None = state.held_beacon
    if held is not None and beacon_time < held - timedelta(seconds=hold_s):
        held = None  # the fleet's clock says otherwise now: the held beacon was wrong
    return replace(state, clock_floor=floor, held_beacon=held), False


def decide_install(
    m: Manifest, bundle_sha256: str, size: int, me: Identity, state: State, now: datetime, hold_s: float = 0.0,
    trusted_publishers: frozenset[str] | None = None,
) -> Installed:
    """Every check a verified bundle must pass before it may replace the installed model, and the
    state after it does: previous := current, current := the new bundle. ``now`` is the trusted
    time (the later of the system clock and the floor); only the bundle's signed creation time
    moves the floor.

    A model id belongs to the publisher key that first installed it (TUF's delegated roles, in
    their simplest form): another trusted publisher cannot replace it or push its version out of
    reach. ``trusted_publishers`` (fingerprints of the current anchors) lets a model move on to
    the next publisher once its owner's key was rotated out of the anchors, starting a fresh
    version floor (the recovery from a fast-forward by a compromised key)."""
    retired = state.retired.get(m.model_id)
    if retired is not None:
        raise RollbackRefused(
            f"model {m.model_id} was retired ({retired.by}, {format_time(retired.at)}); "
            "it is never installed again: publish under a new model id"
        )
    check_target(m, me)
    if m.expires is not None and now >= m.expires:
        raise Expired(
            f"bundle expired at {format_time(m.expires)} (board time {format_time(now)}); "
            "ask the publisher for a fresh bundle"
        )
    check_serving_life(m, now)
    if trusted_publishers is not None and m.publisher not in trusted_publishers:
        # Verified against anchors a rotate-key command replaced in the meantime.
        raise UnknownPublisher(f"bundle is signed by publisher {m.publisher}, which this board no longer trusts")
    slot = state.models.get(m.model_id)
    owner = slot.publisher if slot is not None else None
    owner_trusted = owner is not None and (trusted_publishers is None or owner in trusted_publishers)
    if owner_trusted and not crypto.constant_time_equal(owner or "", m.publisher):
        raise RollbackRefused(
            f"model {m.model_id} belongs to publisher {owner}, and this bundle is signed by {m.publisher}; "
            "only the publisher that owns a model id may release it (publish under your own model id)"
        )
    # The owner's key left the anchors (a signed rotate-key): the version floor it set leaves with
    # it, as TUF's client forgets a rotated role's versions (client workflow 5.3.11). That is
    # how a board recovers from a fast-forward: a compromised key that signed an inflated version
    # would otherwise block every later release of the model for good.
    taken_over = owner is not None and not owner_trusted
    permitted = state.rollback_permits.get(m.model_id) == m.model_version
    if slot is not None and not taken_over and m.model_version <= slot.highest_version and not permitted:
        raise RollbackRefused(
            f"model {m.model_id} version {m.model_version} is not newer than version "
            f"{slot.highest_version} already accepted; publish a higher --model-version"
        )
    if m.bundle_id in state.referenced_bundles():
        raise RollbackRefused(f"bundle {m.bundle_id} is already installed")
    new = InstalledRecord(m.bundle_id, m.model_version, now, size, bundle_sha256)
    if slot is None or taken_over:
        # A new owner keeps nothing of the old one's: its bundles no longer verify anyway.
        new_slot = ModelSlot(current=new, previous=None, highest_version=m.model_version, publisher=m.publisher)
        old = [r.bundle_id for r in (slot.current, slot.previous) if r is not None] if slot is not None else []
        dropped = old[0] if old else None
    else:
        dropped = slot.previous.bundle_id if slot.previous else None
        new_slot = ModelSlot(
            current=new, previous=slot.current, highest_version=max(slot.highest_version, m.model_version),
            publisher=m.publisher,
        )
    after = state.with_slot(m.model_id, new_slot)
    if permitted:  # a signed rollback permit is used once
        after = replace(after, rollback_permits={k: v for k, v in state.rollback_permits.items() if k != m.model_id})
    return Installed(advance_floor(after, m.created, hold_s), dropped)


def decide_rollback(state: State, model_id: str) -> Installed:
    """Serve the previous version again (an explicit admin action). The highest accepted version
    stays where it is, so the version rolled back from can never be installed again."""
    slot = state.models.get(model_id)
    if slot is None or slot.current is None:
        raise NotInstalled(f"model {model_id!r} is not installed")
    if slot.previous is None:
        # Nothing was refused: there is nothing to go back to (a usage error, exit 2).
        raise UsageError(
            f"model {model_id} has no previous version kept to roll back to; install a newer version instead"
        )
    new_slot = replace(slot, current=slot.previous, previous=None)
    return Installed(state.with_slot(model_id, new_slot), slot.current.bundle_id)


def decide_serve(m: Manifest, bundle_sha256: str, model_id: str, me: Identity, state: State, now: datetime) -> None:
    """Whether the stored bundle ``m`` (whose file has digest ``bundle_sha256``) may serve as
    ``model_id``: it must be exactly the bundle the state records as installed, for this board,
    and within its life."""
    slot = state.models.get(model_id)
    rec = slot.current if slot is not None else None
    if rec is None:
        raise NotInstalled(f"model {model_id!r} is not installed")
    # The full target check (device id and encryption key) ran at install; the key may have been
    # rotated since (a retirement), and the recorded digest pins the exact bundle that passed it.
    if not crypto.constant_time_equal(m.device_id, me.device_id):
        raise WrongDevice(f"stored bundle is for device {m.device_id!r}, this board is {me.device_id!r}")
    same = (
        m.model_id == model_id
        and m.bundle_id == rec.bundle_id
        and m.model_version == rec.model_version
        and crypto.constant_time_equal(bundle_sha256, rec.sha256)
    )
    if not same:
        raise TamperedState(
            f"the stored bundle for model {model_id} is not the one installed (version "
            f"{rec.model_version}, bundle {rec.bundle_id}): it was replaced outside the agent. "
            "Reinstall the model from its release"
        )
    check_serving_life(m, now)
