"""``device_agent.Agent``: the board's agent as a Python API (the CLI and the service call it).

The agent loads what a decision needs (verified manifest, identity, authenticated state, trusted
time), calls one pure decision from :mod:`device_agent.trust.decisions`, and persists the result.

Installation order (docs/bundle-format.md, "Verification order"): verify signature -> parse
manifest (for a version 2 release: the signed head, then the envelope's inclusion proof) ->
target device -> expiry and end of life -> anti-rollback, all before the payload is read ->
decrypt and check the payload -> trial-load the model -> store the bundle -> commit state. A refusal at any step
leaves the data directory exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import crypto
from device_agent.bundle import reading
from device_agent.bundle.enrolment import DOMAIN as ENROLMENT_DOMAIN
from device_agent.bundle.enrolment import Enrolment
from device_agent.bundle.format import Contents, Manifest, Sidecar, VerifiedBundle, verify_bundle, verify_head
from device_agent.config import DEFAULT_CONFIG, DEFAULT_LIMITS, AgentConfig, BundleLimits
from device_agent.errors import (
    EdgeWardError,
    FormatError,
    InputMismatch,
    IntegrityError,
    NotInstalled,
    TamperedState,
    UsageError,
)
from device_agent.runtime import settings
from device_agent.runtime.output import prepare_inputs, shape_output
from device_agent.runtime.preprocess import apply as preprocess
from device_agent.runtime.runners import Runner, load_from_buffer
from device_agent.store import upgrade
from device_agent.store.datadir import DataDir, utcnow
from device_agent.store.keys import DeviceKeys, KeySource
from device_agent.store.wipe import complete as complete_wipe
from device_agent.store.wipe import wipe_pending
from device_agent.trust.decisions import check_serving_life, decide_install, decide_rollback, decide_serve, trusted_now
from device_agent.trust.state import State, TrustAnchors
from device_agent.wire import ID_RE, canonical_json, format_time

_log = logging.getLogger(__name__)
SEALED_MISMATCH = (
    "input does not fit this model's sealed pre-processing; "
    "send the raw input the application was built for"
)


def model_feeds(
    loaded: LoadedModel,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    role: str,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[dict[str, np.ndarray], bool]:
    """The caller's raw input through the sealed pre-processing into the model's feeds; returns
    (feeds, whether the caller sent a batch).

    When pre-processing is sealed, the application must not learn the model's input shape
    (NCSC 3.3): a mismatch is reported generically except to the admin role; the detail goes to
    the local log only.
    """
    spec = loaded.sidecar.preprocess
    try:
        x, single = preprocess(spec, inputs, limits.max_input_bytes // 4, limits)
        feeds, batched = prepare_inputs(loaded.runner, x)
    except InputMismatch as e:
        if spec is None or role == "admin":
            raise
        _log.info("input refused by the sealed pre-processing: %s", e)
        raise FormatError(SEALED_MISMATCH) from None
    return feeds, batched and not single


class _Reload(Exception):
    """A learnt local version failed its re-check as it was loaded and was rolled back: load again."""


@dataclass
class LoadedModel:
    manifest: Manifest
    sidecar: Sidecar
    runner: Runner
    local_version: int | None = None  # the learnt local head serving (device_agent.learning), if any


class Agent:
    """One board's agent over its data directory.

    ``keys`` unlocks the device's private keys (defaults to the environment): every operation
    needs them, since the board's trusted state is sealed with a key they give. ``clock`` returns
    the system time and is injectable for tests; the trusted time never goes below the floor
    recorded in the state.
    """

    def __init__(
        self,
        data_dir: str | Path,
        keys: KeySource | None = None,
        *,
        config: AgentConfig = DEFAULT_CONFIG,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = DataDir(data_dir, config.documents)
        if wipe_pending(self.store.path):
            # Invariant 4: a wipe interrupted by a power cut completes before anything else runs.
            complete_wipe(self.store, clock())
        self.store.require_provisioned()
        # What a killed or power-cut over-the-air download left: an update in progress holds its
        # staging files locked, and keeps them. A reader without write access leaves them.
        with contextlib.suppress(PermissionError):
            self.store.remove_stale_staging()
        self._source = keys if keys is not None else KeySource.from_env()
        self.config = config  # every limit and default on the board, passed down from here
        self.limits = config.bundle
        self._clock = clock
        self._loaded: dict[str, LoadedModel] = {}
        self._state_cache: tuple[tuple[int, int, int], State] | None = None
        self._kek_cache: dict[bytes, bytearray] = {}
        self._seal_key: bytearray | None = None
        self._lock = threading.RLock()
        self._local_cache: tuple[Any, str, int | None] | None = None
        # ``serve`` sets a worker that carries out over-the-air updates off the telemetry loop
        # (device_agent.commands.update.Updater); without one, an update runs in the caller.
        self.updater: Any = None

    # --- provisioning ------------------------------------------------------------------------
    @staticmethod
    def provision(
        data_dir: str | Path,
        device_id: str,
        publishers: list[bytes],
        operators: list[bytes] | None = None,
        keys: KeySource | None = None,
        now: datetime | None = None,
        *,
        recovery: list[bytes] | None = None,
        receipts: list[bytes] | None = None,
    ) -> bytes:
        """Create the board's keys and trust anchors; return the signed public enrolment."""
        if not ID_RE.match(device_id):
            raise UsageError(
                "device id must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if not publishers:
            raise UsageError("provisioning needs at least one publisher public key")
        source = keys if keys is not None else KeySource.from_env()
        source.require()
        now = now or utcnow()
        dk = DeviceKeys.generate()
        try:
            anchors = TrustAnchors(
                tuple(publishers), tuple(operators or ()), tuple(recovery or ()), tuple(receipts or ())
            )
            identity = DataDir(data_dir).create(device_id, dk, source, anchors, now)
            enrolment = Enrolment(device_id, identity.box_public, identity.sign_public, now)
            sig = crypto.sign(dk.signer(), ENROLMENT_DOMAIN, canonical_json(enrolment.body()))
            return enrolment.signed_bytes(sig)
        finally:
            dk.wipe()

    # --- keys and the trusted state --------------------------------------------------------------
    def _unlock(self) -> DeviceKeys:
        """The device keys, unwrapped for one operation (the caller wipes them)."""
        return self.store.unlock(self._source, self._kek_cache)

    def _key(self) -> bytearray:
        """The key that seals this board's trusted files. The first call upgrades a data dir
        written by release 0.1 (device_agent.store.upgrade); it must not run under the lock."""
        if self._seal_key is None:
            keys = self._unlock()
            try:
                if upgrade.needed(keys, self.store):
                    keys.wipe()
                    with self.store.locked():
                        keys = upgrade.upgrade(self.store, self._source, self._kek_cache)
                self._seal_key = self.store.sealing_key(keys)
            finally:
                keys.wipe()
        return self._seal_key

    def _trusted(self, read: Callable[[bytearray], Any]) -> Any:
        """Read a sealed file; a failed check is recorded as a security event before it is raised."""
        try:
            return read(self._key())
        except TamperedState as e:
            self._record_tampering(e)
            raise

    def _record_tampering(self, e: TamperedState) -> None:
        self.record_event("tamper", "critical", {"problem": str(e)[:300]})

    def state(self) -> State:
        """The board's authenticated state (installed models, versions, clock floor)."""
        return self._trusted(self.store.state)

    def trust_anchors(self) -> TrustAnchors:
        return self._trusted(self.store.trust)

    def tokens(self) -> Any:
        """The board's API tokens (a :class:`device_agent.service.tokens.TokenStore`)."""
        from device_agent.service.tokens import TokenStore

        key = self._key()
        store = TokenStore(self.store, key)
        try:
            store.list()
        except TamperedState as e:
            self._record_tampering(e)
            raise
        return store

    # --- time ----------------------------------------------------------------------------------
    def now(self, state: State | None = None) -> datetime:
        """The board's trusted time: the later of the system clock and the signed clock floor."""
        state = state or self.state()
        return trusted_now(self._clock(), state.clock_floor)

    # --- install ---------------------------------------------------------------------------------
    def install_file(self, path: str | Path, expect: Callable[[Manifest], None] | None = None,
                     on_commit: Callable[[Manifest], None] | None = None) -> Manifest:
        """Install the bundle at ``path``, read in bounded steps (device_agent.bundle.reading):
        the header is checked before the device keys are unlocked, the signature and the file's
        length before a byte of the payload is read, and the payload is read once, into the
        buffer it is decrypted in. ``expect`` may refuse the verified manifest (an update checks
        it is the model and version it names, and that it is still to be carried out) before the
        payload is read, and again under the data-dir lock before anything is stored; ``on_commit``
        runs under that same lock once the install is committed (an update answers there)."""
        with reading.open_bundle(path, self.limits) as f:
            publishers = self.trust_anchors().publishers
            data, vb = f.verify(list(publishers), self.limits, self._prechecks(expect))
        return self._install(data, vb, expect, on_commit)

    def install_release(self, envelope: bytes | bytearray | str | Path, payload: str | Path,
                        expect: Callable[[Manifest], None] | None = None,
                        on_commit: Callable[[Manifest], None] | None = None) -> Manifest:
        """Install a version 2 release: this board's ``envelope`` (bytes or a ``.ewe`` path) and the
        release's shared ``payload`` file. The envelope and the payload's signed head are verified,
        the inclusion proof checked and the board's trust decisions run before a byte of the
        ciphertext is read; the board then stores the two as one version 2 single file
        (``bundles/<release id>.ewb``), which every later load re-verifies like a version 1 bundle."""
        with reading.open_release(envelope, payload, self.limits) as f:
            publishers = self.trust_anchors().publishers
            data, vb = f.verify(list(publishers), self.limits, self._prechecks(expect))
        return self._install(data, vb, expect, on_commit)

    def _prechecks(self, expect: Callable[[Manifest], None] | None) -> Callable[[Manifest], None]:
        """``expect`` (an update checks the bundle is the model and version it names), then
        :meth:`_precheck`: both before a byte of the payload is read."""
        def check(m: Manifest) -> None:
            if expect is not None:
                expect(m)
            self._precheck(m)

        return check

    def _precheck(self, m: Manifest) -> None:
        """The install decision on a verified manifest alone (target, time, owner, anti-rollback,
        retired ids), run before the payload is read; :meth:`_install` decides again, with the
        file's digest, under the data-dir lock."""
        state = self.state()
        now = trusted_now(self._clock(), state.clock_floor)
        trusted = frozenset(crypto.fingerprint(k) for k in self.trust_anchors().publishers)
        decide_install(m, "0" * 64, 0, self.store.identity(), state, now, self.config.commands.beacon_hold_s, trusted)

    def install(self, data: bytes | bytearray) -> Manifest:
        """Verify, check and store a bundle held in memory; on any refusal nothing on disk changes.

        Given a ``bytearray``, the bundle is decrypted in place after its encrypted bytes are
        stored, so installing never holds two copies of the model. A bundle in a file is
        installed with :meth:`install_file`, which reads no more than each step needs.
        """
        publishers = self.trust_anchors().publishers
        return self._install(data, verify_bundle(data, list(publishers), self.limits))

    def _install(self, data: bytes | bytearray, vb: VerifiedBundle,
                 expect: Callable[[Manifest], None] | None = None,
                 on_commit: Callable[[Manifest], None] | None = None) -> Manifest:
        """Everything after the signature and length checks: target, time, anti-rollback,
        payload, trial load, then the bundle and the state are stored. ``expect`` runs again
        under the data-dir lock, where nothing else can change the state before the commit;
        ``on_commit`` runs under the same lock right after it, so that nothing (a cancel, another
        process) comes between an update's install and its answer."""
        key = self._key()
        m = vb.manifest
        identity = self.store.identity()
        digest = crypto.sha256_hex(data)
        with self._lock, self.store.locked():
            if expect is not None:
                expect(m)
            state = self.state()
            now = trusted_now(self._clock(), state.clock_floor)
            trusted = frozenset(crypto.fingerprint(k) for k in self.trust_anchors().publishers)
            decision = decide_install(m, digest, len(data), identity, state, now, self.config.commands.beacon_hold_s,
                                      trusted)
            # Stored before decrypting (in place destroys the ciphertext); removed on any failure.
            self.store.store_bundle(m.bundle_id, data)
            try:
                # The trial load passes the same serving check as every later load.
                decide_serve(m, digest, m.model_id, identity, decision.state, now)
                runner, sidecar, _ = self._decrypt_and_load(
                    vb, in_place=isinstance(data, bytearray), check_digest=True, first=True
                )
                self.store.save_state(decision.state, key)
            except BaseException:
                self.store.shred_bundle(m.bundle_id)  # a failed install leaves nothing
                raise
            if decision.dropped:
                self.store.collect_garbage(decision.state)
            self._supersede_learning(m, sidecar)
            self._loaded[m.model_id] = LoadedModel(m, sidecar, runner)
            if on_commit is not None:
                on_commit(m)  # the install stays committed whatever this does
        return m

    def _open(self, vb: VerifiedBundle, *, in_place: bool, check_digest: bool, first: bool = False) -> Contents:
        """Unlock the keys just long enough to decrypt ``vb``; the caller wipes the result.

        At install (``first``) the content key is opened with the board's encryption key and kept
        sealed under the board secret (``bundles/<id>.key``); every later load uses that local key,
        so that retiring a model can shred it and rotate the encryption key (device_agent.commands).
        """
        keys = self._unlock()
        try:
            bundle_id = vb.manifest.bundle_id
            if first:
                content_key = vb.open_key(keys.box_private)
                self.store.write_bundle_key(bundle_id, content_key, keys)
            else:
                content_key = self.store.read_bundle_key(bundle_id, keys)
            try:
                return vb.decrypt_with(content_key, self.limits, in_place=in_place, check_digest=check_digest)
            finally:
                crypto.wipe(content_key)
        finally:
            keys.wipe()

    def _decrypt_and_load(
        self, vb: VerifiedBundle, *, in_place: bool, check_digest: bool, first: bool = False, local: bool = False,
        initializers: dict[str, np.ndarray] | None = None,
    ) -> tuple[Runner, Sidecar, int | None]:
        """Decrypt in memory and load the runtime from the decrypted buffer itself: the runner
        takes the buffer over (its weights are served from it, docs/agent-service.md "Memory")
        and wipes it when the model is unloaded.

        ``local``: serve the bundle's learnt local head, if one is recorded for it (checked against
        its recorded digest and re-gated; one that fails is rolled back automatically and
        :class:`_Reload` asks the caller to load again from a freshly verified bundle);
        ``initializers``: load with these weights instead (a candidate being judged)."""
        contents = self._open(vb, in_place=in_place, check_digest=check_digest, first=first)
        # The bundle's view of its payload would keep a wiped buffer allocated: let it go.
        vb.payload.release()
        try:
            overrides, head, learning = initializers, None, None
            if local:
                from device_agent.learning.cycle import Learning

                learning = Learning(self)
                head = learning.serving_head(vb.manifest, contents.sidecar)
                overrides = head.initializers if head else None
            # Sealed settings are checked like any other input (device_agent.runtime.settings):
            # the thread count before the runtime sees it, the rest against the loaded model.
            runner = load_from_buffer(
                vb.manifest.runtime, contents.buffer, contents.model_offset, contents.model_length,
                settings.threads(contents.sidecar.runtime, self.limits), overrides,
            )
        except BaseException:
            contents.wipe()
            raise
        try:
            settings.check(contents.sidecar, runner.outputs, self.limits)
            if head is not None and learning is not None and not learning.gate_holds(runner, head):
                learning.fall_back(vb.manifest, head.version, "the gate re-check failed as it was loaded")
                raise _Reload()
        except BaseException:
            runner.close()
            raise
        return runner, contents.sidecar, head.version if head else None

    def _supersede_learning(self, m: Manifest, sidecar: Sidecar) -> None:
        """A new bundle supersedes the local versions learnt on the one before, and the feedback
        unless its sealed policy carries it over (device_agent.learning). The caller holds the
        data-dir lock; the install has already committed, so a failure here is reported, not raised."""
        from device_agent.learning.cycle import Learning
        from device_agent.learning.policy import LearningPolicy

        if not self.store.layout.path("learning").is_dir():
            return
        try:
            policy = LearningPolicy.from_policy(sidecar.policy, self.config.learning)
            Learning(self)._persist_reconciled(m, policy)
        except EdgeWardError as e:
            self.record_event("learning", "warning", {"problem": f"superseding local learning: {str(e)[:200]}"})

    def load_variant(self, model_id: str, initializers: dict[str, np.ndarray] | None) -> Runner:
        """The installed model of ``model_id`` with some weights replaced (``None``: exactly as the
        publisher shipped it): the same verification and serving checks as a load."""
        with self._lock:
            state = self._serving_state()
            vb, _ = self._verified_stored(model_id, state)
        runner, _, _ = self._decrypt_and_load(vb, in_place=True, check_digest=False, initializers=initializers)
        return runner

    def local_version(self, bundle_id: str) -> int | None:
        """The local version recorded to serve ``bundle_id`` (re-read only when the learning state
        file changes)."""
        from device_agent.learning.store import LearningStore

        files = LearningStore(self.store, self.config.learning)
        stamp = files.stamp()
        if stamp is None:
            return None
        if self._local_cache is None or self._local_cache[:2] != (stamp, bundle_id):
            st = files.state(self._key())
            self._local_cache = (stamp, bundle_id, st.current if st.bundle_id == bundle_id else None)
        return self._local_cache[2]

    def rollback(self, model_id: str | None = None) -> Manifest:
        """Serve the previous version again (a local admin action; the highest accepted version
        stays where it is, so the rolled-back-from version cannot be reinstalled: publish a new
        one)."""
        key = self._key()
        with self._lock, self.store.locked():
            state = self.state()
            mid = self._pick(state, model_id)
            decision = decide_rollback(state, mid)
            self.store.save_state(decision.state, key)
            self.store.collect_garbage(decision.state)
            self._loaded.pop(mid, None)
        with self._lock:  # loaded after the data-dir lock is released: a local head may roll back itself
            return self._load(mid, decision.state).manifest

    # --- serving ---------------------------------------------------------------------------------
    def _pick(self, state: State, model_id: str | None) -> str:
        installed = [k for k, s in state.models.items() if s.current is not None]
        if model_id is not None:
            if model_id not in installed:
                where = f"installed: {', '.join(installed) or 'none'}"
                if model_id in state.retired:
                    r = state.retired[model_id]
                    raise NotInstalled(f"model {model_id!r} was retired ({r.by}); it never serves again; {where}")
                if model_id in state.models:
                    raise NotInstalled(f"model {model_id!r} is not installed any more; {where}")
                # A model id this board has never had: the caller named it wrongly (usage, exit 2).
                raise UsageError(f"model {model_id!r} is not installed; {where}")
            return model_id
        if not installed:
            raise NotInstalled("no model is installed; run 'edgeward-agent install BUNDLE' first")
        if len(installed) > 1:
            raise UsageError(
                f"several models are installed ({', '.join(installed)}); pick one with --model"
            )
        return installed[0]

    def _verified_stored(self, model_id: str, state: State) -> tuple[VerifiedBundle, bytearray]:
        """The stored bundle of ``model_id``, verified as received and checked against the state:
        the serving decision before a byte of it is decrypted."""
        rec = state.models[model_id].current
        if rec is None:
            raise NotInstalled(f"model {model_id} has no current version on this board: install a bundle for it")
        data = self.store.read_bundle(rec.bundle_id, self.limits.max_bundle_bytes)
        # Re-verified on every load: the stored file is as untrusted as the one received.
        vb = verify_bundle(data, list(self.trust_anchors().publishers), self.limits)
        decide_serve(
            vb.manifest, crypto.sha256_hex(data), model_id, self.store.identity(), state,
            trusted_now(self._clock(), state.clock_floor),
        )
        return vb, data

    def _load(self, model_id: str, state: State) -> LoadedModel:
        rec = state.models[model_id].current
        if rec is None:
            raise NotInstalled(f"model {model_id} has no current version on this board: install a bundle for it")
        cached = self._loaded.get(model_id)
        local = self.local_version(rec.bundle_id)
        if cached is not None and cached.manifest.bundle_id == rec.bundle_id and cached.local_version == local:
            return cached
        for _ in range(self.config.learning.max_versions + 1):
            vb, _ = self._verified_stored(model_id, state)
            try:
                runner, sidecar, version = self._decrypt_and_load(vb, in_place=True, check_digest=False, local=True)
                break
            except _Reload:
                continue  # a local version failed its re-check and was rolled back: load what serves now
        else:
            raise IntegrityError("no local version passed its checks")
        loaded = LoadedModel(vb.manifest, sidecar, runner, version)
        self._loaded[model_id] = loaded
        return loaded

    def _serving_state(self) -> State:
        """The state for the query path, re-read and re-authenticated only when state.json
        changes (an install or rollback by another process replaces the file, which changes its
        inode and mtime)."""
        try:
            st = os.stat(self.store.state_file)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return self.state()  # raises the store's own error
        if self._state_cache is None or self._state_cache[0] != stamp:
            self._state_cache = (stamp, self.state())
        return self._state_cache[1]

    def model(self, model_id: str | None = None) -> LoadedModel:
        with self._lock:
            state = self._serving_state()
            mid = self._pick(state, model_id)
            loaded = self._load(mid, state)
            check_serving_life(loaded.manifest, trusted_now(self._clock(), state.clock_floor))
            return loaded

    def recheck(self, loaded: LoadedModel) -> None:
        """Integrity monitoring hook: re-verify the stored bundle of a loaded model against the
        state, decrypt it and check the model digest against the sealed sidecar of the model
        being served. Raises IntegrityError (or another SecurityRefusal) when anything differs."""
        state = self._serving_state()
        slot = state.models.get(loaded.manifest.model_id)
        if slot is None or slot.current is None or slot.current.bundle_id != loaded.manifest.bundle_id:
            return  # the sealed state moved on (an install, a rollback, a retirement): the next query loads it
        vb, _ = self._verified_stored(loaded.manifest.model_id, state)
        if vb.manifest.bundle_id != loaded.manifest.bundle_id:
            raise IntegrityError("the stored bundle is not the one being served")
        contents = self._open(vb, in_place=True, check_digest=True)  # checks the model digest
        try:
            sealed, served = contents.sidecar.model_sha256, loaded.sidecar.model_sha256
            if not crypto.constant_time_equal(sealed, served):
                raise IntegrityError("the stored model digest differs from the model being served")
        finally:
            contents.wipe()
        if loaded.local_version is not None:
            # The learnt head: its file against the recorded digest. One that fails is rolled back
            # automatically (device_agent.learning) and the next query loads what serves instead.
            from device_agent.learning.cycle import Learning

            with self._lock:
                head = Learning(self).serving_head(loaded.manifest, loaded.sidecar)
                if head is None or head.version != loaded.local_version:
                    self._loaded.pop(loaded.manifest.model_id, None)

    def predict(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        role: str = "user",
        model_id: str | None = None,
    ) -> dict[str, Any]:
        """Run the model on ``inputs`` and return what ``role`` may see (a label by default)."""
        loaded = self.model(model_id)
        feeds, batched = model_feeds(loaded, inputs, role, self.limits)
        outputs = loaded.runner.run(feeds)
        return shape_output(outputs, loaded.sidecar.task, loaded.sidecar.policy, role, batched)

    def wipe(self, *, allow_unsigned: bool = False) -> dict[str, Any]:
        """Crypto-shred this board's keys and models (device_agent.store.wipe); returns the
        attestation. Without the keys it refuses unless ``allow_unsigned``."""
        from device_agent.store.wipe import wipe

        try:
            floor = self.state().clock_floor
        except EdgeWardError:
            floor = None  # a wipe never depends on the state it destroys
        with self._lock, self.store.locked():  # no install or command runs halfway through it
            self._loaded.clear()
            return wipe(self.store, self._source, trusted_now(self._clock(), floor), allow_unsigned=allow_unsigned)

    # --- signed commands and trusted time ----------------------------------------------------------
    def record_event(self, kind: str, severity: str, evidence: dict[str, Any]) -> None:
        """Record a security event in the board's event store (telemetry forwards it)."""
        from device_agent.service.events import EventStore

        try:
            events = EventStore(self.store.events_file, self.config.serve.max_evidence_bytes)
            try:
                events.record(kind, self._clock(), severity=severity, evidence=evidence)
            finally:
                events.close()
        except Exception as fault:  # the decision itself must still reach the caller
            _log.warning("could not record a %s event: %s", kind, fault)

    def apply_commands(
        self, payload: bytes, on_result: Callable[[bytes, Any], None] | None = None
    ) -> list[bytes]:
        """Verify and carry out a delivery of signed commands (one command, or a board's queue
        with time beacons), in sequence order; returns the signed results of the commands this
        board had not seen. ``on_result`` gets each signed result before a decommission completes
        its wipe, so that it can still be sent (device_agent.commands)."""
        from device_agent.commands import run

        return run.apply(self, payload, on_result)

    def sweep_end_of_life(self) -> list[str]:
        """Retire every model whose end of life has passed at the trusted time (no command needed):
        it stops serving, its bundles and keys are shredded, and an event reports it."""
        from device_agent.commands import run

        return run.sweep_end_of_life(self)

    # --- status ----------------------------------------------------------------------------------
    def status(self, *, check_files: bool = True) -> dict[str, Any]:
        """The board's identity, models and trusted time; ``check_files`` adds the data-dir check
        (every file listed by the layout, no mode wider): a walk of the tree, left out of heartbeats."""
        state = self.state()
        identity = self.store.identity()
        now = trusted_now(self._clock(), state.clock_floor)
        anchors = self.trust_anchors()  # read and authenticated once per status (every heartbeat)
        publishers = list(anchors.publishers)
        models = []
        for mid, slot in sorted(state.models.items()):
            cur = slot.current
            entry: dict[str, Any] = {
                "model_id": mid,
                "version": cur.model_version if cur else None,
                "bundle_id": cur.bundle_id if cur else None,
                "installed_at": format_time(cur.installed_at) if cur else None,
                "previous_version": slot.previous.model_version if slot.previous else None,
                "highest_version": slot.highest_version,
            }
            if cur is not None:
                try:
                    # The signed head only: status runs on every telemetry heartbeat, and the
                    # payload (checked when the model loads) may be hundreds of megabytes.
                    head, length = self.store.read_bundle_head(cur.bundle_id)
                    m, _, _ = verify_head(head, length, publishers, self.limits)
                    if (m.bundle_id, m.model_id, m.model_version) != (cur.bundle_id, mid, cur.model_version):
                        raise TamperedState("the stored bundle is not the one installed; reinstall the model")
                    entry.update(
                        profile=m.profile,
                        runtime=m.runtime,
                        expires=format_time(m.expires) if m.expires else None,
                        end_of_life=format_time(m.end_of_life) if m.end_of_life else None,
                        serving=m.end_of_life is None or now < m.end_of_life,
                        local_version=self.local_version(cur.bundle_id),  # a learnt head (docs/learning.md)
                    )
                except Exception as e:  # status reports a broken store rather than failing
                    entry.update(serving=False, problem=str(e))
            models.append(entry)
        return {
            "device_id": identity.device_id,
            "box_fingerprint": identity.box_fingerprint,
            "sign_fingerprint": crypto.fingerprint(identity.sign_public),
            "now": format_time(now),
            "clock_floor": format_time(state.clock_floor) if state.clock_floor else None,
            "trust_fingerprint": crypto.sha256_hex(canonical_json(anchors.to_json())),
            # The keys whose signed receipts clear the telemetry outbox (docs/telemetry.md).
            "receipt_keys": [crypto.fingerprint(k) for k in anchors.receipts],
            "retired": {m: {"at": format_time(r.at), "by": r.by} for m, r in sorted(state.retired.items())},
            "models": models,
            "data_dir_problems": self.store.layout.problems() if check_files else None,
        }
