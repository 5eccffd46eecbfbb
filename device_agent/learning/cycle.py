"""Local learning over one agent: intake, review, one update cycle, local rollback, and the
serving side (which local head serves, checked; automatic rollback when a check fails).

Each operation loads what it needs, calls the pure decisions (:mod:`.filters`, :mod:`.head`,
:mod:`.gate`), and persists the result under the data directory's lock. The learning itself
(features, refit, gate) runs before the lock is taken; the commit re-reads the state and gives
up if the installed bundle changed in the meantime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent import crypto
from device_agent.errors import EdgeWardError, FormatError, IntegrityError, SecurityRefusal, UsageError
from device_agent.learning import filters
from device_agent.learning import gate as gating
from device_agent.learning.head import HeadWeights, refit, softmax
from device_agent.learning.policy import LearningPolicy
from device_agent.learning.store import (
    LOG_SCHEMA,
    Feedback,
    LearningState,
    LearningStore,
    Version,
    data_key,
    log_head,
    verify_log,
)
from device_agent.service.detect import Calibration, features
from device_agent.wire import ID_RE, canonical_json, format_time

if TYPE_CHECKING:
    from device_agent.agent import Agent, LoadedModel
    from device_agent.bundle.format import Manifest, Sidecar
    from device_agent.runtime.runners import Runner

_log = logging.getLogger(__name__)
NEW, HELD, REVIEWED = "new", "held", "reviewed"
_BATCH = 256  # rows run through the model at once while learning


class NotLearnable(SecurityRefusal):
    """The installed bundle's sealed policy does not allow local learning."""


