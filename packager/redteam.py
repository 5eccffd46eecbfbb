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
- ``benign``: the test split replayed in random order by 10 clients (Poisson, ~1 query/s each).
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

    def to_json(self) -> dict[str, Any]:
        return {
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
    """Labels from the running agent, one request per input, through its HTTP API."""

    def __init__(self, env: Any, client_id: str, token: str, rate: float, max_wait: float) -> None:
        self.env = env
        self.client_id = client_id
        self.http = ApiCaller(env.socket, token)
        self.gap = 1.0 / rate
        self.max_wait = max_wait
        self.tally = Tally(started=env.clock.t)
        self._seen = env.events_seq()
        self._waited = 0.0

    def labels(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        for i, row in enumerate(x):
            out[i] = self._one(row)
        return out

    def _one(self, row: np.ndarray) -> int:
        while True:
            self.env.clock.t += self.gap
            status, headers, doc = self.http.predict(row.astype(np.float32))
            self._note_events()
            if status == 200:
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
            if e.client != self.client_id:
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
    return result | target.tally.to_json()


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
            completed=True, mean_l2=mean_l2, evasion_success_rate=round(float(changed.mean()), 4)
        )
    except AttackStopped as e:
        result.update(completed=False, stopped=str(e))
    return result | target.tally.to_json()


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


def benign(env: AgentEnv, x: np.ndarray, cfg: RedteamConfig) -> dict[str, Any]:
    """The test split replayed in random order by several clients at a realistic rate."""
    rng = np.random.default_rng(cfg.seed)
    clients = [env.token() for _ in range(cfg.benign_clients)]
    https = [ApiCaller(env.socket, tok) for _, tok in clients]
    per = cfg.benign_queries // cfg.benign_clients
    start = env.clock.t
    arrivals = sorted(
        (t, c)
        for c in range(cfg.benign_clients)
        for t in start + np.cumsum(rng.exponential(1.0 / cfg.benign_rate, per))
    )
    seq0 = env.events_seq()
    answered = refused = 0
    for t, c in arrivals:
        env.clock.t = t
        status, _, _ = https[c].predict(x[rng.integers(len(x))])
        answered += status == 200
        refused += status == 429
    ids = {cid for cid, _ in clients}
    events = [e for e in env.events_after(seq0) if e.client in ids]
    return {
        "clients": cfg.benign_clients,
        "queries_answered": answered,
        "queries_refused_by_throttling": refused,
        "detections": len(events),
        "detection_kinds": sorted({e.kind for e in events}),
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
    full_policy = {**(policy or {}), "ood": calibrate(x_val)}
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
        env = AgentEnv(model_path, full_policy, Path(tmp))
        try:
            bare = BareTarget(env.runner, env.task)
            victim_test = bare.labels(x_test)
            n_classes = int(max(victim_test.max(), y_test.max()) + 1)
            report["victim_accuracy"] = round(float((victim_test == y_test).mean()), 4)

            def agent_target() -> AgentTarget:
                cid, tok = env.token()
                return AgentTarget(env, cid, tok, cfg.attacker_rate, cfg.max_wait_s)

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
            log("agent: benign clients")
            report["targets"]["agent"]["benign"] = benign(env, x_test, cfg)
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
        f"{'target':<6} {'attack':<16} {'answered':>8} {'refused':>8} {'1st det.':>8} {'by':<10} "
        f"{'sim time':>9}  result"
    )
    lines = [f"victim accuracy {report['victim_accuracy']}", head]
    for target, attacks in report["targets"].items():
        for name, r in attacks.items():
            if name == "benign":
                res = f"{r['detections']} detections over {r['queries_answered']} benign queries"
            elif "agreement_with_victim" in r:
                res = (
                    f"surrogate acc {r['surrogate_accuracy']}, "
                    f"agreement {r['agreement_with_victim']}"
                )
            elif r.get("completed") and name == "hopskipjump":
                res = f"evasion success {r['evasion_success_rate']}, mean L2 {r['mean_l2']}"
            else:
                res = f"stopped: {r.get('stopped')}"
            first = r.get("queries_before_first_detection")
            lines.append(
                f"{target:<6} {name:<16} {r['queries_answered']:>8} "
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
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(func=cmd_redteam)


def cmd_redteam(args: Any) -> int:
    import sys

    from .pack import build_policy

    cfg = RedteamConfig(benign_queries=args.benign_queries, seed=args.seed)
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
