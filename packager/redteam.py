"""``edgeward redteam``: real attacks from the Adversarial Robustness Toolbox (NCSC 2.1).

The model is packed for a throw-away board (with the policy and OoD calibration it would ship
with), installed, and served by the real agent service on a real Unix socket; every attack
query goes through the HTTP API with its own bearer token, as an application on the board
would send it. The same attacks then run against the model served bare (an onnxruntime
session returning every score), the baseline the agent is measured against.

Time is simulated: the service runs on an injected clock that the attackers advance at their
query rate and by every ``Retry-After`` they are given, so throttling shows up as refused
queries and simulated hours rather than as a long test run.

Attacks (ART, with scikit-learn surrogates; no deep-learning framework needed):
- ``copycat-natural``: CopycatCNN with an in-distribution pool (the validation data);
- ``copycat-noise``: CopycatCNN with a uniform-noise pool;
- ``hopskipjump``: HopSkipJump untargeted L2 evasion (decision-based, label-only);
- ``benign``: real use (:func:`benign_traffic`): several applications replaying the test split
  with repeats, bursts and a slowly drifting mix, at least 10,000 queries; no alarm may fire;
- ``benign-sensor-drift``: the same with a slowly drifting sensor gain, which makes resent inputs
  near-duplicates; ``benign-sensor-offset``: the same with a drifting brightness instead. The
  detectors take such a near-duplicate for a sensor change, not probing: no alarm may fire;
- with ``read_noise`` (``--sensor-noise``, the sensor's read noise sealed in the calibration):
  ``benign-noise-<sigma>``: the drifting gain with read noise of that sigma and of a
  quarter of it, so that no two reads of a scene are the same; no alarm may fire.

Adaptive attacks (against the agent only; each knows the detectors and the throttle):
- ``hopskipjump-paced``: one token sending at exactly the throttle's client rate, never refused;
- ``hopskipjump-sybil``: the same attack split round-robin over ``sybil_tokens`` user tokens;
- ``hopskipjump-mixed``: ``mix_benign`` natural test inputs from the same token before every
  attack query, to dilute the detectors' windows;
- ``copycat-budget``: CopycatCNN with natural data, spread evenly over ``budget_days`` budget
  windows (days of boottime) so that it never touches the daily budget nor the rate limit;
- ``gain-walk``: against the sensor-change exemption, every probe a gain change of the one before
  (:func:`gain_walk`): it darkens ``walk_samples`` inputs step by step until their labels flip;
- ``noise-walk`` (with ``read_noise``): against the re-read exemption, every probe inside the
  sealed read noise's reach of the one before (:func:`noise_walk`): it walks ``walk_samples``
  inputs towards the nearest validation sample of another class in small steps until they flip.

For each, the report gives the queries answered before the first detection and what the
attacker had by then (HopSkipJump: the samples it had already found an adversarial for within
``hsj_goal_l2``; CopycatCNN: the agreement of a surrogate trained on the answers it had).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import EnvironmentFault, UsageError
from device_agent.store.fsutil import atomic_write

T0 = 1_800_000_000.0


@dataclass(frozen=True)
class RedteamConfig:
    """Sizes of the attacks: large enough to be real, small enough for CI."""

    copycat_queries: int = 500
    hsj_samples: int = 3
    hsj_max_iter: int = 10
    hsj_max_eval: int = 200
    hsj_init_eval: int = 20
    benign_clients: int = 10
    benign_queries: int = 10_000
    benign_rate: float = 1.0  # queries per second per benign client
    attacker_rate: float = 50.0  # queries per second an attacker sends when not throttled
    max_wait_s: float = 30 * 86400.0  # an attacker gives up after waiting this long in total
    seed: int = 0
    adaptive: bool = True  # run the adaptive attacks too
    sybil_tokens: int = 5
    mix_benign: int = 3  # natural queries the mixed attacker sends before each attack query
    budget_days: int = 3  # budget windows the budget-aware attacker spreads over
    hsj_goal_l2: float = 2.0  # an adversarial within this L2 of its input counts as a success
    sensor_drift: float = 0.05  # gain amplitude of the drifting-sensor benign run
    sensor_offset: float = 0.05  # brightness amplitude of the drifting-brightness benign run
    sensor_drift_queries: int = 5_000  # queries of each drifting-sensor benign run
    walk_samples: int = 10  # test inputs the gain-walk attacker darkens until their label flips
    walk_step: float = 0.1  # L2 length of each of its steps (below probe_eps: near-duplicates)
    # The sensor's read noise (a standard deviation) sealed in the calibration; None: not declared,
    # no noisy benign runs and no noise-walk.
    read_noise: float | None = None
    noise_walk_step: float = 0.025  # L2 length of each step of the noise-walk attacker


class AttackStopped(Exception):
    """The attacker gave up: the agent made it wait longer than ``max_wait_s``."""


@dataclass
class Tally:
    """What one attacker saw: answered and refused queries, first detection, simulated time."""

    answered: int = 0
    refused: int = 0
    first_detection: int | None = None
    first_detection_kind: str | None = None
    first_by_kind: dict[str, int] = field(default_factory=dict)
    detections: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    tokens: int = 1
    benign_answered: int = 0  # natural queries a mixed attacker sent as cover
    # (input, label) of the attack queries answered before the first detection: the attacker's gain
    before: list[tuple[np.ndarray, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "cover_queries_answered": self.benign_answered,
            "queries_answered": self.answered,
            "queries_refused_by_throttling": self.refused,
            "queries_before_first_detection": self.first_detection,
            "first_detection_kind": self.first_detection_kind,
            "first_detection_by_kind": self.first_by_kind,
            "detections": self.detections,
            "simulated_seconds": round(self.ended - self.started, 1),
        }


class SimClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _UnixConnection(http.client.HTTPConnection):
    """The standard library's HTTP client over the agent's Unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiCaller:
    """One application on the board: its bearer token and a keep-alive connection to the API."""

    def __init__(self, socket_path: Path, token: str) -> None:
        self._conn = _UnixConnection(socket_path)
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def predict(self, inputs: Any) -> tuple[int, dict[str, str], Any]:
        """``POST /v1/predict``; returns (status, lower-cased headers, decoded JSON body)."""
        body = json.dumps({"inputs": np.asarray(inputs).tolist()}).encode()
        try:
            return self._post(body)
        except ConnectionError:
            self._conn.close()  # the agent closed an idle connection: reconnect once
            return self._post(body)

    def _post(self, body: bytes) -> tuple[int, dict[str, str], Any]:
        self._conn.request("POST", "/v1/predict", body, self._headers)
        resp = self._conn.getresponse()
        data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, json.loads(data) if data else None