class FeedbackRefused(SecurityRefusal):
    """Feedback over a cap (rate, store size): nothing of the request was kept."""

    def __init__(self, message: str, retry_after: float = 3600.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def local_source(name: str) -> str:
    """The source name of a local operator at the board (``edgeward-agent feedback --source``)."""
    if not ID_RE.fullmatch(name):
        raise UsageError("--source must be 1-64 letters, digits, '.', '_' or '-'")
    return f"local:{name}"


def token_source(token_id: str) -> str:
    return f"token:{token_id}"


def _epoch(dt: datetime) -> float:
    return dt.timestamp()


@dataclass(frozen=True)
class Head:
    """The local head chosen to serve a bundle: its number and the initializers that override the
    publisher's."""

    version: int
    initializers: dict[str, np.ndarray]
    policy: LearningPolicy


class Learning:
    """Local learning on one agent's data directory."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = agent.config.learning
        self.files = LearningStore(agent.store, self.config)

    # --- keys and context ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _data_key(self) -> Iterator[bytearray]:
        keys = self.agent._unlock()
        try:
            key = data_key(keys)
        finally:
            keys.wipe()
        try:
            yield key
        finally:
            crypto.wipe(key)

    def policy_of(self, loaded: LoadedModel) -> LearningPolicy:
        pol = LearningPolicy.from_policy(loaded.sidecar.policy, self.config)
        if pol is None:
            raise NotLearnable(
                f"model {loaded.manifest.model_id} v{loaded.manifest.model_version} was not packed for local learning "
                "(edgeward pack --learnable); nothing is learnt or kept on this board"
            )
        if not pol.enabled:
            raise NotLearnable(f"the publisher's policy for model {loaded.manifest.model_id} "
                               f"v{loaded.manifest.model_version} does not allow local learning")
        return pol

    def _reconcile(self, st: LearningState, manifest: Manifest, policy: LearningPolicy | None) -> tuple[
            LearningState, bool]:
        """The learning state for the bundle now installed: local versions learnt on another bundle
        are superseded (shredded after the state stops naming them); feedback carries over only if
        the new bundle's policy says so. Returns (state, whether feedback must be shredded)."""
        if st.bundle_id == manifest.bundle_id:
            return st, False
        carry = policy is not None and policy.enabled and policy.carry_feedback
        fresh = LearningState(manifest.bundle_id, None, (), 1, dict(st.counters))
        return fresh, st.bundle_id is not None and not carry

    def _persist_reconciled(self, manifest: Manifest, policy: LearningPolicy | None) -> LearningState:
        """Reconcile and persist (the caller holds the data-dir lock)."""
        key = self.agent._key()
        st = self.files.state(key)
        after, shred = self._reconcile(st, manifest, policy)
        if after != st:
            if shred:
                self.files.shred_feedback()
            self.files.save_state(after, key)
            self.files.collect_garbage(after)
            self.agent.record_event("learning", "info", {
                "superseded": st.bundle_id, "by": manifest.bundle_id,
                "feedback": "shredded" if shred else "kept", "local_versions_dropped": len(st.versions)})
        return after

    # --- intake --------------------------------------------------------------------------------
    def intake(self, loaded: LoadedModel, rows: np.ndarray, labels: np.ndarray, source: str,
               now: datetime) -> dict[str, Any]:
        """Keep labelled examples (model inputs after the sealed pre-processing) from ``source``,
        within the policy's daily rate cap per source and the store's size caps."""
        policy = self.policy_of(loaded)
        rows = np.asarray(rows, dtype=np.float32)
        labels = _labels(labels, len(rows), policy.head.classes)
        if len(rows) > self.config.max_per_request:
            raise FormatError(f"{len(rows)} examples in one request; the limit is {self.config.max_per_request}")
        if rows[0].nbytes > self.config.max_example_bytes:
            raise FormatError(f"one example is {rows[0].nbytes} bytes; the limit is {self.config.max_example_bytes}")
        t = _epoch(now)
        b = policy.bounds
        self.agent._key()
        with self.agent._lock, self.agent.store.locked(), self._data_key() as key:
            st = self._persist_reconciled(loaded.manifest, policy)
            fb = self.files.feedback(key, tuple(rows.shape[1:]))
            fb, expired = _expire(fb, t, float(b["retention_days"]))
            sent_today = filters.within_day([m["received"] for m in fb.meta], [m["source"] for m in fb.meta], t)
            room_rate = max(0, int(b["source_daily_cap"]) - sent_today[source])
            per_bytes = max(1, rows[0].nbytes)
            room_store = max(0, min(int(b["max_examples"]) - len(fb.meta),
                                    self.config.max_store_bytes // per_bytes - len(fb.meta)))
            take = min(len(rows), room_rate, room_store)
            refused = {"rate cap": min(len(rows), len(rows) - min(len(rows), room_rate))}
            refused["store full"] = len(rows) - take - refused["rate cap"]
            refused = {k: v for k, v in refused.items() if v > 0}
            if take == 0:
                if expired:
                    self.files.save_feedback(fb, key)
                self.agent.record_event("learning", "warning", {"feedback_refused": refused, "source": source})
                why = "its daily rate cap" if "rate cap" in refused else "the feedback store's size cap"
                raise FeedbackRefused(f"no example kept: source {source} is over {why}; try later, or review "
                                      "and delete held feedback")
            new_meta = []
            for i in range(take):
                digest = hashlib.sha256(rows[i].tobytes()).hexdigest()
                new_meta.append({"id": f"{int(t * 1000):x}-{digest[:12]}-{i}", "source": source,
                                 "label": int(labels[i]), "received": t, "status": NEW, "reason": "",
                                 "digest": digest})
            fb = Feedback(fb.shape, np.concatenate([fb.x, rows[:take]]), fb.meta + new_meta)
            self.files.save_feedback(fb, key)
            if refused or expired:
                self.files.save_state(st.count(**{"refused_at_intake": sum(refused.values()), "expired": expired}),
                                      self.agent._key())
        return {"received": len(rows), "kept": take, "refused": refused, "expired": expired, "held_total": len(fb.meta)}

    # --- review ------------------------------------------------------------------------------------
    def held(self, loaded: LoadedModel, status: str | None = None) -> list[dict[str, Any]]:
        """What is held on the board, for review: ids, sources, labels, states; never the inputs."""
        with self._data_key() as key:
            fb = self.files.feedback(key, _input_shape(loaded))
        return [{k: m[k] for k in ("id", "source", "label", "status", "reason")} | {
            "received": format_time(datetime.fromtimestamp(m["received"], UTC))}
            for m in fb.meta if status is None or m["status"] == status]

    def review(self, loaded: LoadedModel, accept: list[str], drop: list[str]) -> dict[str, Any]:
        """An engineer's verdict on held examples: accepted ones are learnt (they skip the label
        check), dropped ones are deleted."""
        if len(accept) + len(drop) > self.config.max_review_ids:
            raise FormatError(f"at most {self.config.max_review_ids} ids in one review")
        with self.agent._lock, self.agent.store.locked(), self._data_key() as key:
            fb = self.files.feedback(key, _input_shape(loaded))
            ids = {m["id"]: i for i, m in enumerate(fb.meta)}
            unknown = [x for x in accept + drop if x not in ids]
            if unknown:
                raise UsageError(f"no example held with id {unknown[0]!r}; list them with 'feedback --list'")
            for x in accept:
                fb.meta[ids[x]].update(status=REVIEWED, reason="accepted by review")
            keep = np.ones(len(fb.meta), dtype=bool)
            for x in drop:
                keep[ids[x]] = False
            fb = fb.keep(keep)
            self.files.save_feedback(fb, key)
        return {"accepted": len(accept), "dropped": len(drop), "held_total": len(fb.meta)}

    def delete_source(self, loaded: LoadedModel, source: str) -> dict[str, Any]:
        """Delete everything one source sent (the next version is learnt without it)."""
        with self.agent._lock, self.agent.store.locked(), self._data_key() as key:
            fb = self.files.feedback(key, _input_shape(loaded))
            keep = np.array([m["source"] != source for m in fb.meta], dtype=bool)
            fb = fb.keep(keep)
            self.files.save_feedback(fb, key)
        return {"source": source, "deleted": int((~keep).sum()), "held_total": len(fb.meta)}

    # --- one update cycle -----------------------------------------------------------------------------
    def cycle(self, now: datetime, model_id: str | None = None) -> dict[str, Any]:
        """Filter what is held, refit the head, judge it by the gate, and keep it if it passes."""
        loaded = self.agent.model(model_id)
        policy = self.policy_of(loaded)
        m = loaded.manifest
        b = policy.bounds
        t = _epoch(now)
        with self.agent._lock, self.agent.store.locked():
            st = self._persist_reconciled(m, policy)
        with self._data_key() as key:
            fb = self.files.feedback(key, _input_shape(loaded))
        fb, expired = _expire(fb, t, float(b["retention_days"]))
        report: dict[str, Any] = {"model_id": m.model_id, "model_version": m.model_version, "accepted": False,
                                  "local_version": st.current, "expired": expired}
        if not fb.meta:
            report.update(examples={"held_on_board": 0, "used": 0, "held": 0, "rejected": 0, "deferred": 0,
                                    "reasons": {}, "by_source": {}}, reasons=["nothing to learn: no feedback held"])
            return report
        base = self.agent.load_variant(m.model_id, None)
        head = policy.head
        base_w = _base_head(policy)
        labels = np.array([e["label"] for e in fb.meta], dtype=np.int64)
        sources = [e["source"] for e in fb.meta]
        digests = [e["digest"] for e in fb.meta]
        feats = _features(base, head.features, fb.x)
        probs = softmax(base_w.scores(feats).astype(np.float64)) if len(fb.x) else np.zeros((0, head.classes))
        flat = np.stack([features(r) for r in fb.x]) if len(fb.x) else np.zeros((0, 1))
        reviewed = np.array([e["status"] == REVIEWED for e in fb.meta], dtype=bool)
        sc = filters.screen(flat, digests, feats, probs, labels, sources, reviewed,
                            Calibration.from_policy(loaded.sidecar.policy), b)
        counts = sc.counts()
        used = sc.used()
        report["examples"] = {
            "held_on_board": len(fb.meta),
            "used": int(used.sum()),
            "held": sum(counts.get(filters.HELD, {}).values()),
            "rejected": sum(counts.get(filters.REJECTED, {}).values()),
            "deferred": sum(counts.get(filters.DEFERRED, {}).values()),
            "reasons": {k: v for k, v in counts.items() if k != filters.USE},
            "by_source": _by_source(sources, sc.decision),
        }
        # Held examples wait for review; rejected and expired ones are counted and deleted. Applied by
        # id at the commit, to the store as it is then: feedback kept meanwhile is not lost.
        outcome: dict[str, tuple[str, str] | None] = {}
        for i, e in enumerate(fb.meta):
            if sc.decision[i] == filters.REJECTED:
                outcome[e["id"]] = None
            elif sc.decision[i] == filters.HELD:
                outcome[e["id"]] = (HELD, sc.reason[i])
            elif e["status"] == HELD:
                outcome[e["id"]] = (NEW, "")
        verdict = None
        candidate = None
        if used.any():
            hold = filters.holdout(digests, used, float(b["holdout_fraction"]))
            train = used & ~hold
            replay = _features(base, head.features, policy.replay_x)
            candidate = refit(base_w, feats[train], labels[train], replay, replay_weight=float(b["replay_weight"]),
                              l2=float(b["l2"]), learning_rate=float(b["learning_rate"]), steps=int(b["steps"]))
            inits = _initializers(policy, candidate)
            cand = self.agent.load_variant(m.model_id, inits)
            verdict = gating.judge(
                b, policy.gate_y, _predict(base, head.output, policy.gate_x),
                _predict(cand, head.output, policy.gate_x), policy.canary_y,
                _predict(cand, head.output, policy.canary_x), labels[hold],
                _predict(base, head.output, fb.x[hold]), _predict(cand, head.output, fb.x[hold]),
            )
            report.update(gate=verdict.metrics, reasons=verdict.reasons)
        else:
            report["reasons"] = ["nothing to learn: no example passed the filters"]
        self._commit(loaded, policy, outcome, candidate, verdict, report, t)
        return report

    def _commit(self, loaded: LoadedModel, policy: LearningPolicy, outcome: dict[str, tuple[str, str] | None],
                candidate: HeadWeights | None,
                verdict: gating.Verdict | None, report: dict[str, Any], t: float) -> None:
        m = loaded.manifest
        seal = self.agent._key()
        ex = report["examples"]
        with self.agent._lock, self.agent.store.locked():
            state = self.agent.state()
            slot = state.models.get(m.model_id)
            if slot is None or slot.current is None or slot.current.bundle_id != m.bundle_id:
                raise UsageError("the installed bundle changed while learning ran; nothing was kept, run it again")
            st = self.files.state(seal)
            st = st.count(held=ex["held"], rejected=ex["rejected"], deferred=ex["deferred"], cycles=1,
                          expired=report["expired"])
            with self._data_key() as key:
                fb = self.files.feedback(key, _input_shape(loaded))
                fb, _ = _expire(fb, t, float(policy.bounds["retention_days"]))
                keep = np.array([outcome.get(e["id"], ()) is not None for e in fb.meta], dtype=bool)
                for e in fb.meta:
                    new = outcome.get(e["id"])
                    if new:
                        e.update(status=new[0], reason=new[1])
                self.files.save_feedback(fb.keep(keep), key)  # statuses, rejections and expiry, first
                if verdict is not None and verdict.accepted and candidate is not None:
                    st = self._accept(loaded, policy, st, candidate, key, report, t)
                else:
                    st = st.count(rejected_updates=1 if verdict is not None else 0)
            self.files.save_state(st, seal)
            self.files.collect_garbage(st)
        ev: dict[str, Any] = {k: report[k] for k in ("accepted", "local_version", "model_version") if k in report}
        ev.update(examples={k: v for k, v in ex.items() if k not in ("reasons", "by_source")}, gate=report.get("gate"),
                  reasons=report.get("reasons", [])[:5])
        if verdict is not None and not report["accepted"]:
            self.agent.record_event("learning", "warning", ev | {"rejected_update": True})
        else:  # accepted, or nothing to learn: the counts of held and rejected examples still go out
            self.agent.record_event("learning", "info", ev)

    def _accept(self, loaded: LoadedModel, policy: LearningPolicy, st: LearningState, candidate: HeadWeights,
                key: bytearray, report: dict[str, Any], t: float) -> LearningState:
        """Store the version, sign its log entry, then name it in the state (the caller saves the
        state): a power cut before the state is saved leaves the previous version serving."""
        m = loaded.manifest
        entries = verify_log(self.files.read_log(), self.agent.store.identity().sign_public, self.config)
        last = max([int(e.get("local_version") or 0) for e in entries if e.get("event") == "accepted"], default=0)
        number = max(st.next_version, last + 1)
        digest = self.files.write_version(m.bundle_id, number, candidate, key)
        seq, prev = log_head(entries)
        card = loaded.sidecar.model_card
        body = {
            "schema": LOG_SCHEMA, "seq": seq + 1, "prev": prev, "event": "accepted",
            "time": format_time(datetime.fromtimestamp(t, UTC)),
            "device_id": self.agent.store.identity().device_id,
            "model_id": m.model_id, "model_version": m.model_version, "bundle_id": m.bundle_id,
            "model_card_sha256": crypto.sha256_hex(canonical_json(card)) if card is not None else None,
            "local_version": number, "parent": st.current, "head_sha256": digest,
            "gate": report.get("gate"),
            "examples": {k: v for k, v in report["examples"].items() if k not in ("reasons", "by_source")},
        }
        keys = self.agent._unlock()
        try:
            self.files.append_log(body, keys)
        finally:
            keys.wipe()
        keep = policy.int_bound("keep_versions")
        version = Version(number, digest, t, st.current, int(report["examples"]["used"]))
        versions = (*st.versions, version)[-keep:]
        report.update(accepted=True, local_version=number)
        return replace(st, current=number, versions=versions, next_version=number + 1).count(accepted_updates=1)

    # --- rollback -------------------------------------------------------------------------------------
    def rollback(self, manifest: Manifest, to: int | None = None, *, by: str = "local", locked: bool = False
                 ) -> dict[str, Any]:
        """Serve an earlier local version (``to``; 0: the publisher's head; None: the one before the
        current). ``locked``: the caller already holds the data-dir lock (a fleet command)."""
        ctx = contextlib.nullcontext() if locked else self.agent.store.locked()
        seal = self.agent._key()
        with self.agent._lock, ctx:
            st = self.files.state(seal)
            if st.bundle_id != manifest.bundle_id or st.current is None:
                if to in (None, 0):
                    return {"model_id": manifest.model_id, "local_version": None,
                            "detail": "the publisher's head already serves"}
                raise SecurityRefusal(f"local version {to} is not kept on this board")
            if to is None:
                cur = st.version(st.current)
                to = cur.parent if cur is not None and cur.parent is not None and st.version(cur.parent) else 0
            if to != 0 and st.version(to) is None:
                kept = ", ".join(str(v.number) for v in st.versions) or "none"
                raise SecurityRefusal(f"local version {to} is not kept on this board (kept: {kept}; 0 is the "
                                      "publisher's head)")
            after = self._roll(manifest, st, to or None, by)
            self.files.save_state(after, seal)
        self.agent._loaded.pop(manifest.model_id, None)
        self.agent.record_event("learning", "warning", {"rollback": True, "from": st.current, "to": to or None,
                                                        "by": by})
        return {"model_id": manifest.model_id, "local_version": to or None, "from": st.current}

    def kept(self, manifest: Manifest, to: int) -> bool:
        """Whether local version ``to`` of ``manifest``'s bundle is kept (0, the publisher's head, always is)."""
        st = self.files.state(self.agent._key())
        return to == 0 or (st.bundle_id == manifest.bundle_id and st.version(to) is not None)

    def _roll(self, m: Manifest, st: LearningState, to: int | None, by: str) -> LearningState:
        entries = verify_log(self.files.read_log(), self.agent.store.identity().sign_public, self.config)
        seq, prev = log_head(entries)
        body = {"schema": LOG_SCHEMA, "seq": seq + 1, "prev": prev, "event": "rollback",
                "time": format_time(self.agent._clock()), "device_id": self.agent.store.identity().device_id,
                "model_id": m.model_id, "model_version": m.model_version, "bundle_id": m.bundle_id,
                "local_version": to, "parent": st.current, "by": by[:200]}
        keys = self.agent._unlock()
        try:
            self.files.append_log(body, keys)
        finally:
            keys.wipe()
        return replace(st, current=to).count(rollbacks=1)

    # --- serving -------------------------------------------------------------------------------------
    def current(self, bundle_id: str) -> int | None:
        st = self.files.state(self.agent._key())
        return st.current if st.bundle_id == bundle_id else None

    def serving_head(self, manifest: Manifest, sidecar: Sidecar) -> Head | None:
        """The local head that serves ``manifest``'s bundle, checked against the digest the sealed
        state recorded; a version that fails is rolled back automatically (and reported)."""
        if "learning" not in sidecar.policy:
            return None
        policy = LearningPolicy.from_policy(sidecar.policy, self.config)
        if policy is None or not policy.enabled:
            return None
        for _ in range(self.config.max_versions + 1):
            st = self.files.state(self.agent._key())
            if st.bundle_id != manifest.bundle_id or st.current is None:
                return None
            v = st.version(st.current)
            if v is None:
                raise IntegrityError("the learning state names a serving local version it does not keep")
            try:
                with self._data_key() as key:
                    w = self.files.read_version(manifest.bundle_id, v, key)
                return Head(v.number, _initializers(policy, w), policy)
            except (IntegrityError, FormatError) as e:
                self.fall_back(manifest, v.number, str(e))
        return None

    def fall_back(self, manifest: Manifest, bad: int, why: str) -> None:
        """Automatic rollback: the version that failed a check stops serving, its parent (or the
        publisher's head) serves instead, and an event reports it."""
        seal = self.agent._key()
        with self.agent.store.locked():
            st = self.files.state(seal)
            if st.bundle_id != manifest.bundle_id or st.current != bad:
                return
            cur = st.version(bad)
            to = cur.parent if cur is not None and cur.parent is not None and st.version(cur.parent) else None
            versions = tuple(v for v in st.versions if v.number != bad)
            st2 = replace(st, current=to, versions=versions).count(automatic_rollbacks=1)
            try:
                st2 = self._roll_automatic(manifest, st2, bad, to, why)
            except EdgeWardError as e:  # the log refuses: still stop serving the bad version
                _log.warning("could not log an automatic rollback: %s", e)
            self.files.save_state(st2, seal)
            self.files.collect_garbage(st2)
        self.agent.record_event("learning", "critical", {"automatic_rollback": True, "from": bad, "to": to,
                                                         "why": why[:300]})

    def _roll_automatic(self, manifest: Manifest, st: LearningState, bad: int, to: int | None,
                        why: str) -> LearningState:
        entries = verify_log(self.files.read_log(), self.agent.store.identity().sign_public, self.config)
        seq, prev = log_head(entries)
        body = {"schema": LOG_SCHEMA, "seq": seq + 1, "prev": prev, "event": "rollback",
                "time": format_time(self.agent._clock()), "device_id": self.agent.store.identity().device_id,
                "model_id": manifest.model_id, "model_version": manifest.model_version,
                "bundle_id": manifest.bundle_id, "local_version": to, "parent": bad, "by": f"automatic: {why[:200]}"}
        keys = self.agent._unlock()
        try:
            self.files.append_log(body, keys)
        finally:
            keys.wipe()
        return st

    def gate_holds(self, runner: Runner, head: Head) -> bool:
        """The gate re-check of a local head as it is loaded: canaries and gate set, against the
        bounds, on the runtime that serves it (no base model needed: the recorded digest pinned
        the weights, this pins their behaviour)."""
        p = head.policy
        pred = _predict(runner, p.head.output, p.canary_x)
        if int((pred != p.canary_y).sum()) > p.bounds["max_canary_changes"]:
            return False
        acc = gating.accuracy(_predict(runner, p.head.output, p.gate_x), p.gate_y)
        base = gating.accuracy(_base_head(p).scores(_features(runner, p.head.features, p.gate_x)).argmax(axis=1),
                               p.gate_y)
        return acc is not None and base is not None and acc >= base - p.bounds["max_gate_drop"] - 1e-9

    def status(self, loaded: LoadedModel) -> dict[str, Any]:
        st = self.files.state(self.agent._key())
        entries = verify_log(self.files.read_log(), self.agent.store.identity().sign_public, self.config)
        mine = st.bundle_id == loaded.manifest.bundle_id
        return {
            "model_id": loaded.manifest.model_id, "bundle_id": loaded.manifest.bundle_id,
            "local_version": st.current if mine else None,
            "versions": [v.to_json() for v in st.versions] if mine else [],
            "counters": st.counters, "log_entries": len(entries), "log_verified": True,
        }


# --- helpers ------------------------------------------------------------------------------------------


def _labels(labels: np.ndarray, n: int, classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != n:
        raise FormatError(f"labels must be {n} integers (one per example), got {y.dtype} {y.shape}")
    if n == 0:
        raise FormatError("no examples sent")
    if y.min() < 0 or y.max() >= classes:
        raise FormatError(f"labels must be class indices in [0, {classes - 1}]")
    return y.astype(np.int64)


def _by_source(sources: list[str], decisions: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s, d in zip(sources, decisions, strict=True):
        out.setdefault(s, {})[d] = out.get(s, {}).get(d, 0) + 1
    return dict(sorted(out.items()))


def _expire(fb: Feedback, now: float, days: float) -> tuple[Feedback, int]:
    keep = np.array([now - e["received"] <= days * 86400.0 for e in fb.meta], dtype=bool)
    return (fb.keep(keep), int((~keep).sum())) if len(keep) and not keep.all() else (fb, 0)


def _input_shape(loaded: LoadedModel) -> tuple[int, ...]:
    spec = loaded.runner.inputs[0]
    return tuple(int(d) if d is not None else -1 for d in spec.shape[1:])


def _base_head(policy: LearningPolicy) -> HeadWeights:
    return HeadWeights(policy.base_weight, policy.base_bias.reshape(-1))


def _initializers(policy: LearningPolicy, w: HeadWeights) -> dict[str, np.ndarray]:
    h = policy.head
    return {h.weight: np.ascontiguousarray(w.weight, dtype=np.float32),
            h.bias: np.ascontiguousarray(w.bias, dtype=np.float32).reshape(h.bias_shape)}


def _run(runner: Any, names: list[str] | None, x: np.ndarray) -> list[np.ndarray]:
    feed = runner.inputs[0].name
    outs: list[list[np.ndarray]] = []
    for a in range(0, len(x), _BATCH):
        chunk = np.ascontiguousarray(x[a : a + _BATCH], dtype=np.float32)
        outs.append(runner.run_named({feed: chunk}, names) if names else runner.run({feed: chunk}))
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _features(runner: Any, name: str, x: np.ndarray) -> np.ndarray:
    if not len(x):
        return np.zeros((0, 1), dtype=np.float32)
    (f,) = _run(runner, [name], x)
    return f.reshape(len(x), -1).astype(np.float32)


def _predict(runner: Any, output: int, x: np.ndarray) -> np.ndarray:
    if not len(x):
        return np.zeros(0, dtype=np.int64)
    name = runner.outputs[output].name
    (y,) = _run(runner, [name], x)
    return y.reshape(len(x), -1).argmax(axis=1)


def now_utc() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)
