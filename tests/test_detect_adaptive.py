"""Detection against adaptive attackers on the real digits model: the board-wide ``linked``
detector catches probing split over several tokens, names every token and slows them all; real
use (several applications with repeats, bursts and drift, a sensor whose gain or brightness
drifts) raises nothing; and through the real HTTP API, HopSkipJump split over five tokens or
paced at the throttle's rate is caught early."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import DetectConfig, ThrottleConfig
from device_agent.errors import FormatError, UsageError
from device_agent.service.detect import Calibration, Detector, calibrate, photometric_share
from device_agent.service.throttle import Throttle
from packager.redteam import benign_traffic
from tests.fixtures.serve import T0, digits_validation


@pytest.fixture(scope="module")
def cal() -> Calibration:
    c = Calibration.from_policy({"ood": calibrate(digits_validation())})
    assert c is not None
    return c


@pytest.fixture(scope="module")
def label(digits: Any) -> Any:
    """The real model's labels for a batch of inputs (onnxruntime, as the board runs it)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(rows: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(["label"], {name: np.asarray(rows, dtype=np.float32)})[0]).reshape(-1)

    return run


def _boundary_walk(x: np.ndarray, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """What a decision-based attack sends: a bisection from a test input towards one of another
    class, then samples around the boundary point it found (gradient estimation)."""
    own = label(x[:40])
    i, j = 0, int(np.flatnonzero(own != own[0])[0])
    lo, hi, rows = x[i].astype(np.float64), x[j].astype(np.float64), []
    for _ in range(14):
        mid = (lo + hi) / 2
        rows.append(mid)
        if label(mid[None])[0] == own[0]:
            lo = mid
        else:
            hi = mid
    rng = np.random.default_rng(0)
    for _ in range(30):
        u = rng.normal(size=64)
        rows.append(np.clip(hi + 0.05 * u / np.linalg.norm(u), 0, 1))
    walk = np.stack(rows).astype(np.float32)
    return walk, label(walk)


def test_probing_split_over_five_tokens_is_linked_and_every_token_is_slowed(
    cal: Calibration, digits_test: Any, label: Any
) -> None:
    x, _ = digits_test
    walk, labels = _boundary_walk(x, label)
    d = Detector(cal)
    tokens = [f"sybil{k}" for k in range(5)]
    linked = []
    for n, (row, lab) in enumerate(zip(walk, labels, strict=True)):
        linked += [(n + 1, s) for s in d.observe(tokens[n % 5], row, int(lab), T0 + n) if s.kind == "linked"]
    assert linked and linked[0][0] <= 30
    named = set().union(*(s.evidence["clients"] for _, s in linked))
    assert named == set(tokens)  # every token involved is named, in one event or the next
    assert all(s.evidence["clients_involved"] == len(s.evidence["clients"]) for _, s in linked)
    now = T0 + len(walk)
    throttle = Throttle(ThrottleConfig())
    for t in tokens:
        assert d.anomaly(t, now) == 1.0
        assert throttle.client_rate(d.anomaly(t, now)) < ThrottleConfig().client_rate / 20
    assert d.anomaly("bystander", now) == 0.0


def test_probing_around_an_applications_input_does_not_get_the_application_slowed(
    cal: Calibration, digits_test: Any, label: Any
) -> None:
    """An attacker who probes the boundary right next to an application's input links to it;
    only the attacker is named and slowed, never the application it framed."""
    x, _ = digits_test
    walk, labels = _boundary_walk(x, label)
    d = Detector(cal)
    assert d.observe("app", walk[13], int(labels[13]), T0) == []
    sigs = [s for n in range(14, len(walk)) for s in d.observe("mallory", walk[n], int(labels[n]), T0 + n)]
    linked = [s for s in sigs if s.kind == "linked"]
    assert linked and all(s.evidence["clients"] == ["mallory"] for s in linked)
    assert any(s.evidence["linked_to"] == 1 for s in linked)  # it did probe next to the app's input
    assert d.anomaly("app", T0 + len(walk)) == 0.0 and d.anomaly("mallory", T0 + len(walk)) == 1.0


def test_a_token_first_seen_through_a_refusal_is_still_watched(cal: Calibration, digits_test: Any) -> None:
    """A client whose first request is refused (an oversize batch, the global rate) is known to
    the detector before any input: its own windows must still see the inputs it sends next."""
    x, y = digits_test
    d = Detector(cal)
    assert d.refused("mallory", T0) == []
    rng = np.random.default_rng(2)
    kinds = [s.kind for i in range(20) for s in d.observe("mallory", x[0] + rng.normal(0, 0.01, 64), int(y[0]), T0 + i)]
    assert "probing" in kinds


def test_the_link_index_is_bounded_and_its_settings_are_checked(cal: Calibration) -> None:
    cfg = DetectConfig(link_history=50, link_window=20, link_count=3)
    d = Detector(cal, cfg)
    rng = np.random.default_rng(5)
    for n in range(300):
        d.observe(f"c{n % 100}", rng.random(64), n % 10, T0 + n)
    links = d._links
    assert links is not None and links.ring.rows.shape == (50, 64) and len(links.owner) == 50
    assert len(links.links) <= cfg.link_window
    for bad in ({"link_history": 16385}, {"link_history": 0}, {"link_count": 21, "link_window": 20}):
        with pytest.raises(UsageError, match="serve.detect.link_"):
            DetectConfig(**bad)  # type: ignore[arg-type]


def test_a_query_against_a_full_link_index_does_not_copy_it() -> None:
    """The distance pass over the board-wide index goes in slices: a query's working memory is
    far below the index's own size, whatever the input's size (here at the 1,024-dim cap)."""
    import tracemalloc

    dim = 1024
    rng = np.random.default_rng(6)
    # probe_eps for the links; a 1-dim OoD model, so that the OoD score (a 1024x1024 product)
    # is skipped and only the detectors' own working memory is measured
    cal = Calibration(np.zeros(1), np.eye(1), 1.0, 0.5)
    cfg = DetectConfig(link_history=1024, history=4, per_label_history=4)
    d = Detector(cal, cfg)
    for n in range(1100):
        d.observe(f"c{n % 7}", rng.random(dim), n % 10, T0 + n)
    assert d._links is not None and d._links.ring.rows.nbytes == 1024 * dim * 4  # 4 MiB
    row = rng.random(dim)
    tracemalloc.start()
    try:
        d.observe("c0", row, 3, T0 + 1101)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # a whole copy in float64 would be 8 MiB


# Real use, and the same with a sensor whose gain, brightness or both drift slowly (amplitude,
# seed): resent samples come back as near-duplicates that kept their label.
DRIFTS = {
    "steady": ({}, 1),
    "gain": ({"sensor_drift": 0.05}, 1),
    "brightness": ({"sensor_offset": 0.05}, 3),
    "gain-and-brightness": ({"sensor_drift": 0.1, "sensor_offset": 0.05}, 4),
}


def test_real_use_raises_no_alarm_whether_the_sensor_drifts_or_not(
    cal: Calibration, digits_test: Any, label: Any
) -> None:
    """10,000 queries of real use from six applications, for each drift: no event of any kind.
    A drifting sensor's near-duplicates are sensor changes, not probing; PRADA does not take
    them for synthetic queries; they never straddle the decision boundary (no linked event)."""
    x, y = digits_test
    for name, (drift, seed) in DRIFTS.items():
        traffic = benign_traffic(x, y, apps=6, queries=10_000, seed=seed, **drift)
        labels = label(np.stack([row for _, _, row in traffic]))
        d = Detector(cal)
        kinds: list[str] = []
        for (t, app, row), lab in zip(traffic, labels, strict=True):
            kinds += [s.kind for s in d.observe(f"app{app}", row, int(lab), T0 + t)]
        assert len(traffic) == 10_000 and kinds == [], (name, kinds)


def _gain(u: np.ndarray, a: float, b: float = 0.0) -> np.ndarray:
    return np.clip(u * a + b, 0.0, 1.0)


def test_a_sensor_change_is_told_apart_from_a_probe(cal: Calibration, digits_test: Any, label: Any) -> None:
    """A gain or brightness change, clipped where the sensor clips, is explained whole by a
    gain and an offset; a probe of the same length is not: a random direction (gradient
    estimation), a step towards an input of another class (bisection), HopSkipJump's own."""
    x, _ = digits_test
    assert cal.value_range == (0.0, 1.0) and cal.photometric_fit == 0.9
    rng = np.random.default_rng(11)
    walk, _ = _boundary_walk(x, label)
    for u in x[:30].astype(np.float64):
        for a, b in ((0.98, 0.0), (1.03, 0.0), (1.0, 0.02), (1.0, -0.02), (1.02, 0.01), (0.97, -0.01)):
            v = _gain(u, a, b)
            assert cal.sensor_change(v, u) and cal.sensor_change(u, v), (a, b)
        step = rng.normal(size=u.size)
        v = np.clip(u + 0.5 * cal.probe_eps * step / np.linalg.norm(step), 0.0, 1.0)
        assert not cal.sensor_change(v, u)
        other = x[int(rng.integers(len(x)))]
        v = u + 0.5 * cal.probe_eps * (other - u) / np.linalg.norm(other - u)
        assert not cal.sensor_change(v, u)
    shares = [photometric_share(walk[i], walk[i - 1], 0.0, 1.0) for i in range(1, len(walk))]
    assert max(shares) < 0.9


def test_a_near_duplicate_that_flips_its_label_is_probing_whatever_its_shape(
    cal: Calibration, digits_test: Any
) -> None:
    """The exemption is for the same scene: a gain change that got another label than the input
    it is near straddles the decision boundary and counts, as does one not near a kept input."""
    x, y = digits_test
    u = x[0].astype(np.float64)
    d = Detector(cal)
    kinds = [s.kind for k in range(8) for s in d.observe("m", _gain(u, 1 - 0.004 * k), k % 2, T0 + k)]
    assert "probing" in kinds
    d = Detector(cal)
    kinds = [s.kind for k in range(8) for s in d.observe("m", _gain(u, 1 - 0.004 * k), int(y[0]), T0 + k)]
    assert kinds == []


def test_the_sensor_change_setting_is_sealed_only_where_it_means_something(digits_test: Any) -> None:
    """With few input values a gain and an offset explain any change: the calibration then
    seals no photometric_fit, and a calibration without one (older bundles) exempts nothing."""
    x, _ = digits_test
    rng = np.random.default_rng(3)
    assert "photometric_fit" not in calibrate(rng.random((200, 3)))
    sealed = calibrate(x)
    assert sealed["photometric_fit"] == 0.9 and sealed["value_range"] == [0.0, 1.0]
    before = {k: v for k, v in sealed.items() if k not in ("photometric_fit", "value_range")}
    old = Calibration.from_policy({"ood": before})
    assert old is not None and not old.sensor_change(_gain(x[0], 0.98), x[0].astype(np.float64))
    for bad in ({"value_range": [1.0, 0.0]}, {"value_range": [0.0, "inf"]}, {"photometric_fit": 1.5},
                {"photometric_fit": 0.9, "value_range": None}, {"value_range": [0.0]}, {"value_range": "01"},
                {"value_range": [False, True]}, {"photometric_fit": True}, {"photometric_fit": 0.0}):
        with pytest.raises(FormatError, match="sealed OoD calibration"):
            Calibration.from_policy({"ood": sealed | bad})


# --- through the real API -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> Iterator[Any]:
    """A throw-away board serving the digits model with its sealed calibration (red-team setup)."""
    pytest.importorskip("art")
    from packager.redteam import AgentEnv

    e = AgentEnv(Path(digits.onnx), {"ood": calibrate(digits_validation())}, tmp_path_factory.mktemp("adaptive"))
    try:
        yield e
    finally:
        e.close()


def _hsj(env: Any, tokens: list[tuple[str, str]], digits_test: Any, sample: int) -> dict[str, Any]:
    """HopSkipJump (few iterations: the assertions are about detection) on one test input,
    round-robin over ``tokens``, each sending at the throttle's client rate."""
    from packager.redteam import AgentTarget, BareTarget, RedteamConfig, hopskipjump

    cfg = RedteamConfig(hsj_samples=1, hsj_max_iter=2, hsj_max_eval=50)
    x, _ = digits_test
    target = AgentTarget(env, tokens, env.limits.client_rate, cfg.max_wait_s)
    return hopskipjump(target, x[sample : sample + 1], BareTarget(env.runner, env.task), 10, cfg)


def _refused_within(env: Any, token: str, rows: np.ndarray) -> bool:
    """Natural queries at half the client rate: refused only if the token was slowed down."""
    from packager.redteam import ApiCaller

    caller = ApiCaller(env.socket, token)
    gap = 2.0 / env.limits.client_rate
    statuses = []
    for row in rows:
        env.clock.t += gap
        statuses.append(caller.predict(row)[0])
    return 429 in statuses


def test_zero_detections_over_10000_benign_queries_from_several_tokens(env: Any, digits_test: Any) -> None:
    from packager.redteam import RedteamConfig, benign

    x, y = digits_test
    r = benign(env, x, y, RedteamConfig(benign_clients=6, benign_queries=10_000, seed=2))
    assert r["queries_answered"] == 10_000 and r["queries_refused_by_throttling"] == 0
    assert r["detections"] == 0, r["detections_by_kind"]


@pytest.mark.parametrize("shape", ["gain", "brightness"])
def test_zero_detections_over_10000_benign_queries_from_a_drifting_sensor(
    env: Any, digits_test: Any, shape: str
) -> None:
    """Through the API, as the red team runs it: a sensor whose gain (or brightness) drifts by up
    to 5% resends near-duplicates; no event of any kind, and so no slowdown and no refusal."""
    from packager.redteam import RedteamConfig, benign

    x, y = digits_test
    cfg = RedteamConfig(benign_clients=6, benign_queries=10_000, seed=5 if shape == "gain" else 6)
    drift = {"sensor_drift": 0.05} if shape == "gain" else {"sensor_offset": 0.05}
    r = benign(env, x, y, cfg, **drift)
    assert r["queries_answered"] == 10_000 and r["queries_refused_by_throttling"] == 0
    assert r["detections"] == 0, r["detections_by_kind"]


def test_hopskipjump_split_over_5_tokens_is_detected_within_50_queries(env: Any, digits_test: Any) -> None:
    tokens = [env.token() for _ in range(5)]
    r = _hsj(env, tokens, digits_test, sample=0)
    first = r["queries_before_first_detection"]
    assert first is not None and first <= 50, r
    # the board-wide detector links the tokens within the same 50 queries, whichever detector fires
    # first (HopSkipJump starts from noise, so the out-of-distribution one sometimes does)
    assert r["first_detection_by_kind"].get("linked", 10**9) <= 50 and r["tokens"] == 5, r
    linked = [e for e in env.events_after(0) if e.kind == "linked"]
    assert {cid for cid, _ in tokens} <= set().union(*(e.evidence["clients"] for e in linked))
    # every token is slowed down: each is refused at half the client rate, a fresh token is not
    x, _ = digits_test
    rows = x[100:160]
    assert all(_refused_within(env, tok, rows) for _, tok in tokens)
    assert not _refused_within(env, env.token()[1], rows)


def test_a_single_token_paced_at_the_throttle_limit_is_detected_within_20_queries(
    env: Any, digits_test: Any
) -> None:
    r = _hsj(env, [env.token()], digits_test, sample=1)
    first = r["queries_before_first_detection"]
    assert first is not None and first <= 20, r
    assert r["queries_refused_by_throttling"] > 0  # and it is slowed down from then on


# --- a sensor with read noise (its standard deviation sealed as read_noise) ----------------------


@pytest.fixture(scope="module")
def noisy_cal() -> dict[float, Calibration]:
    """Calibrations that seal the sensor's read noise, for each declared standard deviation."""
    out = {}
    for sigma in (0.005, 0.02):
        c = Calibration.from_policy({"ood": calibrate(digits_validation(), read_noise=sigma)})
        assert c is not None and c.read_noise == sigma
        out[sigma] = c
    return out


def _kinds(cal: Calibration, traffic: list[tuple[float, int, np.ndarray]], label: Any) -> list[str]:
    labels = label(np.stack([row for _, _, row in traffic]))
    d = Detector(cal)
    out = []
    for (t, app, row), lab in zip(traffic, labels, strict=True):
        out += [s.kind for s in d.observe(f"app{app}", row, int(lab), T0 + t)]
    return out


def test_a_noisy_sensor_raises_no_alarm_when_its_read_noise_is_sealed(
    cal: Calibration, noisy_cal: dict[float, Calibration], digits_test: Any, label: Any
) -> None:
    """Real use through a sensor whose gain drifts and whose every read has noise: no two reads
    of a scene are the same. Without the sealed read noise, small noise makes re-reads look like
    gradient-estimation probes and larger noise makes PRADA see a spike of small distances;
    with it, 10,000 queries at each of two noise levels raise nothing."""
    x, y = digits_test
    for sigma, declared, seed in ((0.005, 0.005, 4), (0.02, 0.02, 5)):
        traffic = benign_traffic(x, y, apps=6, queries=10_000, seed=seed, sensor_drift=0.05, sensor_noise=sigma)
        assert _kinds(noisy_cal[declared], traffic, label) == [], (sigma, declared, seed)
    # what the sealed read noise changes: the same traffic without it
    few = benign_traffic(x, y, apps=6, queries=3_000, seed=4, sensor_drift=0.05, sensor_noise=0.005)
    assert "probing" in _kinds(cal, few, label)
    few = benign_traffic(x, y, apps=6, queries=3_000, seed=4, sensor_drift=0.05, sensor_noise=0.02)
    assert "extraction" in _kinds(cal, few, label)


def _walk_towards_another_class(x: np.ndarray, label: Any, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Small steps from a test input straight towards the nearest test input of another class."""
    own = label(x)
    u = x[0].astype(np.float64)
    other = x[own != own[0]].astype(np.float64)
    to = other[int(((other - u) ** 2).sum(axis=1).argmin())] - u
    walk = np.stack([np.clip(u + k * step * to / np.linalg.norm(to), 0, 1) for k in range(n)]).astype(np.float32)
    return walk, label(walk)


def test_a_re_read_is_told_apart_from_a_probe(
    noisy_cal: dict[float, Calibration], digits_test: Any, label: Any
) -> None:
    """A re-read differs from the first read of its scene by no more than the sensor's noise
    (after any gain change), got the same label, and the client never got two labels there.
    Probing is not a re-read: near-duplicates whose labels differ count (HopSkipJump's
    gradient estimation is as small as the noise but straddles the boundary), and a walk of
    small steps, each within the noise of the last, counts once it leaves the noise's reach of
    where it started."""
    x, _ = digits_test
    cal = noisy_cal[0.005]
    rng = np.random.default_rng(8)
    u = x[0].astype(np.float64)
    reads = [np.clip(_gain(u, 1 + 0.002 * k) + rng.normal(0, 0.005, 64), 0, 1) for k in range(12)]
    assert all(cal.reread(a, b) for a in reads for b in reads if a is not b)
    d = Detector(cal)
    assert [s for k, r in enumerate(reads) for s in d.observe("app", r, 3, T0 + k)] == []
    # the same reads, but the client got two labels among them: a boundary straddle, probing
    d = Detector(cal)
    kinds = [s.kind for k, r in enumerate(reads) for s in d.observe("m", r, 3 if k else 4, T0 + k)]
    assert "probing" in kinds
    # a walk whose every step is a re-read of the one before
    walk, labels = _walk_towards_another_class(x, label, 0.015, 20)
    same = int(np.argmax(labels != labels[0])) or len(labels)
    walk, labels = walk[:same], labels[:same]  # up to its flip: only its reach gives it away
    assert all(cal.reread(walk[k], walk[k - 1]) for k in range(1, len(walk)))
    d = Detector(cal)
    kinds = [s.kind for k, r in enumerate(walk) for s in d.observe("m", r, int(labels[k]), T0 + k)]
    assert "probing" in kinds


def test_the_read_noise_is_sealed_only_where_a_re_read_is_told_from_a_new_scene(digits_test: Any) -> None:
    """Two reads of one scene must stay closer than distinct validation samples, or a new scene
    could pass for a re-read: a larger read noise is refused, as is a malformed one; a sealed
    one is checked when the bundle is opened; a calibration without one exempts nothing."""
    x, _ = digits_test
    val = digits_validation()
    with pytest.raises(UsageError, match="re-reads cannot be told from new scenes"):
        calibrate(val, read_noise=0.05)
    for bad in (0.0, -0.01, float("nan"), float("inf"), True):
        with pytest.raises(UsageError, match="read noise must be a number > 0"):
            calibrate(val, read_noise=bad)
    sealed = calibrate(val, read_noise=0.02)
    assert sealed["read_noise"] == 0.02 and "read_noise" not in calibrate(val)
    for bad_policy in ({"read_noise": 0.0}, {"read_noise": "0.02"}, {"read_noise": True}, {"read_noise": -1.0},
                       {"read_noise": 0.02, "value_range": None, "photometric_fit": None}):
        with pytest.raises(FormatError, match="read_noise"):
            Calibration.from_policy({"ood": sealed | bad_policy})
    old = Calibration.from_policy({"ood": calibrate(val)})
    assert old is not None and old.read_noise is None
    u = x[0].astype(np.float64)
    assert not old.reread(np.clip(u + 0.001, 0, 1), u)


def test_pack_seals_the_sensor_read_noise_only_with_a_calibration(tmp_path: Path) -> None:
    from packager.pack import build_policy

    np.savez(tmp_path / "val.npz", x=digits_validation())
    assert build_policy(None, str(tmp_path / "val.npz"), 0.01)["ood"]["read_noise"] == 0.01
    with pytest.raises(UsageError, match="--sensor-noise .* --calibrate-ood"):
        build_policy(None, None, 0.01)


@pytest.fixture(scope="module")
def noisy_env(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> Iterator[Any]:
    """A throw-away board whose sealed calibration declares a sensor read noise of 0.02."""
    pytest.importorskip("art")
    from packager.redteam import AgentEnv

    policy = {"ood": calibrate(digits_validation(), read_noise=0.02)}
    e = AgentEnv(Path(digits.onnx), policy, tmp_path_factory.mktemp("noisy"))
    try:
        yield e
    finally:
        e.close()


@pytest.mark.parametrize("sigma", [0.005, 0.02])
def test_zero_detections_over_10000_benign_queries_from_a_noisy_sensor(
    noisy_env: Any, digits_test: Any, sigma: float
) -> None:
    """Through the API: a sensor whose gain drifts by up to 5% and whose reads have noise of
    the declared standard deviation or a quarter of it; no event, no slowdown, no refusal."""
    from packager.redteam import RedteamConfig, benign

    x, y = digits_test
    cfg = RedteamConfig(benign_clients=6, benign_queries=10_000, seed=7)
    r = benign(noisy_env, x, y, cfg, sensor_drift=0.05, sensor_noise=sigma)
    assert r["queries_answered"] == 10_000 and r["queries_refused_by_throttling"] == 0
    assert r["detections"] == 0, r["detections_by_kind"]


def test_with_the_read_noise_sealed_hopskipjump_is_still_caught_within_the_bounds(
    noisy_env: Any, digits_test: Any
) -> None:
    """The re-read exemption costs the attack bounds nothing: split over five tokens it is
    linked within 50 queries; one token paced at the throttle's rate is caught within 20."""
    tokens = [noisy_env.token() for _ in range(5)]
    r = _hsj(noisy_env, tokens, digits_test, sample=2)
    assert r["first_detection_by_kind"].get("linked", 10**9) <= 50, r
    r = _hsj(noisy_env, [noisy_env.token()], digits_test, sample=3)
    assert r["queries_before_first_detection"] is not None and r["queries_before_first_detection"] <= 20, r
    assert r["queries_refused_by_throttling"] > 0


def test_an_attacker_who_makes_every_probe_a_re_read_is_measured(noisy_env: Any, digits_test: Any) -> None:
    """What the re-read exemption costs, through the API: the noise walk's small steps are each a
    re-read of the one before, so it is counted only once it leaves the noise's reach of its
    first step or its label flips; it is caught, and what it found by then is reported."""
    from packager.redteam import AgentTarget, BareTarget, RedteamConfig, noise_walk

    x, _ = digits_test
    cfg = RedteamConfig(read_noise=0.02)
    target = AgentTarget(noisy_env, [noisy_env.token()], noisy_env.limits.client_rate, cfg.max_wait_s)
    r = noise_walk(target, x[:10], digits_validation(), BareTarget(noisy_env.runner, noisy_env.task), cfg)
    assert r["completed"] and r["samples"] == 10
    assert r["first_detection_by_kind"].get("probing") is not None, r
    assert 0.0 <= r["evasion_by_first_detection"] <= r["evasion_success_rate"] <= 1.0
