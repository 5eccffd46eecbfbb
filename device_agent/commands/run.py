"""Carrying out signed commands, time beacons and end of life on the board: the agent's side of
``device_agent.commands``. Each step loads what the pure decision needs, calls it
(:mod:`device_agent.commands.decide`, :mod:`device_agent.trust.decisions`), and persists the
result; nothing here decides whether a command is obeyed.

Every file-level effect is safe to repeat, and the command's sequence number is saved with the
state only after its effects on keys are done, so a power cut at any instant leaves either the
old state (the command is carried out again when it is delivered again) or the new one.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from device_agent import crypto
from device_agent.bundle.enrolment import DOMAIN as ENROLMENT_DOMAIN
from device_agent.bundle.enrolment import Enrolment
from device_agent.bundle.format import verify_head
from device_agent.commands.decide import Accepted, check_command, decide_command
from device_agent.commands.format import (
    COMMAND_MAGIC,
    Beacon,
    Command,
    Result,
    Signed,
    decode_queue,
    encode_result,
    verify_signed,
)
from device_agent.errors import EdgeWardError, NotInstalled, SecurityRefusal
from device_agent.trust.decisions import decide_beacon, trusted_now
from device_agent.trust.state import Identity, Retired
from device_agent.wire import canonical_json, format_time

if TYPE_CHECKING:
    from device_agent.agent import Agent

_log = logging.getLogger(__name__)
OnResult = Callable[[bytes, Result], None]


def apply(agent: Agent, payload: bytes, on_result: OnResult | None = None) -> list[bytes]:
    """Verify every item of a delivery, apply its beacons, then its commands in sequence order.

    A delivery of one command (a file a technician brings, a single message) is strict: a command
    already applied is refused as a replay. A board's retained queue holds commands it has
    already carried out; those are skipped quietly."""
    limits = agent.config.commands
    single = payload[: len(COMMAND_MAGIC)] == COMMAND_MAGIC
    items = decode_queue(payload, limits)
    anchors = agent.trust_anchors()
    trusted = list(anchors.operators) + list(anchors.recovery)
    verified: list[Signed] = []
    for raw in items:
        try:
            sg = verify_signed(raw, trusted, limits)
            operator = any(crypto.constant_time_equal(sg.signer, k) for k in anchors.operators)
            if isinstance(sg.item, Beacon) and not operator:
                raise SecurityRefusal("a time beacon must be signed by an operator key (not a recovery key)")
            verified.append(sg)
        except EdgeWardError as e:
            agent.record_event("command", "critical", {"refused": str(e)[:300], "sha256": crypto.sha256_hex(raw)})
            if single:
                raise
    for sg in verified:
        if isinstance(sg.item, Beacon):
            apply_beacon(agent, sg.item)
    commands = sorted((sg for sg in verified if isinstance(sg.item, Command)), key=_seq)
    if not commands:
        return []
    me = agent.store.identity()
    key = agent._key()  # before the lock: the first unlock may upgrade the data dir, which locks
    results: list[bytes] = []
    deferred: Signed | None = None  # an accepted update: fetched and installed outside the lock
    # Read, decide and persist under the data-dir lock: an install or another command cannot
    # change the state between the decision and its effect.
    with agent._lock, agent.store.locked():
        cancelled = _cancelled(agent, commands, me, limits)
        if cancelled and agent.updater is not None:
            agent.updater.abort(cancelled)  # the update downloading is cancelled: stop it now
        for sg in commands:
            cmd = sg.item
            if not isinstance(cmd, Command):  # the list holds commands only (filtered above)
                raise EdgeWardError(f"internal error: {type(cmd).__name__} in the command list")
            state = agent.state()
            if not single and cmd.seq <= state.command_seq and cmd.device_id == me.device_id:
                continue  # carried out before: the retained queue keeps it until the fleet drops it
            try:
                accepted = decide_command(
                    cmd, sg.signer, me, agent.trust_anchors(), state, agent._clock(),
                    skew_s=limits.future_skew_s, hold_s=limits.beacon_hold_s, cancelled=cmd.seq in cancelled,
                    skipped=frozenset(cancelled),
                )
                if accepted.local_rollback is not None:
                    _check_local(agent, *accepted.local_rollback)
            except (SecurityRefusal, NotInstalled) as e:
                agent.record_event("command", "critical" if isinstance(e, SecurityRefusal) else "warning",
                                   {"refused": cmd.describe(), "why": str(e)[:300], "sha256": sg.sha256})
                if single:
                    raise
                results.append(_send(on_result, *_sign(agent, cmd, sg.sha256, "refused", str(e), {})))
                continue
            if accepted.wipe:
                if agent.updater is not None:
                    agent.updater.abort()  # nothing downloads onto a board being wiped
                results.append(_decommission(agent, accepted, sg, on_result))
                break  # nothing is left to obey anything else
            if accepted.fetch:
                ender = _ended_by(agent, commands, cmd, me, limits)
                if ender is None:
                    deferred = sg  # the commands after it wait for it (sequence order)
                    break
                # An end-of-life command follows: it is not held back by a download. The update
                # is cancelled (and stopped if it is downloading): the operator ended it, the
                # board did not fail it (a rollout does not count it as a failure).
                if agent.updater is not None:
                    agent.updater.abort([cmd.seq])
                why = (f"update #{cmd.seq} cancelled, nothing installed: {ender} follows it and is carried out "
                       "without waiting for the download; issue the update again if it is still wanted")
                agent.record_event("command", "warning", {"cancelled": cmd.describe(), "why": why,
                                                          "sha256": sg.sha256})
                results.append(_send(on_result, *_sign(agent, cmd, sg.sha256, "cancelled", why, {})))
                continue
            results.append(_carry_out(agent, accepted, sg, key, on_result))
        if agent.updater is not None and agent.updater.in_flight is not None and agent.store.is_provisioned():
            # A number at or past the update downloading was consumed (a cancel, a retire, a later
            # command from a single delivery): it is no longer to be carried out.
            agent.updater.abort(range(agent.updater.in_flight, agent.state().command_seq + 1))
    if deferred is not None:
        results += _update(agent, payload, deferred, on_result, single)
    return results


def _update(agent: Agent, payload: bytes, sg: Signed, on_result: OnResult | None, single: bool) -> list[bytes]:
    """An accepted update: handed to the agent's worker when it has one (``serve``), else carried
    out here (a command file at the board), followed by the rest of the delivery."""
    from device_agent.commands import update

    if agent.updater is not None:
        agent.updater.submit(payload, sg, on_result)
        return []
    data = update.finish(agent, sg, on_result)
    rest = [] if single else apply(agent, payload, on_result)
    return ([data] if data is not None else []) + rest


ENDS = ("decommission", "retire")  # commands an update in hand does not hold back


def _ended_by(agent: Agent, commands: list[Signed], update: Command, me: Identity, limits: Any) -> str | None:
    """The first command after ``update`` in the delivery that ends it (a decommission, or a
    retire of the model it updates) and that the board would obey: one that passes every check a
    command must pass. A retire of another model waits for the update like any command."""
    state = agent.state()
    for sg in commands:
        c = sg.item
        if not (isinstance(c, Command) and c.kind in ENDS and c.seq > update.seq):
            continue
        if c.kind == "retire" and c.args["model_id"] != update.args["model_id"]:
            continue
        try:
            check_command(c, sg.signer, me, agent.trust_anchors(), state, agent._clock(), limits.future_skew_s)
        except SecurityRefusal:
            continue
        return f"command #{c.seq} ({c.kind})"
    return None


def _seq(sg: Signed) -> int:
    return sg.item.seq if isinstance(sg.item, Command) else 0


def _cancelled(agent: Agent, commands: list[Signed], me: Identity, limits: Any) -> set[int]:
    """Sequence numbers cancelled by a cancel in the same delivery that the board would obey:
    one that passes every check a command must pass, and names an earlier, unapplied number."""
    out = set()
    state = agent.state()
    for sg in commands:
        c = sg.item
        if not (isinstance(c, Command) and c.kind == "cancel" and c.seq > state.command_seq):
            continue
        try:
            check_command(c, sg.signer, me, agent.trust_anchors(), state, agent._clock(), limits.future_skew_s)
        except SecurityRefusal:
            continue
        if state.command_seq < c.args["seq"] < c.seq:
            out.add(c.args["seq"])
    return out


def _send(on_result: OnResult | None, data: bytes, result: Result) -> bytes:
    if on_result is not None:
        on_result(data, result)
    return data


def _carry_out(agent: Agent, acc: Accepted, sg: Signed, key: bytearray, on_result: OnResult | None) -> bytes:
    """Carry out an accepted command (the caller holds the locks). The result is signed and
    handed on before the new state is saved: a power cut between the two repeats the command
    when the queue comes again, and its repeat answers again, rather than losing the answer."""
    cmd = acc.command
    effects: dict[str, Any] = {}
    if acc.rotate_box_key:
        effects.update(_rotate_box_key(agent))
    if acc.shred:
        effects["bundles_destroyed"] = sorted(acc.shred)
    if cmd.kind in ("retire", "rollback"):
        effects["model_id"] = cmd.args["model_id"]
    if cmd.kind == "update":  # an update whose exact file this board already serves
        effects.update({k: cmd.args[k] for k in ("release_id", "model_id", "model_version")})
    if cmd.kind == "rotate-key":
        effects["role"] = cmd.args["role"]
        effects["fingerprints"] = [crypto.fingerprint(base64.b64decode(k)) for k in cmd.args["keys"]]
    if acc.local_rollback is not None:
        # Checked before the result is signed: a local version this board does not keep refuses the
        # command (and consumes nothing).
        effects["local_version"] = _local_rollback(agent, *acc.local_rollback, cmd.seq)
    outcome = "cancelled" if acc.detail.startswith("cancelled") else "applied"
    signed = _sign(agent, cmd, sg.sha256, outcome, acc.detail, effects)
    _send(on_result, *signed)
    if acc.anchors != agent.trust_anchors():
        agent.store.save_trust(acc.anchors, key)
    agent.store.save_state(acc.state, key)
    agent._state_cache = None
    if acc.shred:
        agent.store.collect_garbage(acc.state)
    for mid in list(agent._loaded):
        slot = acc.state.models.get(mid)
        if slot is None or slot.current is None or slot.current.bundle_id != agent._loaded[mid].manifest.bundle_id:
            agent._loaded.pop(mid)
    agent.record_event("command", "info", {"applied": cmd.describe(), "outcome": outcome, "sha256": sg.sha256})
    return signed[0]


def _local_manifest(agent: Agent, model_id: str) -> Any:
    vb, _ = agent._verified_stored(model_id, agent.state())
    return vb.manifest


def _check_local(agent: Agent, model_id: str, local: int) -> None:
    """Refuse a rollback to a local version this board does not keep (before anything is done)."""
    from device_agent.learning.cycle import Learning

    if not Learning(agent).kept(_local_manifest(agent, model_id), local):
        raise SecurityRefusal(f"local version {local} of model {model_id} is not kept on this board")


def _local_rollback(agent: Agent, model_id: str, local: int, seq: int) -> int | None:
    """Serve local version ``local`` of ``model_id`` (the caller holds the data-dir lock)."""
    from device_agent.learning.cycle import Learning

    doc = Learning(agent).rollback(_local_manifest(agent, model_id), local, by=f"command #{seq}", locked=True)
    return doc["local_version"]


def _rotate_box_key(agent: Agent) -> dict[str, Any]:
    """A new encryption key for the board, and its enrolment signed by the identity key, so the
    fleet packs the next release for the new key."""
    keys = agent._unlock()
    try:
        public = agent.store.rotate_box_key(keys, agent._source)
        me = agent.store.identity()
        enrolment = Enrolment(me.device_id, public, me.sign_public, agent._clock())
        signed = enrolment.signed_bytes(crypto.sign(keys.signer(), ENROLMENT_DOMAIN, canonical_json(enrolment.body())))
    finally:
        keys.wipe()
    return {"box_fingerprint": crypto.fingerprint(public), "enrolment": json.loads(signed)}


def _decommission(agent: Agent, acc: Accepted, sg: Signed, on_result: OnResult | None) -> bytes:
    """The wipe, ordered by a command (the caller holds the locks). The result is signed while
    the identity key exists, sent only once every key is shredded (so "applied" is true when
    the fleet reads it), and the rest of the wipe completes after it was sent."""
    from device_agent.store import wipe

    cmd = acc.command
    now = trusted_now(agent._clock(), acc.state.clock_floor)
    by = {"command_seq": cmd.seq, "command_sha256": sg.sha256, "operator": crypto.fingerprint(sg.signer)}
    agent._loaded.clear()
    doc = wipe.begin(agent.store, agent._source, now, by=by) if not wipe.wipe_pending(agent.store.path) else None
    attestation = {"body": doc["body"], "signature": doc["signature"]} if doc else {}
    data, result = _sign(agent, cmd, sg.sha256, "applied", acc.detail, {"attestation": attestation})
    try:
        wipe.shred_secrets(agent.store)
        _send(on_result, data, result)
    finally:
        wipe.complete(agent.store, now)
    return data


def _sign(agent: Agent, cmd: Command, sha256: str, outcome: str, detail: str,
          effects: dict[str, Any]) -> tuple[bytes, Result]:
    # Always this board's id: a refused command may name another board, and the fleet checks a
    # result against the key of the board it names.
    me = agent.store.identity().device_id
    result = Result(me, cmd.seq, cmd.kind, sha256, outcome, detail[:500], agent._clock(), effects)
    keys = agent._unlock()
    try:
        return encode_result(result, keys.signer()), result
    finally:
        keys.wipe()


def apply_beacon(agent: Agent, beacon: Beacon) -> bool:
    """Move the clock floor to a verified beacon's time, or hold it (and report) when it is far
    ahead of every other source; returns whether it was held."""
    hold = agent.config.commands.beacon_hold_s
    key = agent._key()
    with agent._lock, agent.store.locked():
        state = agent.state()
        after, held = decide_beacon(beacon.time, state, agent._clock(), hold)
        if after != state:
            agent.store.save_state(after, key)
            agent._state_cache = None
    if held:
        agent.record_event("time", "warning", {
            "held_beacon": format_time(beacon.time),
            "board_time": format_time(trusted_now(agent._clock(), state.clock_floor)),
            "why": f"more than {int(hold)} s ahead of the board's clock and floor; applied once confirmed",
        })
    return held


def sweep_end_of_life(agent: Agent) -> list[str]:
    """Retire the models whose end of life has passed; returns their ids.

    A model stops *serving* once the trusted time (the later of the system clock and the floor)
    passes its end of life (device_agent.trust.decisions.check_serving_life). It is *shredded*
    only once the signed floor has passed it: a wrong forward jump of the unsigned system clock
    pauses serving while it lasts, and ends no model's life for good. Its bundles and local keys
    are shredded; the board's encryption key is not rotated here (that would leave the fleet
    without the board's new enrolment): a copy of the bundle is past its end of life everywhere."""
    key = agent._key()
    with agent._lock, agent.store.locked():
        state = agent.state()
        if state.clock_floor is None:
            return []
        now = state.clock_floor
        publishers = list(agent.trust_anchors().publishers)
        ended = []
        for mid, slot in sorted(state.models.items()):
            if slot.current is None:
                continue
            try:
                head, length = agent.store.read_bundle_head(slot.current.bundle_id)
                m, _, _ = verify_head(head, length, publishers, agent.limits)
            except EdgeWardError:
                continue  # the serving check refuses it; end of life needs a verified date
            if m.end_of_life is not None and now >= m.end_of_life:
                ended.append(mid)
        if not ended:
            return []
        after = replace(
            state,
            models={k: v for k, v in state.models.items() if k not in ended},
            retired={**state.retired, **{m: Retired(now, "end of life") for m in ended}},
        )
        agent.store.save_state(after, key)
        agent._state_cache = None
        agent.store.collect_garbage(after)
        for mid in ended:
            agent._loaded.pop(mid, None)
    for mid in ended:
        agent.record_event("end-of-life", "warning", {"model_id": mid, "at": format_time(now),
                                                     "action": "stopped serving; bundles and keys shredded"})
    return ended