class AgentTarget:
    """Labels from the running agent, one request per input, through its HTTP API.

    ``tokens`` are (client id, token) pairs used round-robin (a Sybil attacker has several);
    ``cover`` inputs are sent from the same token before every attack query (``mix`` of them);
    ``per_window`` caps the attack queries per budget window of ``window_s`` seconds, paced
    evenly over it (a budget-aware attacker): the attacker then waits for the next window."""

    def __init__(
        self,
        env: Any,
        tokens: list[tuple[str, str]],
        rate: float,
        max_wait: float,
        *,
        cover: np.ndarray | None = None,
        mix: int = 0,
        per_window: int = 0,
        window_s: float = 86400.0,
    ) -> None:
        self.env = env
        self.ids = {cid for cid, _ in tokens}
        self.https = [ApiCaller(env.socket, tok) for _, tok in tokens]
        self.gap = 1.0 / rate if per_window == 0 else window_s / per_window
        self.max_wait = max_wait
        self.cover, self.mix = cover, mix
        self.per_window, self.window_s = per_window, window_s
        self.tally = Tally(started=env.clock.t, tokens=len(tokens))
        self._seen = env.events_seq()
        self._waited = 0.0
        self._turn = 0
        self._window_start, self._in_window = env.clock.t, 0
        self._rng = np.random.default_rng(len(tokens))

    def labels(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        for i, row in enumerate(x):
            out[i] = self._one(row)
        return out

    def _one(self, row: np.ndarray) -> int:
        http = self.https[self._turn % len(self.https)]
        self._turn += 1
        if self.per_window:
            if self._in_window >= self.per_window:  # this window's share is spent: wait it out
                self._window_start += self.window_s
                self.env.clock.t = max(self.env.clock.t, self._window_start)
                self._in_window = 0
            self._in_window += 1
        if self.cover is not None:
            for _ in range(self.mix):
                self._ask(http, self.cover[self._rng.integers(len(self.cover))], cover=True)
        label = self._ask(http, row, cover=False)
        if self.tally.first_detection is None:
            self.tally.before.append((np.asarray(row, dtype=np.float32), label))
        return label

    def _ask(self, http: ApiCaller, row: np.ndarray, cover: bool) -> int:
        while True:
            self.env.clock.t += self.gap
            status, headers, doc = http.predict(np.asarray(row).astype(np.float32))
            self._note_events()
            if status == 200:
                if cover:
                    self.tally.benign_answered += 1
                else:
                    self.tally.answered += 1
                self.tally.ended = self.env.clock.t
                return int(doc["label"])
            if status != 429:
                raise EnvironmentFault(f"the agent answered {status}: {doc}")
            self.tally.refused += 1
            wait = float(headers.get("retry-after", "1"))
            self._waited += wait
            if self._waited > self.max_wait:
                raise AttackStopped(f"throttled for {self._waited:.0f} s in total")
            self.env.clock.t += wait

    def _note_events(self) -> None:
        for e in self.env.events_after(self._seen):
            self._seen = e.seq
            named = {e.client} | set(e.evidence.get("clients", []))
            if not named & self.ids:
                continue
            # the query that raised it was answered (or refused) just now
            n = self.tally.answered + 1
            self.tally.detections[e.kind] = self.tally.detections.get(e.kind, 0) + 1
            self.tally.first_by_kind.setdefault(e.kind, n)
            if self.tally.first_detection is None:
                self.tally.first_detection, self.tally.first_detection_kind = n, e.kind


class BareTarget:
    """The same model with no guard: every score, no limits, no detection."""

    def __init__(self, runner: Any, task: dict[str, Any]) -> None:
        from device_agent.runtime.output import prepare_inputs, shape_output

        self._prepare, self._shape = prepare_inputs, shape_output
        self.runner, self.task = runner, task
        self.tally = Tally()

    def scores(self, x: np.ndarray) -> np.ndarray:
        feeds, _ = self._prepare(self.runner, x.astype(np.float32))
        doc = self._shape(self.runner.run(feeds), self.task, {}, "admin", True)
        self.tally.answered += len(x)
        return np.array([p["scores"] for p in doc["predictions"]])

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).argmax(axis=1)


