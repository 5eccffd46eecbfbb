"""Whether the board obeys a verified command, and the trusted state after it does: pure
functions over the command, the signer, the board's identity and state, and the system time.

The checks, in order (``docs/commands.md``, "What the board checks"):

1. the signer is an operator anchor (a recovery anchor, and only that, for rotating operators);
2. the command names this board;
3. its sequence number is above every one applied (replays and reordering are refused);
4. it has not expired, judged at the trusted time (the later of the system clock and the floor);
5. it was not issued further ahead of the trusted time than the stated skew.

An accepted command moves the sequence number and the clock floor (its issue time is signed).
What a command *does* to the state is decided here too; what it does to files (shredding a
model, rotating a key, the wipe) is the agent's to carry out, from the decision it is given.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from device_agent import crypto
from device_agent.commands.format import Command
from device_agent.errors import BadSignature, Expired, NotInstalled, RollbackRefused, SecurityRefusal, WrongDevice
from device_agent.trust.decisions import advance_floor, trusted_now
from device_agent.trust.state import Identity, Retired, State, TrustAnchors
from device_agent.wire import format_time


@dataclass(frozen=True)
class Accepted:
    """A command the board will carry out: the state and anchors after it, and what the agent
    must still do to files (``shred`` bundle ids, ``rotate_box_key``, ``wipe``)."""

    command: Command
    state: State
    anchors: TrustAnchors
    shred: tuple[str, ...] = ()
    rotate_box_key: bool = False
    wipe: bool = False
    detail: str = ""
    local_rollback: tuple[str, int] | None = None  # (model id, local version; 0: the publisher's head)
    fetch: bool = False  # an update: download, verify and install before the number is consumed


def check_signer(cmd: Command, signer: bytes, anchors: TrustAnchors) -> None:
    """Operators sign every command but the rotation of the operator keys, which only a recovery
    key may sign: whoever stole an operator key cannot rotate the others out first."""
    rotating_operators = cmd.kind == "rotate-key" and cmd.args["role"] == "operator"
    allowed = anchors.recovery if rotating_operators else anchors.operators
    if not any(crypto.constant_time_equal(signer, k) for k in allowed):
        who = "a recovery key" if rotating_operators else "an operator key"
        raise BadSignature(f"{cmd.kind} must be signed by {who} this board trusts")


def check_command(cmd: Command, signer: bytes, me: Identity, anchors: TrustAnchors, state: State,
                  system_now: datetime, skew_s: float) -> datetime:
    """Every check before a command is obeyed (steps 1-5); returns the trusted time."""
    check_signer(cmd, signer, anchors)
    if not crypto.constant_time_equal(cmd.device_id, me.device_id):
        raise WrongDevice(f"command is for device {cmd.device_id!r}, this board is {me.device_id!r}")
    if cmd.seq <= state.command_seq:
        raise RollbackRefused(
            f"command #{cmd.seq} is not above #{state.command_seq}, the last this board applied: "
            "a replay, or issued out of order"
        )
    now = trusted_now(system_now, state.clock_floor)
    if now >= cmd.expires:
        raise Expired(
            f"command #{cmd.seq} expired at {format_time(cmd.expires)} (board time {format_time(now)}); "
            "issue it again with a longer --expires-in"
        )
    if cmd.issued > now + timedelta(seconds=skew_s):
        raise SecurityRefusal(
            f"command #{cmd.seq} was issued at {format_time(cmd.issued)}, more than {int(skew_s)} s "
            f"ahead of the board's time {format_time(now)}; check the board's clock or the operator's"
        )
    return now


def decide_command(cmd: Command, signer: bytes, me: Identity, anchors: TrustAnchors, state: State,
                   system_now: datetime, *, skew_s: float, hold_s: float, cancelled: bool = False,
                   skipped: frozenset[int] = frozenset()) -> Accepted:
    """Check ``cmd`` and decide its effect. ``cancelled``: a later verified command in the same
    delivery cancels this one, which then only consumes its sequence number; ``skipped``: the
    numbers consumed that way, which a cancel may name."""
    now = check_command(cmd, signer, me, anchors, state, system_now, skew_s)
    after = advance_floor(replace(state, command_seq=cmd.seq), cmd.issued, hold_s)
    if cancelled:
        return Accepted(cmd, after, anchors, detail=f"cancelled before it was applied (#{cmd.seq})")
    kind, args = cmd.kind, cmd.args
    if kind == "decommission":
        return Accepted(cmd, after, anchors, wipe=True, detail="board decommissioned")
    if kind == "retire":
        mid = args["model_id"]
        slot = state.models.get(mid)
        shred = tuple(r.bundle_id for r in (slot.current, slot.previous) if r is not None) if slot else ()
        models = {k: v for k, v in after.models.items() if k != mid}
        permits = {k: v for k, v in after.rollback_permits.items() if k != mid}
        retired = {**after.retired, mid: Retired(now, f"command #{cmd.seq}")}
        after = replace(after, models=models, retired=retired, rollback_permits=permits)
        # Rotating the board's encryption key makes copies of the retired bundles kept anywhere
        # unopenable on this board; the models still installed open with their local keys.
        return Accepted(cmd, after, anchors, shred=shred, rotate_box_key=bool(shred),
                        detail=f"model {mid} retired; {len(shred)} bundle(s) shredded")
    if kind == "rollback":
        mid, to = args["model_id"], args["to_version"]
        slot = state.models.get(mid)
        if slot is None or slot.current is None:
            raise NotInstalled(f"model {mid!r} is not installed on this board")
        if "local_version" in args:
            # A local learnt version of the version now serving (device_agent.learning).
            if slot.current.model_version != to:
                raise NotInstalled(f"model {mid} serves version {slot.current.model_version}, not {to}: its local "
                                   "versions are not those of the command")
            local = args["local_version"]
            return Accepted(cmd, after, anchors, local_rollback=(mid, local),
                            detail=f"model {mid} v{to} serves local version {local or 'of the publisher'}")
        if slot.current.model_version == to:
            return Accepted(cmd, after, anchors, detail=f"model {mid} already serves version {to}")
        if slot.previous is not None and slot.previous.model_version == to:
            swapped = replace(slot, current=slot.previous, previous=None)
            return Accepted(cmd, after.with_slot(mid, swapped), anchors, shred=(slot.current.bundle_id,),
                            detail=f"model {mid} rolled back to version {to}")
        permits = {**after.rollback_permits, mid: to}
        return Accepted(cmd, replace(after, rollback_permits=permits), anchors,
                        detail=f"model {mid} may install version {to} once (not kept on the board)")
    if kind == "rotate-key":
        keys = tuple(base64.b64decode(k) for k in args["keys"])
        role = args["role"]
        attr = {"publisher": "publishers", "operator": "operators", "receipt": "receipts"}[role]
        new = replace(anchors, **{attr: keys})
        fprs = ", ".join(crypto.fingerprint(k)[:19] for k in keys)
        return Accepted(cmd, after, new, detail=f"{role} keys are now {fprs}")
    if kind == "cancel":
        target = args["seq"]
        if target >= cmd.seq:
            raise RollbackRefused(f"cancel #{cmd.seq} may only cancel an earlier command, not #{target}")
        if target <= state.command_seq and target not in skipped:
            raise RollbackRefused(f"command #{target} was already carried out; it cannot be cancelled")
        return Accepted(cmd, after, anchors, detail=f"command #{target} cancelled")
    if kind == "update":
        return decide_update(cmd, after, state, anchors)
    raise SecurityRefusal(f"unknown command kind {kind!r}")  # the format refuses it before this


def decide_update(cmd: Command, after: State, state: State, anchors: TrustAnchors) -> Accepted:
    """An update the board will fetch, or one it already carried out (its exact file is the one
    installed: a power cut after the install and before the number was saved). What the file
    holds is judged later by the install itself, exactly as for a local install; only what the
    state already rules out is refused here, before a byte is downloaded."""
    args = cmd.args
    mid, version = args["model_id"], args["model_version"]
    if mid in state.retired:
        raise SecurityRefusal(f"model {mid} was retired on this board; an update cannot bring it back")
    slot = state.models.get(mid)
    current = slot.current if slot is not None else None
    # A version 1 bundle is stored as received (its digest is the signed one); a version 2 release
    # is stored under its release id.
    done = current is not None and (
        current.bundle_id == args["release_id"] if "payload" in args
        else crypto.constant_time_equal(current.sha256, args["bundle"]["sha256"])
    )
    if current is not None and done:
        return Accepted(cmd, after, anchors, detail=f"model {mid} already serves version {version} of release "
                        f"{args['release_id']}")
    if current is not None and current.model_version > version:
        raise RollbackRefused(f"model {mid} serves version {current.model_version}, newer than {version}; "
                              "use 'edgeward fleet rollback' to go back")
    return Accepted(cmd, after, anchors, fetch=True, detail=f"model {mid} version {version} to fetch")


def cancelled_in(commands: list[Command]) -> set[int]:
    """Sequence numbers that a cancel among ``commands`` (all verified, for one board) targets."""
    return {c.args["seq"] for c in commands if c.kind == "cancel" and c.args["seq"] < c.seq}
