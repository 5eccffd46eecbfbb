"""Sealed settings in a *validly signed* bundle are input like any other: a thread count that
would hang the runtime, a task the agent does not know, labels that do not fit the model, a
policy or pre-processing out of range -- each is refused at install with exit 3, naming the
setting, and nothing changes: the previous model keeps serving.

The fuzz tests sign bundles whose manifest fields, and whose sealed settings, are mutated: the
only outcomes allowed are an install (then every role's predict answers or refuses cleanly) or
the project's own error with its exit code, within a deadline.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.bundle.format import Manifest
from device_agent.errors import EdgeWardError, FormatError
from device_agent.runtime.output import ROLES
from tests.adversarial.conftest import Target
from tests.adversarial.forge import parts, sidecar_json, sign_head, with_sidecar
from tests.fixtures.trusted import refused, refused_cli

X = np.linspace(0, 1, 64, dtype=np.float32)
PRE = {"schema": "edgeward.preprocess/1", "sample_rank": 1, "steps": [{"op": "dtype", "to": "float32"}]}

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "threads in the millions": ({"runtime": {"threads": 10**6}}, "runtime.threads"),
    "threads past int32": ({"runtime": {"threads": 2**40}}, "runtime.threads"),
    "negative threads": ({"runtime": {"threads": -1}}, "runtime.threads"),
    "threads as a list": ({"runtime": {"threads": [4]}}, "runtime.threads"),
    "threads as a bool": ({"runtime": {"threads": True}}, "runtime.threads"),
    "unknown runtime setting": ({"runtime": {"threads": 1, "gpu": True}}, "runtime has unknown fields"),
    "unknown task kind": ({"task": {"kind": "regression", "output": 1}}, "task.kind"),
    "output index past the model's": ({"task": {"kind": "classifier", "output": 7}}, "task.output"),
    "negative output index": ({"task": {"kind": "classifier", "output": -1}}, "task.output"),
    "too few labels for the classes": ({"task": {"kind": "classifier", "output": 1, "labels": ["a", "b"]}},
                                       "2 labels, the model's output has 10 classes"),
    "labels not a list": ({"task": {"kind": "classifier", "output": 1, "labels": "abc"}}, "task.labels"),
    "a label that is an object": ({"task": {"output": 1, "labels": [{"x": 1}] * 10}}, "task.labels"),
    "binary threshold a word": ({"task": {"kind": "binary", "output": 1, "threshold": "high"}}, "task.threshold"),
    # NaN and Infinity are refused by the JSON reader (wire.loads_json) before the settings check.
    "binary threshold NaN": ({"task": {"kind": "binary", "output": 1, "threshold": math.nan}}, "not a finite number"),
    "three labels for a binary task": ({"task": {"kind": "binary", "output": 1, "labels": ["a", "b", "c"]}},
                                       "needs 2"),
    "ctc without labels": ({"task": {"kind": "ctc", "output": 1}}, "ctc task needs one label"),
    "unknown scores": ({"task": {"output": 1, "scores": "odds"}}, "task.scores"),
    "unknown task field": ({"task": {"output": 1, "shell": "rm -rf /"}}, "task has unknown fields"),
    "roles not a map": ({"policy": {"roles": "admin"}}, "policy.roles"),
    "an unknown role": ({"policy": {"roles": {"root": "scores"}}}, "policy.roles"),
    "an unknown view": ({"policy": {"roles": {"user": "weights"}}}, "policy.roles"),
    "a billion decimals": ({"policy": {"score_decimals": 10**9}}, "score_decimals"),
    "no bands": ({"policy": {"bands": []}}, "policy.bands"),
    "a band with an infinite threshold": ({"policy": {"bands": [[math.inf, "x"]]}}, "not a finite number"),
    "a negative rate": ({"policy": {"throttle": {"client_rate": -1}}}, "throttle.client_rate"),
    "a zero daily budget": ({"policy": {"throttle": {"daily_budget": 0}}}, "throttle.daily_budget"),
    "an unknown limit": ({"policy": {"throttle": {"unlimited": True}}}, "unknown throttle limits"),
    "a negative retention": ({"policy": {"audit": {"retention_days": -1}}}, "retention_days"),
    "a malformed calibration": ({"policy": {"ood": {"schema": "edgeward.ood/1", "mean": "x"}}}, "OoD calibration"),
    "an unknown policy field": ({"policy": {"debug": True}}, "policy has unknown fields"),
    "a pre-processing spec of another schema": ({"preprocess": {"schema": "x"}}, "preprocess spec"),
    "a resize to a billion rows": ({"preprocess": {**PRE, "sample_rank": 2, "steps": [
        {"op": "resize", "height": 10**9, "width": 8}]}}, "resize.height"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_an_out_of_range_sealed_setting_is_refused_at_install(target: Target, name: str) -> None:
    model = target.model.read_bytes()
    target.agent().install(with_sidecar(model, target.board.enrolment, target.publisher, sidecar_json(model),
                                        created=target.clock.now))
    served = target.agent().predict(X, role="admin")
    fields, message = BAD[name]
    bad = with_sidecar(model, target.board.enrolment, target.publisher, sidecar_json(model, **fields), version=2,
                       created=target.clock.now)
    refused(target.data_dir, lambda: target.agent().install(bad), FormatError, message, name)
    assert target.agent().predict(X, role="admin") == served  # the previous model keeps serving


def test_the_cli_exits_3_on_a_sealed_thread_count_that_would_hang_the_runtime(
    target: Target, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = target.model.read_bytes()
    f = tmp_path / "threads.ewb"
    f.write_bytes(with_sidecar(model, target.board.enrolment, target.publisher,
                               sidecar_json(model, runtime={"threads": 10**6}), created=target.clock.now))
    refused_cli(capsys, target.data_dir, target.cli("install", str(f)), 3, r"runtime\.threads must be an integer")


def test_sane_sealed_settings_still_install_and_answer(target: Target) -> None:
    model = target.model.read_bytes()
    good = sidecar_json(
        model,
        runtime={"threads": 2},
        task={"kind": "classifier", "output": 1, "scores": "probabilities", "labels": [f"d{i}" for i in range(10)]},
        policy={"roles": {"user": "band"}, "score_decimals": 2, "bands": [[0.5, "hi"], [0.0, "lo"]],
                "throttle": {"daily_budget": 5}, "audit": {"retention_days": 7}},
        preprocess=PRE,
    )
    target.agent().install(with_sidecar(model, target.board.enrolment, target.publisher, good,
                                        created=target.clock.now))
    answer = target.agent().predict(X)
    assert answer["label"].startswith("d") and answer["confidence"] in ("hi", "lo")


# --- fuzz: validly signed, mutated ---------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALLOWED_EXITS = (1, 2, 3, 4)  # refused, usage, malformed, environment: never 70

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40) | st.sampled_from(["../../etc/passwd", "a\nb", "\x1b[31m", "", "0" * 64,
                                                "sha256:" + "0" * 64, "2027-01-01T00:00:00Z", "none", "zlib"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _install_or_refuse(target: Target, data: bytes) -> bool:
    """Install ``data``; True if it installed. Any failure must be EdgeWard's own, with its code."""
    try:
        target.agent().install(data)
    except EdgeWardError as e:
        assert e.exit_code in ALLOWED_EXITS, (type(e).__name__, e)
        return False
    return True