def _art() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import art  # noqa: F401
            from art.attacks.evasion import HopSkipJump
            from art.attacks.extraction import CopycatCNN
            from art.estimators.classification import BlackBoxClassifier
            from art.estimators.classification.scikitlearn import ScikitlearnClassifier
    except ImportError as e:
        raise EnvironmentFault("the red team needs ART: pip install 'edgeward[redteam]'") from e
    return HopSkipJump, CopycatCNN, BlackBoxClassifier, ScikitlearnClassifier


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(labels), n), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def copycat(
    target: Any,
    pool: np.ndarray,
    n_classes: int,
    cfg: RedteamConfig,
    x_test: np.ndarray,
    y_test: np.ndarray,
    victim_test: np.ndarray,
) -> dict[str, Any]:
    """CopycatCNN with an MLP surrogate; returns its accuracy and agreement with the victim."""
    _, CopycatCNN, BlackBoxClassifier, ScikitlearnClassifier = _art()  # noqa: N806
    from sklearn.neural_network import MLPClassifier

    class Surrogate(ScikitlearnClassifier):  # type: ignore[misc, valid-type]
        def fit(
            self, x: np.ndarray, y: np.ndarray, **_: Any
        ) -> None:  # drops Keras-style arguments
            super().fit(x, y)

    def predict(x: np.ndarray) -> np.ndarray:
        return _one_hot(target.labels(x), n_classes)

    victim = BlackBoxClassifier(predict, (pool.shape[1],), n_classes, clip_values=(0.0, 1.0))
    thief = Surrogate(
        MLPClassifier((64,), max_iter=500, random_state=cfg.seed), clip_values=(0.0, 1.0)
    )
    attack = CopycatCNN(
        victim, batch_size_fit=32, batch_size_query=32, nb_epochs=1, nb_stolen=cfg.copycat_queries
    )
    result: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stolen = attack.extract(pool, thieved_classifier=thief)
        pred = stolen.predict(x_test).argmax(axis=1)
        result.update(
            surrogate_accuracy=round(float((pred == y_test).mean()), 4),
            agreement_with_victim=round(float((pred == victim_test).mean()), 4),
            completed=True,
        )
    except AttackStopped as e:
        result.update(completed=False, stopped=str(e))
    tally = target.tally
    if tally.first_detection is None:
        result["agreement_by_first_detection"] = result.get("agreement_with_victim")
    else:
        result["agreement_by_first_detection"] = _agreement_from(tally.before, cfg, x_test, victim_test)
    return result | tally.to_json()


def _agreement_from(
    answers: list[tuple[np.ndarray, int]], cfg: RedteamConfig, x_test: np.ndarray, victim_test: np.ndarray
) -> float:
    """What a surrogate trained on ``answers`` alone agrees with the victim on (0 when it cannot
    be trained: fewer than two labels seen)."""
    from sklearn.neural_network import MLPClassifier

    if len({label for _, label in answers}) < 2:
        return 0.0
    x = np.stack([row for row, _ in answers])
    y = np.array([label for _, label in answers])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MLPClassifier((64,), max_iter=500, random_state=cfg.seed).fit(x, y)
    return round(float((model.predict(x_test) == victim_test).mean()), 4)


