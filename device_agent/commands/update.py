"""Carrying out an over-the-air ``update`` on the board: fetch, verify, install, answer.

The decision to obey is :func:`device_agent.commands.decide.decide_update` (pure); this module
does the I/O, outside the data-dir lock so that the model keeps serving while the file arrives:

1. download the signed address into the staging file the layout names (``update.part``),
   bounded by the signed length and the board's timeouts (:mod:`device_agent.commands.fetch`);
2. check its SHA-256 against the signed one;
3. install it through :meth:`Agent.install_file`, exactly as a local install (publisher
   signature, target device, anti-rollback, expiry, trial load); the bundle must also be the
   model and version the command names. A refused install changes nothing: the previous model
   keeps serving;
4. consume the command's sequence number and send the signed result: ``applied`` with what was
   installed (under the data-dir lock of the install's commit, so that nothing comes between
   them), or ``refused`` with the reason; the staging files are removed either way.

``serve`` runs these steps in one worker thread (:class:`Updater`): one update at a time, and
the telemetry loop never waits on a download. An update in a later delivery waits for the one in
hand (sequence order), and so do the commands after it, except the ones that end it: a cancel
naming it, a decommission or a retire of its model (:func:`device_agent.commands.run.apply`
decides them at once and aborts the download).

An update is carried out only while it is still live: its number not consumed (by a cancel, an
end-of-life command or another process) and the worker not aborted. That is checked after the
download, in the install's precheck and again under the data-dir lock just before the install
commits; an update that is no longer live installs nothing and answers nothing (the command that
ended it has answered for it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.commands.fetch import FetchAborted, FetchSettings, Target, fetch
from device_agent.commands.format import Command, Signed
from device_agent.errors import EdgeWardError, SecurityRefusal, UsageError
from device_agent.store import layout
from device_agent.store.datadir import StagingBusy
from device_agent.trust.decisions import advance_floor

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.bundle.format import Manifest
    from device_agent.commands.run import OnResult

_log = logging.getLogger(__name__)


def settings(agent: Agent) -> FetchSettings:
    c = agent.config.commands
    return FetchSettings(c.update_connect_s, c.update_read_s, c.update_deadline_s, c.update_attempts,
                         c.update_ca_file)


class UpdateAbandoned(EdgeWardError):
    """The update is no longer to be carried out: cancelled, its number consumed meanwhile,
    aborted for a command that ends it, or the board wiped meanwhile."""


class AnswerFailed(Exception):
    """Answering an update failed after its install committed (the disk filled, say). Not an
    :class:`EdgeWardError` on purpose: it must never be reported as a refusal. The number stays
    unconsumed; the next delivery finds the model serving and answers ``applied``."""


OnCommit = Callable[[str, dict[str, Any]], None]


def record(agent: Agent, kind: str, severity: str, evidence: dict[str, Any]) -> None:
    """Record an event unless the board was wiped: a wipe (another process, a decommission)
    leaves only its attestation, never a new event store. Not to be called under the lock."""
    with contextlib.suppress(UsageError), agent.store.locked():  # locked() refuses a wiped board
        agent.record_event(kind, severity, evidence)


def fetch_and_install(agent: Agent, cmd: Command, abort: threading.Event | None = None,
                      on_commit: OnCommit | None = None) -> tuple[str, str, dict[str, Any]]:
    """Steps 1-4 but the last: (outcome, detail, effects) for the signed result; the outcome
    ``abandoned`` when the update stopped being live (nothing was installed). ``on_commit(detail,
    effects)`` runs under the data-dir lock right after the install commits. Raises
    :class:`UsageError` when another update holds the staging files (nothing consumed)."""
    args = cmd.args
    want = args["bundle"]
    staging = agent.store.layout.path(layout.UPDATE_STAGING)
    payload_path = agent.store.layout.path(layout.UPDATE_PAYLOAD)
    effects: dict[str, Any] = {"release_id": args["release_id"], "model_id": args["model_id"],
                               "model_version": args["model_version"]}

    def live() -> None:
        if abort is not None and abort.is_set():
            raise UpdateAbandoned(f"update #{cmd.seq} was aborted: a command that ends it arrived meanwhile")
        if not agent.store.is_provisioned():
            raise UpdateAbandoned(f"update #{cmd.seq} abandoned: the board was wiped while it was in hand")
        if cmd.seq <= agent.state().command_seq:
            raise UpdateAbandoned(f"update #{cmd.seq} was cancelled or overtaken while it downloaded "
                                  "(its number is consumed)")

    try:
        live()
        with agent.store.staging_held():
            try:
                return _fetch_and_install(agent, cmd, live, abort, staging, payload_path, effects, on_commit)
            finally:
                for path in (staging, payload_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
    except (UpdateAbandoned, FetchAborted) as e:
        return "abandoned", str(e), effects
    except StagingBusy:
        raise  # not this update's fault: it is tried again, its number unconsumed
    except EdgeWardError as e:
        if not agent.store.is_provisioned():  # wiped meanwhile: what failed is the board's absence
            return "abandoned", f"update #{cmd.seq} abandoned: the board was wiped while it was in hand", effects
        record(agent, "update", "critical" if isinstance(e, SecurityRefusal) else "warning",
               {"refused": f"update #{cmd.seq}", "why": str(e)[:300], "url": want["url"][:200]})
        return "refused", f"update refused, the previous model keeps serving: {e}", effects


def _fetch_and_install(agent: Agent, cmd: Command, live: Callable[[], None], abort: threading.Event | None,
                       staging: Path, payload_path: Path, effects: dict[str, Any],
                       on_commit: OnCommit | None) -> tuple[str, str, dict[str, Any]]:
    args = cmd.args
    want, shared = args["bundle"], args.get("payload")
    for f in (want, shared):
        if f is not None and f["length"] > agent.limits.max_bundle_bytes:
            raise SecurityRefusal(f"the update names a file of {f['length']} bytes, over this board's bundle "
                                  f"limit of {agent.limits.max_bundle_bytes}")
    how = settings(agent)
    start = time.monotonic()
    got = fetch(Target(want["url"], want["length"], want["sha256"]), staging, how, abort=abort)
    effects["downloaded_bytes"] = got.length
    effects["connections"] = got.connections
    if shared is not None:
        # One deadline for the whole update: what the envelope took is not given again.
        left = max(0.001, how.deadline_s - (time.monotonic() - start))
        more = fetch(Target(shared["url"], shared["length"], shared["sha256"]), payload_path,
                     replace(how, deadline_s=left), abort=abort)
        effects["downloaded_bytes"] += more.length
        effects["connections"] += more.connections

    def expect(m: Manifest) -> None:
        if m.model_id != args["model_id"] or m.model_version != args["model_version"]:
            raise SecurityRefusal(
                f"the downloaded bundle is {m.model_id} version {m.model_version}, the update names "
                f"{args['model_id']} version {args['model_version']}: refused"
            )
        live()  # here before the payload is read, and under the data-dir lock before the commit

    def installed(m: Manifest) -> str:
        effects["bundle_id"] = m.bundle_id
        return f"model {m.model_id} version {m.model_version} of release {args['release_id']} installed"

    def committed(m: Manifest) -> None:  # under the data-dir lock, the install just committed
        if on_commit is not None:
            try:
                on_commit(installed(m), effects)
            except Exception as e:
                raise AnswerFailed(f"update #{cmd.seq} was installed but could not be answered: {e}") from e

    live()
    if shared is not None:
        m = agent.install_release(staging, payload_path, expect=expect, on_commit=committed)
    else:
        m = agent.install_file(staging, expect=expect, on_commit=committed)
    detail = installed(m)
    record(agent, "update", "info", {"installed": detail, "url": want["url"][:200]})
    return "applied", detail, effects


def finish(agent: Agent, sg: Signed, on_result: OnResult | None,
           abort: threading.Event | None = None) -> bytes | None:
    """Fetch and install the accepted update ``sg``, consume its number and answer. None when it
    stopped being live meanwhile (cancelled, overtaken, aborted, the board wiped): then nothing
    was installed, and the command that ended it has answered.

    An installed update consumes its number and signs ``applied`` in the critical section of the
    install's commit: a cancel or another process that comes after finds it carried out (a
    cancel is refused, "already carried out"), so the signed results always tell the truth."""
    from device_agent.commands.run import _send, _sign

    cmd = sg.item
    if not isinstance(cmd, Command):
        raise EdgeWardError(f"internal error: {type(cmd).__name__} is not an update")
    answered: list[bytes] = []

    def consume(outcome: str, detail: str, effects: dict[str, Any]) -> bytes:
        """Sign the result, hand it on, then save the number consumed (the caller holds the locks)."""
        state = agent.state()
        after = advance_floor(replace(state, command_seq=cmd.seq), cmd.issued, agent.config.commands.beacon_hold_s)
        data, result = _sign(agent, cmd, sg.sha256, outcome, detail, effects)
        _send(on_result, data, result)
        agent.store.save_state(after, agent._key())
        agent._state_cache = None
        return data

    def on_commit(detail: str, effects: dict[str, Any]) -> None:
        answered.append(consume("applied", detail, effects))

    outcome, detail, effects = fetch_and_install(agent, cmd, abort, on_commit)
    if outcome == "abandoned":
        _log.info("%s", detail)
        record(agent, "update", "info", {"abandoned": f"update #{cmd.seq}", "why": detail[:300], "sha256": sg.sha256})
        return None
    if outcome == "applied":
        data = answered[0]
    else:
        try:
            with agent._lock, agent.store.locked():
                if cmd.seq <= agent.state().command_seq:
                    return None  # another process consumed the number meanwhile: it has answered
                data = consume(outcome, detail, effects)
        except UsageError:
            if agent.store.is_provisioned():
                raise
            return None  # wiped meanwhile: nothing is left to answer for
    record(agent, "command", "info" if outcome == "applied" else "warning",
           {"applied": cmd.describe(), "outcome": outcome, "sha256": sg.sha256})
    return data


class Updater:
    """The worker that carries out updates for ``serve``: one at a time, off the telemetry loop.

    A delivery that reaches an update hands it here and stops (the commands after it wait, in
    sequence order). When the update is done, the newest delivery seen meanwhile is handed back
    (``redeliver``: the telemetry loop's inbox) or, without one, applied here; that carries out
    what followed the update (a second update included)."""

    def __init__(self, agent: Agent, redeliver: Callable[[bytes], None] | None = None) -> None:
        self.agent = agent
        self._redeliver = redeliver
        self._lock = threading.Lock()
        self._busy: str | None = None  # the digest of the update in hand
        self._seq: int | None = None  # its sequence number
        self._abort = threading.Event()  # set to end the update in hand (a cancel, an end of life)
        self._latest: tuple[bytes, OnResult | None] | None = None
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()
        self.idle.set()

    @property
    def busy(self) -> str | None:
        return self._busy

    @property
    def in_flight(self) -> int | None:
        """The sequence number of the update in hand, if any."""
        return self._seq

    def abort(self, seqs: Collection[int] | None = None) -> bool:
        """End the update in hand if its number is among ``seqs`` (None: whichever it is): the
        download stops at once and nothing is installed. Returns whether one was aborted."""
        with self._lock:
            if self._busy is None or self._seq is None or (seqs is not None and self._seq not in seqs):
                return False
            self._abort.set()
            return True

    def submit(self, payload: bytes, sg: Signed, on_result: OnResult | None) -> None:
        with self._lock:
            self._latest = (payload, on_result)
            if self._busy is not None:
                return  # the update in hand (or one queued behind it through this delivery)
            self._busy = sg.sha256
            self._seq = sg.item.seq if isinstance(sg.item, Command) else None
            self._abort = threading.Event()
            self.idle.clear()
            self._thread = threading.Thread(target=self._work, args=(sg, on_result), name="edgeward-update",
                                            daemon=True)
            self._thread.start()

    def _work(self, sg: Signed, on_result: OnResult | None) -> None:
        from device_agent.commands import run

        failed = False
        try:
            finish(self.agent, sg, on_result, self._abort)
        except Exception:  # a bug or a full disk must not leave the board unable to take the next update
            if self.agent.store.is_provisioned():  # else a decommission ended the board meanwhile
                _log.exception("carrying out update %s failed; it is tried again at the next delivery",
                               sg.sha256[:16])
            failed = True
        with self._lock:
            self._busy = None
            self._seq = None
            latest, self._latest = self._latest, None
            if failed:
                latest = None  # not at once: the next delivery (or reconnection) brings it again
            if not self.agent.store.is_provisioned():
                latest = None  # a decommission ended the board while the update was in hand
        try:
            if latest is not None and self._redeliver is not None:
                self._redeliver(latest[0])
            elif latest is not None:
                run.apply(self.agent, latest[0], latest[1])
        except Exception:
            if self.agent.store.is_provisioned():  # else a decommission ended the board meanwhile: nothing is left
                _log.exception("carrying out the commands after an update failed")
        finally:
            with self._lock:
                if self._busy is None:
                    self.idle.set()