def _answers_or_refuses(target: Target) -> None:
    for role in ROLES:
        try:
            target.agent().predict(X, role=role)
        except EdgeWardError as e:
            assert e.exit_code in ALLOWED_EXITS, (role, type(e).__name__, e)


MANIFEST_FIELDS = sorted(Manifest.FIELDS)


def test_fuzz_manifests_mutated_and_signed_again_install_or_are_refused(target: Target) -> None:
    base = target.bundle(1)
    _, manifest, _, payload = parts(base)
    installed: list[bool] = []

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from([*MANIFEST_FIELDS, "extra"]), json_values | st.just("<drop>")),
                    min_size=1, max_size=3))
    def run(changes: list[tuple[str, Any]]) -> None:
        doc = dict(manifest)
        for key, value in changes:
            if value == "<drop>":
                doc.pop(key, None)
            else:
                doc[key] = value
        data = sign_head(doc, target.publisher) + payload
        installed.append(_install_or_refuse(target, data))
        _answers_or_refuses(target)

    run()
    assert not all(installed)


sealed_fields = st.sampled_from(["runtime", "task", "policy", "preprocess"])


def test_fuzz_sealed_settings_mutated_install_or_are_refused_and_never_crash_predict(target: Target) -> None:
    model = target.model.read_bytes()
    versions = iter(range(1, 10**6))

    @FUZZ
    @given(st.lists(st.tuples(sealed_fields, st.sampled_from(
        ["threads", "kind", "output", "labels", "scores", "threshold", "blank", "roles", "score_decimals",
         "bands", "throttle", "audit", "ood", "schema", "sample_rank", "steps"]), json_values), min_size=1, max_size=3))
    def run(changes: list[tuple[str, str, Any]]) -> None:
        doc = sidecar_json(model)
        for where, key, value in changes:
            obj = dict(doc[where] or {})
            obj[key] = value
            doc[where] = obj
        data = with_sidecar(model, target.board.enrolment, target.publisher, doc, version=next(versions),
                            created=target.clock.now)
        _install_or_refuse(target, data)
        _answers_or_refuses(target)

    run()