def hopskipjump(
    target: Any, x: np.ndarray, judge: BareTarget, n_classes: int, cfg: RedteamConfig
) -> dict[str, Any]:
    """Untargeted L2 HopSkipJump from label-only answers on a few test inputs; success is judged
    on the bare model (the same model), so judging costs the attacker no queries."""
    HopSkipJump, _, BlackBoxClassifier, _ = _art()  # noqa: N806

    def predict(xb: np.ndarray) -> np.ndarray:
        return _one_hot(target.labels(xb), n_classes)

    victim = BlackBoxClassifier(predict, (x.shape[1],), n_classes, clip_values=(0.0, 1.0))
    attack = HopSkipJump(
        victim,
        targeted=False,
        norm=2,
        max_iter=cfg.hsj_max_iter,
        max_eval=cfg.hsj_max_eval,
        init_eval=cfg.hsj_init_eval,
        init_size=100,
        verbose=False,
    )
    result: dict[str, Any] = {"samples": len(x)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.random.seed(cfg.seed)  # ART draws from numpy's global generator
            adv = attack.generate(x.astype(np.float32))
        judged = judge.tally.answered
        changed = judge.labels(adv) != judge.labels(x)
        judge.tally.answered = judged
        dist = np.linalg.norm((adv - x).reshape(len(x), -1), axis=1)
        mean_l2 = round(float(dist[changed].mean()), 4) if changed.any() else None
        result.update(
            completed=True,
            mean_l2=mean_l2,
            evasion_success_rate=round(float(changed.mean()), 4),
            evasion_within_goal=round(float((changed & (dist <= cfg.hsj_goal_l2)).mean()), 4),
        )
    except AttackStopped as e:
        result.update(completed=False, stopped=str(e))
    tally = target.tally
    if tally.first_detection is None:
        result["evasion_by_first_detection"] = result.get("evasion_within_goal")
    else:
        result["evasion_by_first_detection"] = _evasion_from(tally.before, x, judge, cfg.hsj_goal_l2)
    return result | tally.to_json()


def _evasion_from(answers: list[tuple[np.ndarray, int]], x: np.ndarray, judge: BareTarget, goal: float) -> float:
    """The share of inputs ``x`` for which one of the ``answers`` is already an adversarial
    example: a different label, within L2 ``goal`` of the input."""
    if not answers:
        return 0.0
    judged = judge.tally.answered
    own = judge.labels(x)
    judge.tally.answered = judged
    rows = np.stack([row for row, _ in answers]).reshape(len(answers), -1)
    labels = np.array([label for _, label in answers])
    found = [
        bool(np.any((labels != own[i]) & (np.linalg.norm(rows - x[i].reshape(-1), axis=1) <= goal)))
        for i in range(len(x))
    ]
    return round(float(np.mean(found)), 4)


class AgentEnv:
    """A throw-away board: provisioned, the model packed with its policy and installed, served."""

    def __init__(self, model_path: Path, policy: dict[str, Any], workdir: Path) -> None:
        from device_agent import Agent
        from device_agent.service.events import EventStore
        from device_agent.service.http import Server
        from device_agent.service.service import Service
        from device_agent.store.keys import KeySource

        from .keys import generate, load_private_key
        from .modelfile import infer_task, read_model
        from .pack import PackOptions, load_enrolments, pack
        from .profiles import load_profile
        from .signers import FileSigner

        saved = os.environ.pop("EDGEWARD_PASSPHRASE", None)
        try:
            generate("publisher", workdir / "publisher", unencrypted=True)
        finally:
            if saved is not None:
                os.environ["EDGEWARD_PASSPHRASE"] = saved
        keys = KeySource(passphrase=secrets.token_bytes(16).hex().encode())
        data = workdir / "board"
        pub = workdir / "publisher" / "publisher.pub"
        from device_agent.bundle.keyfiles import load_public_key_file

        (workdir / "board.json").write_bytes(
            Agent.provision(data, "redteam-board", [load_public_key_file(pub)], [], keys)
        )
        model = read_model(model_path)
        self.task = infer_task(model, {})
        pack(
            model,
            load_profile("rpi4b"),
            FileSigner(load_private_key(workdir / "publisher" / "publisher.key")),
            load_enrolments([workdir / "board.json"]),
            PackOptions(model_id="redteam", model_version=1, task=self.task, policy=policy),
            workdir / "out",
        )
        agent = Agent(data, keys)
        agent.install((workdir / "out" / "redteam-board.ewb").read_bytes())
        self.clock = SimClock()
        self.events = EventStore(data / "events.db")
        # One simulated clock for both the timestamps and the throttle's boottime.
        self.service = Service(agent, clock=self.clock, monotonic=self.clock, events=self.events)
        self.socket = workdir / "agent.sock"
        self.server = Server(self.service, self.socket).start()
        self.runner = agent.model().runner
        # The limits the service applies, as an attacker learns them from its Retry-After answers.
        from device_agent.config import ThrottleConfig

        self.limits = ThrottleConfig.from_json(policy.get("throttle", {}), agent.config.throttle).tightest(
            self.service.config.throttle
        )

    def token(self) -> tuple[str, str]:
        from device_agent.store.datadir import utcnow

        rec, token = self.service.tokens.add("user", utcnow())
        return rec.id, token

    def events_seq(self) -> int:
        last = self.events.list(after_seq=0, limit=1_000_000)
        return last[-1].seq if last else 0

    def events_after(self, seq: int) -> list[Any]:
        return self.events.list(after_seq=seq)

    def close(self) -> None:
        self.server.stop()


def _on(env: AgentEnv, work: Callable[[AgentEnv], dict[str, Any]]) -> dict[str, Any]:
    """``work`` on a board of its own, stopped afterwards."""
    try:
        return work(env)
    finally:
        env.close()


def adaptive(
    fresh: Callable[[], AgentEnv],
    x_test: np.ndarray,
    y_test: np.ndarray,
    x_val: np.ndarray,
    bare: BareTarget,
    n_classes: int,
    cfg: RedteamConfig,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The adaptive attacks against the agent (the module's docstring says what each does), each
    on a ``fresh`` board of its own."""
    hsj_x = x_test[: cfg.hsj_samples]
    victim_test = bare.labels(x_test)
    bare.tally.answered = 0
    cover = x_test[cfg.hsj_samples :]
    plans: dict[str, Callable[[AgentEnv], AgentTarget]] = {
        "hopskipjump-paced": lambda e: AgentTarget(e, [e.token()], e.limits.client_rate, cfg.max_wait_s),
        "hopskipjump-sybil": lambda e: AgentTarget(
            e, [e.token() for _ in range(cfg.sybil_tokens)], e.limits.client_rate, cfg.max_wait_s
        ),
        "hopskipjump-mixed": lambda e: AgentTarget(
            e, [e.token()], e.limits.client_rate, cfg.max_wait_s, cover=cover, mix=cfg.mix_benign
        ),
    }
    out: dict[str, Any] = {}
    for name, plan in plans.items():
        log(f"agent: {name}")
        env = fresh()
        try:
            out[name] = hopskipjump(plan(env), hsj_x, bare, n_classes, cfg)
        finally:
            env.close()

    def budgeted(e: AgentEnv) -> dict[str, Any]:
        per_window = min(e.limits.daily_budget, -(-cfg.copycat_queries // cfg.budget_days))
        window_s = e.service.config.budget.window_seconds
        target = AgentTarget(
            e, [e.token()], e.limits.client_rate, cfg.max_wait_s, per_window=per_window, window_s=window_s
        )
        return copycat(target, x_val, n_classes, cfg, x_test, y_test, victim_test)

    log("agent: copycat-budget")
    out["copycat-budget"] = _on(fresh(), budgeted)
    log("agent: gain-walk")
    out["gain-walk"] = _on(
        fresh(),
        lambda e: gain_walk(
            AgentTarget(e, [e.token()], e.limits.client_rate, cfg.max_wait_s), x_test[: cfg.walk_samples], bare, cfg
        ),
    )
    if cfg.read_noise is not None:
        log("agent: noise-walk")
        out["noise-walk"] = _on(
            fresh(),
            lambda e: noise_walk(
                AgentTarget(e, [e.token()], e.limits.client_rate, cfg.max_wait_s),
                x_test[: cfg.walk_samples],
                x_val,
                bare,
                cfg,
            ),
        )
    return out


def gain_walk(target: Any, x: np.ndarray, judge: BareTarget, cfg: RedteamConfig) -> dict[str, Any]:
    """The attacker who makes every probe look like a sensor change: it darkens each input
    (lowers its gain) in steps of L2 ``walk_step`` until the label flips, so that each query is
    a gain change of the one before with the same label, until the last. It finds only the
    adversarial examples a change of gain gives, at their L2; the report says how many by the
    first detection."""
    result: dict[str, Any] = {"samples": len(x)}
    judged = judge.tally.answered
    own = judge.labels(x)
    judge.tally.answered = judged
    def steps(i: int, x0: np.ndarray) -> list[np.ndarray]:
        norm = float(np.linalg.norm(x0))
        return [x0 * (1.0 - k * cfg.walk_step / norm) for k in range(1, int(norm / cfg.walk_step) + 1)]

    return _walk(target, x, own, steps, judge, cfg, result)


def noise_walk(target: Any, x: np.ndarray, pool: np.ndarray, judge: BareTarget, cfg: RedteamConfig) -> dict[str, Any]:
    """The attacker who makes every probe look like a re-read with the sealed read noise: from
    each input it walks in steps of L2 ``noise_walk_step`` (each well inside the noise's reach of
    the one before) towards the nearest ``pool`` sample the model labels otherwise, until the
    label flips or it has gone twice the noise's reach. It finds the adversarial examples that a
    short straight walk gives; the report says how many by the first detection."""
    from device_agent.service.detect import reread_bound

    if cfg.read_noise is None:
        raise UsageError("the noise-walk attacker needs the sensor's read noise (--sensor-noise)")
    result: dict[str, Any] = {"samples": len(x)}
    judged = judge.tally.answered
    own = judge.labels(x)
    pool = np.asarray(pool, dtype=np.float64)
    pool_labels = judge.labels(pool)
    judge.tally.answered = judged
    reach = 2.0 * float(np.sqrt(reread_bound(cfg.read_noise, x.shape[1])))

    def steps(i: int, x0: np.ndarray) -> list[np.ndarray]:
        u = x0.astype(np.float64)
        other = pool[pool_labels != own[i]]
        to = other[int(((other - u) ** 2).sum(axis=1).argmin())] - u
        to /= float(np.linalg.norm(to))
        n = int(reach / cfg.noise_walk_step)
        return [(u + k * cfg.noise_walk_step * to).astype(np.float32) for k in range(1, n + 1)]

    result["reach_l2"] = round(reach, 4)
    return _walk(target, x, own, steps, judge, cfg, result)


def _walk(
    target: Any,
    x: np.ndarray,
    own: np.ndarray,
    steps: Callable[[int, np.ndarray], list[np.ndarray]],
    judge: BareTarget,
    cfg: RedteamConfig,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Send each input, then its ``steps`` (clipped to [0, 1]) until its label flips."""
    found = np.zeros(len(x), dtype=bool)
    dist = np.full(len(x), np.nan)
    try:
        for i, x0 in enumerate(np.asarray(x, dtype=np.float32)):
            for step in steps(i, x0):
                row = np.clip(step, 0.0, 1.0)
                if int(target.labels(row[None])[0]) != own[i]:
                    found[i], dist[i] = True, float(np.linalg.norm(row - x0))
                    break
        result["completed"] = True
    except AttackStopped as e:
        result.update(completed=False, stopped=str(e))
    result.update(
        mean_l2=round(float(np.nanmean(dist[found])), 4) if found.any() else None,
        evasion_success_rate=round(float(found.mean()), 4),
        evasion_within_goal=round(float((found & (dist <= cfg.hsj_goal_l2)).mean()), 4),
    )
    tally = target.tally
    if tally.first_detection is None:
        result["evasion_by_first_detection"] = result["evasion_within_goal"]
    else:
        result["evasion_by_first_detection"] = _evasion_from(tally.before, x, judge, cfg.hsj_goal_l2)
    return result | tally.to_json()


def benign_traffic(
    x: np.ndarray,
    y: np.ndarray,
    apps: int,
    queries: int,
    seed: int,
    rate: float = 1.0,
    sensor_drift: float = 0.0,
    sensor_offset: float = 0.0,
    sensor_noise: float = 0.0,
) -> list[tuple[float, int, np.ndarray]]:
    """Real use of the model by ``apps`` applications, ``queries`` in all, as (seconds from the
    start, application, input), in time order. Each application replays the test split ``x``:

    - in bursts: sessions of 1 to 20 queries about 0.1 s apart, then an idle gap, so that it
      averages about ``rate`` queries a second;
    - with repeats: 15% of its queries resend one of its last five inputs unchanged (a retry, a
      still scene), and the split is drawn with replacement, so samples come back;
    - with slow drift: the mix of classes it sees (weights from ``y``) and its pace change slowly
      over hours, each application on its own cycle;
    - ``sensor_drift`` > 0: its sensor's gain also drifts slowly by up to that fraction, so that a
      sample seen again is a near-duplicate rather than an exact repeat;
    - ``sensor_offset`` > 0: its sensor's brightness (an offset added to every value) drifts
      slowly by up to that much, on a cycle of its own;
    - ``sensor_noise`` > 0: every read gets Gaussian noise of that standard deviation.

    Gain and offset act together, then the value is clipped to [0, 1] once, as a sensor clips.
    The sensor's own drift and noise come from a generator of their own, so that the same seed
    gives the same queries with or without them.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == k) for k in classes]
    out: list[tuple[float, int, np.ndarray]] = []
    per = [queries // apps + (a < queries % apps) for a in range(apps)]
    for a in range(apps):
        t = float(rng.uniform(0, 60))
        period = rng.uniform(2, 6, size=3) * 3600.0  # class mix, pace and gain cycles
        phase = rng.uniform(0, 2 * np.pi, size=len(classes) + 2)
        sensor = np.random.default_rng((seed, a))
        offset_period, offset_phase = sensor.uniform(2, 6) * 3600.0, sensor.uniform(0, 2 * np.pi)
        recent: list[np.ndarray] = []
        sent = 0
        while sent < per[a]:
            cycle = 2 * np.pi * t / period
            pace = 1.0 + 0.5 * np.sin(cycle[1] + phase[-2])
            for _ in range(min(int(rng.integers(1, 21)), per[a] - sent)):
                t += float(rng.exponential(0.1))
                if recent and rng.random() < 0.15:
                    row = recent[-int(rng.integers(1, len(recent) + 1))]
                else:
                    w = 1.0 + 0.8 * np.sin(cycle[0] + phase[: len(classes)])
                    k = int(rng.choice(len(classes), p=w / w.sum()))
                    row = x[int(rng.choice(by_class[k]))]
                    if sensor_drift or sensor_offset:
                        gain = 1.0 + sensor_drift * np.sin(2 * np.pi * t / period[2] + phase[-1])
                        offset = sensor_offset * np.sin(2 * np.pi * t / offset_period + offset_phase)
                        row = np.clip(row * gain + offset, 0.0, 1.0)
                    if sensor_noise:
                        row = np.clip(row + sensor.normal(0.0, sensor_noise, size=row.shape), 0.0, 1.0)
                    row = np.asarray(row, dtype=np.float32)
                    recent = (recent + [row])[-5:]
                out.append((t, a, row))
                sent += 1
            # idle until the next session: about 10 queries per session at ``rate`` on average
            t += float(rng.exponential(10.5 / rate * pace))
    out.sort(key=lambda e: e[0])
    return out


def benign(
    env: AgentEnv,
    x: np.ndarray,
    y: np.ndarray,
    cfg: RedteamConfig,
    queries: int | None = None,
    sensor_drift: float = 0.0,
    sensor_offset: float = 0.0,
    sensor_noise: float = 0.0,
) -> dict[str, Any]:
    """:func:`benign_traffic` through the API, one token per application; counts every event
    that names one of them."""
    clients = [env.token() for _ in range(cfg.benign_clients)]
    https = [ApiCaller(env.socket, tok) for _, tok in clients]
    start = env.clock.t
    traffic = benign_traffic(
        x,
        y,
        cfg.benign_clients,
        queries or cfg.benign_queries,
        cfg.seed,
        cfg.benign_rate,
        sensor_drift,
        sensor_offset,
        sensor_noise,
    )
    seq0 = env.events_seq()
    answered = refused = 0
    for t, c, row in traffic:
        env.clock.t = start + t
        status, _, _ = https[c].predict(row)
        answered += status == 200
        refused += status == 429
    ids = {cid for cid, _ in clients}
    events = [
        e for e in env.events_after(seq0) if ({e.client} | set(e.evidence.get("clients", []))) & ids
    ]
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {
        "clients": cfg.benign_clients,
        "sensor_drift": sensor_drift,
        "sensor_offset": sensor_offset,
        "sensor_noise": sensor_noise,
        "queries_answered": answered,
        "queries_refused_by_throttling": refused,
        "detections": len(events),
        "detection_kinds": sorted(kinds),
        "detections_by_kind": kinds,
        "simulated_seconds": round(env.clock.t - start, 1),
    }


def run(
    model_path: Path,
    test: Path,
    validation: Path,
    policy: dict[str, Any] | None = None,
    cfg: RedteamConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every attack against the agent and against the bare model; returns the report."""
    from device_agent.service.detect import calibrate

    cfg = cfg or RedteamConfig()
    _art()
    x_test, y_test = _load(test, need_y=True)
    if y_test is None:  # _load(need_y=True) already refuses data without labels
        raise UsageError(f"{test}: the test data needs labels y")
    x_val, _ = _load(validation, need_y=False)
    full_policy = {**(policy or {}), "ood": calibrate(x_val, read_noise=cfg.read_noise)}
    rng = np.random.default_rng(cfg.seed)
    noise = rng.random((cfg.copycat_queries, x_val.shape[1])).astype(np.float32)
    hsj_x = x_test[: cfg.hsj_samples]
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "schema": "edgeward.redteam-report/1",
        "model": str(model_path),
        "config": cfg.__dict__,
        "policy": {k: v for k, v in full_policy.items() if k != "ood"},
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgeward-redteam-") as tmp:
        boards = iter(range(1_000))

        def fresh() -> AgentEnv:
            """A new board for one run: no detection state left over from an earlier attack."""
            d = Path(tmp) / f"board{next(boards)}"
            d.mkdir()
            return AgentEnv(model_path, full_policy, d)

        env = fresh()
        try:
            bare = BareTarget(env.runner, env.task)
            victim_test = bare.labels(x_test)
            n_classes = int(max(victim_test.max(), y_test.max()) + 1)
            report["victim_accuracy"] = round(float((victim_test == y_test).mean()), 4)

            def agent_target() -> AgentTarget:
                return AgentTarget(env, [env.token()], cfg.attacker_rate, cfg.max_wait_s)

            for name, make in (
                ("bare", lambda: BareTarget(env.runner, env.task)),
                ("agent", agent_target),
            ):
                results: dict[str, Any] = {}
                log(f"{name}: copycat with natural data")
                results["copycat-natural"] = copycat(
                    make(), x_val, n_classes, cfg, x_test, y_test, victim_test
                )
                log(f"{name}: copycat with noise")
                results["copycat-noise"] = copycat(
                    make(), noise, n_classes, cfg, x_test, y_test, victim_test
                )
                log(f"{name}: hopskipjump")
                results["hopskipjump"] = hopskipjump(make(), hsj_x, bare, n_classes, cfg)
                report["targets"][name] = results
            if cfg.adaptive:
                report["targets"]["agent"] |= adaptive(fresh, x_test, y_test, x_val, bare, n_classes, cfg, log)
            log("agent: benign clients")
            report["targets"]["agent"]["benign"] = _on(fresh(), lambda e: benign(e, x_test, y_test, cfg))
            if cfg.sensor_drift_queries:
                log("agent: benign clients with a drifting sensor gain")
                report["targets"]["agent"]["benign-sensor-drift"] = _on(
                    fresh(),
                    lambda e: benign(e, x_test, y_test, cfg, cfg.sensor_drift_queries, cfg.sensor_drift),
                )
                log("agent: benign clients with a drifting sensor brightness")
                report["targets"]["agent"]["benign-sensor-offset"] = _on(
                    fresh(),
                    lambda e: benign(e, x_test, y_test, cfg, cfg.sensor_drift_queries, 0.0, cfg.sensor_offset),
                )
            if cfg.sensor_drift_queries and cfg.read_noise is not None:
                for sigma in (cfg.read_noise, cfg.read_noise / 4):
                    log(f"agent: benign clients with a drifting sensor gain and read noise {sigma:g}")
                    env_noisy = fresh()
                    try:
                        report["targets"]["agent"][f"benign-noise-{sigma:g}"] = benign(
                            env_noisy, x_test, y_test, cfg, cfg.sensor_drift_queries, cfg.sensor_drift, 0.0, sigma
                        )
                    finally:
                        env_noisy.close()
        finally:
            env.close()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _load(path: Path, need_y: bool) -> tuple[np.ndarray, np.ndarray | None]:
    from .arrays import load_npz

    z = load_npz(path, "data file")
    if "x" not in z:
        raise UsageError(f"{path}: need an .npz with arrays x (inputs){' and y (labels)' if need_y else ''}")
    x = z["x"].astype(np.float32)
    y = z["y"].astype(np.int64) if "y" in z else None
    if need_y and y is None:
        raise UsageError(f"{path}: the test data needs labels y")
    return x.reshape(len(x), -1), y


def summary(report: dict[str, Any]) -> str:
    """The report as a table: one row per target and attack."""
    head = (
        f"{'target':<6} {'attack':<20} {'answered':>8} {'refused':>8} {'1st det.':>8} {'by':<10} "
        f"{'sim time':>9}  result"
    )
    lines = [f"victim accuracy {report['victim_accuracy']}", head]
    for target, attacks in report["targets"].items():
        for name, r in attacks.items():
            if name.startswith("benign"):
                kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.get("detections_by_kind", {}).items()))
                res = f"{r['detections']} detections over {r['queries_answered']} benign queries"
                res += f" ({kinds})" if kinds else ""
            elif "agreement_with_victim" in r:
                res = (
                    f"surrogate acc {r['surrogate_accuracy']}, "
                    f"agreement {r['agreement_with_victim']}"
                )
            elif r.get("completed") and "evasion_success_rate" in r:
                res = f"evasion success {r['evasion_success_rate']}, mean L2 {r['mean_l2']}"
            else:
                res = f"stopped: {r.get('stopped')}"
            if "evasion_by_first_detection" in r:
                res += f"; by 1st det.: evasion within L2 goal {r['evasion_by_first_detection']}"
            elif "agreement_by_first_detection" in r:
                res += f"; by 1st det.: agreement {r['agreement_by_first_detection']}"
            if r.get("tokens", 1) > 1 or r.get("cover_queries_answered"):
                res += f" [{r['tokens']} tokens, {r.get('cover_queries_answered', 0)} cover queries]"
            first = r.get("queries_before_first_detection")
            lines.append(
                f"{target:<6} {name:<20} {r['queries_answered']:>8} "
                f"{r['queries_refused_by_throttling']:>8} {first if first is not None else '-':>8} "
                f"{r.get('first_detection_kind') or '-':<10} "
                f"{r['simulated_seconds']:>8.0f}s  {res}"
            )
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add ``edgeward redteam`` to the host CLI."""
    sp = sub.add_parser(
        "redteam",
        help="run ART attacks against the agent and the bare model; write a report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sp.add_argument("model", help="model file (.onnx)")
    sp.add_argument(
        "--test",
        required=True,
        help="test data .npz (x, y): victim accuracy, HSJ inputs, benign replay",
    )
    sp.add_argument(
        "--validation",
        required=True,
        help="validation .npz (x): OoD calibration and natural attack pool",
    )
    sp.add_argument("--policy", help="serving policy JSON to seal (throttle limits, bands, audit)")
    sp.add_argument("--out", required=True, help="where to write the JSON report")
    sp.add_argument("--benign-queries", type=int, default=RedteamConfig.benign_queries)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--sensor-noise",
        type=float,
        metavar="SIGMA",
        help="the sensor's read noise to seal in the calibration (as edgeward pack --sensor-noise); "
        "adds benign runs with read noise and the noise-walk attacker",
    )
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(func=cmd_redteam)


def cmd_redteam(args: Any) -> int:
    import sys

    from .pack import build_policy

    cfg = RedteamConfig(benign_queries=args.benign_queries, seed=args.seed, read_noise=args.sensor_noise)
    report = run(
        Path(args.model),
        Path(args.test),
        Path(args.validation),
        build_policy(args.policy, None),
        cfg,
        log=lambda m: print(f"redteam: {m}", file=sys.stderr, flush=True),
    )
    atomic_write(Path(args.out), (json.dumps(report, indent=2) + "\n").encode(), 0o644)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0
