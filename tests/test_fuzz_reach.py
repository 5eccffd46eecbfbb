"""Fuzzing in the default suite: every board parser of tests/fuzz/targets.py (bundle head,
manifest and sealed contents; enrolment files; commands, beacons, queues and results; telemetry
reports; receipts; the .npy/.npz decoder) and the host's firmware-profile reader, from mutations of valid
inputs. The only outcomes allowed are a value or an EdgeWardError. Each run also reports which
refusals it reached (``pytest -s`` prints the table), and must reach more than one: a fuzz run
that stops at the first check says nothing about the parser behind it.

The long coverage-guided run (atheris) of the same targets is in tests/test_fuzz.py (--slow)."""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import EdgeWardError
from packager.profiles import Profile, _parse
from tests.fuzz import targets

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _kind(e: EdgeWardError) -> str:
    """A refusal's kind: its class and the words of its message, without the numbers and quoted
    values that vary from one input to the next."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "#", str(e))
    return f"{type(e).__name__}: {' '.join(msg.split()[:6])}"


def _report(name: str, outcomes: Counter[str]) -> None:
    print(f"\nfuzz {name}: {sum(outcomes.values())} inputs, {len(outcomes)} outcomes")
    for kind, n in outcomes.most_common():
        print(f"  {n:5}  {kind}")


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_each_board_parser_from_mutated_valid_inputs(name: str) -> None:
    seeds = targets.seeds(name)
    outcomes: Counter[str] = Counter()

    def one(data: bytes) -> None:
        try:
            targets.TARGETS[name](data)
        except EdgeWardError as e:
            outcomes[_kind(e)] += 1
        else:
            outcomes["accepted"] += 1

    @FUZZ
    @given(st.sampled_from(seeds), st.integers(0, 1 << 16), st.binary(max_size=32))
    def run(seed: bytes, at: int, patch: bytes) -> None:
        cut = at % (len(seed) + 1)
        one(seed[:cut] + patch + seed[cut + len(patch):])  # overwrite bytes inside a valid input
        one(seed[:cut] + patch)  # truncate, then append

    run()
    _report(name, outcomes)
    refusals = [k for k in outcomes if k != "accepted"]
    assert len(refusals) >= 3, f"the fuzzing of {name} reached too few of its checks: {dict(outcomes)}"


def test_fuzz_firmware_profiles_read_or_are_refused() -> None:
    """A custom profile is a file a user (or a CI job) hands to pack and harden."""
    seeds = [e.read_bytes() for e in resources.files("firmware_profiles").iterdir() if e.name.endswith(".toml")]
    outcomes: Counter[str] = Counter()

    patches = st.binary(max_size=24) | st.text(max_size=24).map(str.encode)

    @FUZZ
    @given(st.sampled_from(seeds), st.integers(0, 1 << 12), patches)
    def run(seed: bytes, at: int, patch: bytes) -> None:
        cut = at % (len(seed) + 1)
        for data in (seed[:cut] + patch + seed[cut + len(patch):], seed[:cut] + patch):
            try:
                profile = _parse(data, "fuzz.toml")
            except EdgeWardError as e:
                outcomes[_kind(e)] += 1
            else:
                assert isinstance(profile, Profile)
                outcomes["accepted"] += 1

    run()
    _report("firmware profile", outcomes)
    assert len([k for k in outcomes if k != "accepted"]) >= 3, dict(outcomes)
