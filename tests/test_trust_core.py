"""The pure trust core (device_agent.trust): install, rollback and serve decisions tested directly,
with hypothesis over any sequence of offered bundles and clock readings, and a check that the
core does no I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import crypto
from device_agent.bundle.format import Manifest
from device_agent.errors import (
    Expired,
    NotInstalled,
    RollbackRefused,
    SecurityRefusal,
    TamperedState,
    UsageError,
    WrongDevice,
)
from device_agent.trust.decisions import decide_install, decide_rollback, decide_serve, trusted_now
from device_agent.trust.state import Identity, State

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 12, 1, tzinfo=UTC)
ME = Identity("pi-001", b"\x01" * 32, b"\x02" * 32)


def manifest(version: int = 1, model_id: str = "kws", **over: object) -> Manifest:
    fields: dict[str, object] = dict(
        bundle_id=uuid.uuid4().hex, model_id=model_id, model_version=version, created=T0, expires=None,
        end_of_life=None, device_id=ME.device_id, device_key=ME.box_fingerprint,
        publisher=crypto.fingerprint(b"\x03" * 32), profile="rpi4b", runtime="onnxruntime",
        cipher=crypto.CHACHA20, compression="none", chunk_size=65536, sealed_length=0, payload_length=0,
        tags_sha256="0" * 64, sealed_key=b"",
    )
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def digest_of(m: Manifest) -> str:
    return crypto.sha256_hex(m.bundle_id.encode())


def install(state: State, m: Manifest, now: datetime = T0) -> State:
    return decide_install(m, digest_of(m), 100, ME, state, now).state


def test_install_then_serve_then_rollback() -> None:
    s0 = State(None)
    v1, v2 = manifest(1), manifest(2)
    s1 = install(s0, v1)
    s2 = install(s1, v2)
    assert s0.models == {}  # decisions never mutate their input
    decide_serve(v2, digest_of(v2), "kws", ME, s2, T0)
    with pytest.raises(TamperedState):
        decide_serve(v1, digest_of(v1), "kws", ME, s2, T0)  # an older bundle in the current's place
    with pytest.raises(TamperedState):
        decide_serve(v2, "f" * 64, "kws", ME, s2, T0)  # same manifest, other bytes
    back = decide_rollback(s2, "kws")
    assert back.dropped == v2.bundle_id and back.state.models["kws"].highest_version == 2
    decide_serve(v1, digest_of(v1), "kws", ME, back.state, T0)
    with pytest.raises(RollbackRefused):
        install(back.state, manifest(2))  # the version rolled back from never comes back
    with pytest.raises(UsageError, match="no previous version"):
        decide_rollback(back.state, "kws")


def test_install_refusals() -> None:
    s = install(State(None), manifest(3))
    with pytest.raises(RollbackRefused):
        install(s, manifest(3))
    with pytest.raises(WrongDevice):
        install(s, manifest(4, device_id="pi-002"))
    with pytest.raises(WrongDevice):
        install(s, manifest(4, device_key=crypto.fingerprint(b"\x09" * 32)))
    with pytest.raises(Expired, match="expired"):
        install(s, manifest(4, expires=T0))
    with pytest.raises(Expired, match="end of life"):
        install(s, manifest(4, end_of_life=T0 - timedelta(seconds=1)))
    m = manifest(4)
    with pytest.raises(RollbackRefused, match="already installed"):
        install(install(s, m), replace(m, model_id="other"))


def test_serve_refuses_another_model_or_board_or_a_model_past_its_life() -> None:
    kws, vad = manifest(1, "kws"), manifest(1, "vad")
    s = install(install(State(None), kws), vad)
    with pytest.raises(TamperedState):
        decide_serve(vad, digest_of(vad), "kws", ME, s, T0)
    with pytest.raises(NotInstalled):
        decide_serve(kws, digest_of(kws), "ocr", ME, s, T0)
    other = Identity("pi-002", b"\x01" * 32, b"\x02" * 32)
    with pytest.raises(WrongDevice):
        decide_serve(kws, digest_of(kws), "kws", other, s, T0)
    eol = manifest(2, "kws", end_of_life=T0 + timedelta(days=1))
    s = install(s, eol)
    decide_serve(eol, digest_of(eol), "kws", ME, s, T0)
    with pytest.raises(Expired):
        decide_serve(eol, digest_of(eol), "kws", ME, s, T0 + timedelta(days=1))


# --- properties over any sequence of offers and clock readings ------------------------------------

offers = st.lists(
    st.tuples(
        st.sampled_from(["install", "rollback", "serve"]),
        st.sampled_from(["kws", "vad"]),
        st.integers(1, 8),  # offered version
        st.integers(-5, 40),  # system clock, days after T0
        st.one_of(st.none(), st.integers(-5, 40)),  # expires, days after T0
        st.one_of(st.none(), st.integers(-5, 40)),  # end of life, days after T0
        st.integers(-5, 40),  # created, days after T0
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(offers)
def test_versions_and_floor_only_move_forward_and_nothing_past_its_life_serves(steps: list) -> None:
    state = State(None)
    highest: dict[str, int] = {}
    installed: dict[str, Manifest] = {}
    for op, mid, version, clock, expires, eol, created in steps:
        day = lambda d: None if d is None else T0 + timedelta(days=d)  # noqa: E731
        now = trusted_now(day(clock), state.clock_floor)  # type: ignore[arg-type]
        before = state
        try:
            if op == "install":
                m = manifest(version, mid, expires=day(expires), end_of_life=day(eol), created=day(created))
                state = install(state, m, now)
                installed[m.bundle_id] = m
            elif op == "rollback":
                state = decide_rollback(state, mid).state
            else:
                rec = state.models.get(mid) and state.models[mid].current
                if rec is not None:
                    m = installed[rec.bundle_id]
                    decide_serve(m, digest_of(m), mid, ME, state, now)
                    # Served: so it is within its life at the trusted time.
                    assert m.end_of_life is None or now < m.end_of_life
                    assert m.model_version == rec.model_version
        except (SecurityRefusal, NotInstalled, UsageError):
            assert state is before  # a refusal changes nothing
        # The clock floor never moves back.
        if before.clock_floor is not None:
            assert state.clock_floor is not None and state.clock_floor >= before.clock_floor
        for model, slot in state.models.items():
            # The highest accepted version only moves forward...
            assert slot.highest_version >= highest.get(model, 0)
            highest[model] = slot.highest_version
            if slot.current is not None:
                assert slot.current.model_version <= slot.highest_version
            # ...and the installed version moves back only through an explicit rollback.
            prev = before.models.get(model)
            if op != "rollback" and prev is not None and prev.current is not None and slot.current is not None:
                assert slot.current.model_version >= prev.current.model_version


# --- the core does no I/O ---------------------------------------------------------------------------

IO_MODULES = {
    "sqlite3", "socket", "ssl", "http", "subprocess", "shutil", "tempfile", "fcntl", "paho", "onnxruntime",
    "ai_edge_litert", "numpy", "device_agent.store", "device_agent.service", "device_agent.telemetry",
    "device_agent.runtime", "device_agent.agent",
}
IO_CALLS = {"open", "print", "input"}
IO_ATTRS = {"read_bytes", "read_text", "write_bytes", "write_text", "unlink", "mkdir", "stat", "now", "time"}


def test_the_trust_core_imports_and_calls_nothing_that_does_io() -> None:
    core = sorted((ROOT / "device_agent" / "trust").glob("*.py"))
    code = (
        "import sys\n"
        + "".join(f"import device_agent.trust.{p.stem}\n" for p in core if p.stem != "__init__")
        + "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    bad = {m for m in loaded if any(m == b or m.startswith(b + ".") for b in IO_MODULES)}
    assert not bad, f"the trust core pulls in modules that do I/O: {sorted(bad)}"
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                assert name not in IO_CALLS | IO_ATTRS, f"{path.name}:{node.lineno} calls {name}()"


def test_another_trusted_publisher_cannot_take_a_model_over() -> None:
    theirs = crypto.fingerprint(b"\x04" * 32)
    s = install(State(None), manifest(1))
    owner = s.models["kws"].publisher
    both = frozenset({owner or "", theirs})
    with pytest.raises(RollbackRefused, match="belongs to publisher"):
        decide_install(manifest(2**40, publisher=theirs), "0" * 64, 1, ME, s, T0, 0.0, both)
    moved = decide_install(manifest(2, publisher=theirs), "0" * 64, 1, ME, s, T0, 0.0, frozenset({theirs}))
    assert moved.state.models["kws"].publisher == theirs  # the owner's key left the anchors


def test_a_bundle_from_a_publisher_rotated_out_since_it_was_verified_is_refused() -> None:
    m = manifest(1)
    with pytest.raises(SecurityRefusal, match="no longer trusts"):
        decide_install(m, digest_of(m), 1, ME, State(None), T0, 0.0, frozenset({crypto.fingerprint(b"\x05" * 32)}))


def test_the_version_floor_leaves_with_the_owner_key_a_fast_forward_recovery() -> None:
    """A stolen owner key pushed the version out of reach; once the operators rotate it out of the
    anchors, the next trusted publisher's release starts a fresh floor (TUF 5.3.11)."""
    stolen, fresh = crypto.fingerprint(b"\x03" * 32), crypto.fingerprint(b"\x06" * 32)
    s = install(install(State(None), manifest(1)), manifest(2**53))
    with pytest.raises(RollbackRefused, match="not newer"):
        decide_install(manifest(2), "0" * 64, 1, ME, s, T0, 0.0, frozenset({stolen}))
    moved = decide_install(manifest(2, publisher=fresh), "0" * 64, 1, ME, s, T0, 0.0, frozenset({fresh}))
    slot = moved.state.models["kws"]
    assert (slot.highest_version, slot.publisher, slot.previous) == (2, fresh, None)
    assert moved.dropped is not None  # the inflated bundle is collected
    with pytest.raises(RollbackRefused, match="not newer"):
        decide_install(manifest(2, publisher=fresh), "0" * 64, 1, ME, moved.state, T0, 0.0, frozenset({fresh}))
