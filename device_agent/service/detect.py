"""Abuse detection on the query stream (NCSC 3.2): out-of-distribution inputs, extraction
patterns, evasion probing and rate anomalies, per client.

Pure code: :class:`Detector` takes arrays, labels and ``now`` and returns :class:`Signal`s; the
service turns them into events. Thresholds come from a calibration made at pack time on the
publisher's validation data (:func:`calibrate`) and sealed in the bundle policy under ``"ood"``.

- **ood**: Mahalanobis distance of the input to the calibration data (shrunk covariance); a
  client is reported when ``ood_count`` of its last ``window`` inputs exceed the sealed threshold.
- **extraction**: PRADA (Juuti et al., 2019): for each query, the distance to the nearest earlier
  query of the same client with the same predicted label; natural data gives a roughly normal
  distribution of these distances, synthetic and noise queries do not. Reported when the
  Shapiro-Wilk W of the client's distances falls below ``prada_w``.
- **probing**: decision-based evasion (HopSkipJump, Boundary) sends many near-duplicates of one
  input; reported when ``probe_count`` of the last ``window`` queries lie closer than the sealed
  ``probe_eps`` (a fraction of the smallest distance between distinct calibration samples) to an
  earlier query. Exact repeats are not probing: applications resend the same input. Nor is a
  *sensor change*: a near-duplicate that got the same label as the input it is near and differs
  from it by a change of the sensor's gain and offset (``v = a*u + b``, a > 0, clipped to the
  sealed value range) explaining at least the sealed ``photometric_fit`` of the squared
  difference (:func:`photometric_share`). A sensor whose gain or brightness drifts resends a
  scene that way; probing's perturbations are random directions (gradient estimation) or steps
  towards another input (bisection), which a gain and an offset explain a small part of, and a
  near pair with different labels is a boundary straddle whatever its shape.
- **rate**: a client that keeps hitting the throttle (``rate_refusals`` refusals in
  ``rate_window`` seconds).
- **linked**: the same probing seen across every client at once, so that splitting an attack
  over several tokens (Sybil accounts) gains nothing. In the spirit of Blacklight (Li et al.,
  2022), one bounded index holds the last ``link_history`` distinct inputs of all clients with
  the client that sent each and the label it got. An input within the sealed ``probe_eps`` of an
  indexed input that got a *different* label is a boundary link: decision-based evasion walks
  the decision boundary and lands on both sides of it, natural traffic (repeats, a drifting
  sensor) does not. ``link_count`` links among the last ``link_window`` distinct inputs of the
  board make an event that names every client that sent a linking input; each is then slowed
  down for ``link_hold`` seconds, whichever token it uses. A client is never named for inputs
  another sent near its own, so no one can get an application slowed by probing around it.

Detection raises the bar; an adaptive attacker who knows these tests can stay under them (a
patient attacker with natural data inside the budget raises none of them: the budget is the
limit there, docs/agent-service.md).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from device_agent.config import DEFAULT_CONFIG, DetectConfig
from device_agent.errors import FormatError, UsageError

CALIBRATION_SCHEMA = "edgeward.ood/1"
# Inputs larger than this are subsampled before distances are taken. Part of the edgeward.ood/1
# format, not a board limit: the sealed calibration vectors have this many entries at most, and
# the packager's calibrate() and the board's detectors must agree on it.
MAX_DIMS = 1024


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Calibration:
    """Sealed OoD and probing thresholds, computed by :func:`calibrate` at pack time.

    ``value_range`` is the range of the validation values (where a sensor clips) and
    ``photometric_fit`` the share of a near-duplicate's squared difference a gain-and-offset
    change must explain for it to count as a sensor change, not probing; both are optional in
    ``edgeward.ood/1`` (a calibration without them takes no near-duplicate for a sensor change).
    ``read_noise`` is the standard deviation of the sensor's read noise that the publisher
    declared (optional, with ``value_range``): a resend of the same scene that differs by no more
    than that noise, after any gain and offset change, is a *re-read* (:meth:`reread`).
    """

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    probe_eps: float
    value_range: tuple[float, float] | None = None
    photometric_fit: float | None = None
    read_noise: float | None = None

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any]) -> Calibration | None:
        raw = policy.get("ood")
        if raw is None:
            return None
        try:
            if raw["schema"] != CALIBRATION_SCHEMA:
                raise FormatError(f"sealed OoD calibration is not {CALIBRATION_SCHEMA}")
            mean = np.asarray(raw["mean"], dtype=np.float64)
            precision = np.asarray(raw["precision"], dtype=np.float64)
            value_range = raw.get("value_range")
            if value_range is not None:
                if not (isinstance(value_range, list) and len(value_range) == 2 and all(map(_is_number, value_range))):
                    raise FormatError("sealed OoD calibration value_range must be two finite numbers, low < high")
                value_range = (float(value_range[0]), float(value_range[1]))
            fit = raw.get("photometric_fit")
            if fit is not None and not _is_number(fit):
                raise FormatError("sealed OoD calibration photometric_fit must be in (0, 1], with a value_range")
            noise = raw.get("read_noise")
            if noise is not None and not _is_number(noise):
                raise FormatError("sealed OoD calibration read_noise must be a number > 0, with a value_range")
            cal = cls(
                mean,
                precision,
                float(raw["threshold"]),
                float(raw["probe_eps"]),
                value_range,
                None if fit is None else float(fit),
                None if noise is None else float(noise),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"sealed OoD calibration is malformed: {e}") from e
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
            raise FormatError("sealed OoD calibration has inconsistent dimensions")
        if cal.value_range is not None and not cal.value_range[0] < cal.value_range[1]:
            raise FormatError("sealed OoD calibration value_range must be two finite numbers, low < high")
        if cal.photometric_fit is not None and (
            cal.value_range is None or not 0 < cal.photometric_fit <= 1
        ):
            raise FormatError("sealed OoD calibration photometric_fit must be in (0, 1], with a value_range")
        if cal.read_noise is not None and (cal.value_range is None or not cal.read_noise > 0):
            raise FormatError("sealed OoD calibration read_noise must be a number > 0, with a value_range")
        return cal

    def score(self, x: np.ndarray) -> float:
        d = x - self.mean
        return math.sqrt(max(0.0, float(d @ self.precision @ d)))

    def sensor_change(self, v: np.ndarray, u: np.ndarray) -> bool:
        """Whether ``v`` differs from ``u`` as a sensor's gain and offset change it (never, when
        the calibration seals no ``photometric_fit``)."""
        if self.photometric_fit is None or self.value_range is None or v.size != u.size:
            return False
        lo, hi = self.value_range
        return photometric_share(v, u, lo, hi) >= self.photometric_fit

    def reread(self, v: np.ndarray, u: np.ndarray) -> bool:
        """Whether ``v`` is ``u`` read again by the sensor: what is left of their difference once a
        change of gain and offset is taken out is no more than two reads' noise of the sealed
        ``read_noise`` would leave (never, when the calibration seals none)."""
        if self.read_noise is None or self.value_range is None or v.size != u.size:
            return False
        rr, m = reread_residual(v, u, *self.value_range)
        return rr <= reread_bound(self.read_noise, m)


# Inputs arrive as 32-bit floats: differences below their rounding (2^-23 relative) are not
# evidence of anything, so each value's residual is reduced by this much (relative to the range).
_ROUNDING = 1e-6


def photometric_share(v: np.ndarray, u: np.ndarray, lo: float, hi: float) -> float:
    """The share of ``|v - u|^2`` that a change of gain and offset explains: ``v = a*u + b``
    with ``a > 0``, fitted on the values neither input has at the edge of the range
    ``[lo, hi]``, each value at an edge standing for any value beyond it (the sensor clipped it).
    1 for a pure gain or offset change, with or without clipping; a random perturbation of
    ``n`` values gets about ``2/n``. At most 1; negative when the fit makes things worse."""
    v = np.asarray(v, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    d = v - u
    dd = float(d @ d)
    if dd == 0.0:
        return 1.0
    fit = _gain_fit(v, u, lo, hi)
    if fit is None:
        return 0.0
    r = _residual(v, u, *fit, lo, hi)
    return 1.0 - float(r @ r) / dd


def _gain_fit(v: np.ndarray, u: np.ndarray, lo: float, hi: float) -> tuple[float, float] | None:
    """Gain ``a`` > 0 and offset ``b`` of ``v = a*u + b`` by least squares on the values neither
    input has at an edge of ``[lo, hi]``; None when too few are left or the gain is not positive."""
    inside = (u > lo) & (u < hi) & (v > lo) & (v < hi)
    if int(inside.sum()) < 3:
        return None  # too little left to fit two parameters and judge them
    ui, vi = u[inside], v[inside]
    du = ui - ui.mean()
    su = float(du @ du)
    if su <= 0.0:
        return None
    a = float(du @ (vi - vi.mean())) / su
    if not a > 0.0:
        return None  # a sensor does not invert its image
    return a, float(vi.mean()) - a * float(ui.mean())


def _residual(v: np.ndarray, u: np.ndarray, a: float, b: float, lo: float, hi: float) -> np.ndarray:
    """What ``v = a*u + b`` leaves unexplained, value by value, a value at an edge standing for
    any value beyond it (the sensor clipped it), less the float32 rounding."""
    u_lo, u_hi = np.where(u <= lo, -np.inf, u), np.where(u >= hi, np.inf, u)
    v_lo, v_hi = np.where(v <= lo, -np.inf, v), np.where(v >= hi, np.inf, v)
    # the distance between the interval v may have come from and the one a*u + b maps u's to
    r = np.maximum(np.maximum(a * u_lo + b - v_hi, v_lo - (a * u_hi + b)), 0.0)
    return np.asarray(np.maximum(r - _ROUNDING * max(1.0, abs(lo), abs(hi)), 0.0))


def reread_residual(v: np.ndarray, u: np.ndarray, lo: float, hi: float) -> tuple[float, int]:
    """The squared difference of ``v`` and ``u`` that a change of gain and offset leaves (no
    change when none fits), and the number of values that can carry read noise at all (those
    not at the same edge of ``[lo, hi]`` in both inputs)."""
    v = np.asarray(v, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    a, b = _gain_fit(v, u, lo, hi) or (1.0, 0.0)
    r = _residual(v, u, a, b, lo, hi)
    m = int(np.count_nonzero(~(((u <= lo) & (v <= lo)) | ((u >= hi) & (v >= hi)))))
    return float(r @ r), m


# One-sided normal quantile of the chance (1e-6) that two reads of one scene are taken for two
# scenes (or for a probe): the Wilson-Hilferty upper bound of a chi-square with m degrees.
_REREAD_Z = 4.753


def reread_bound(sigma: float, m: int) -> float:
    """The most squared difference two reads with independent noise of standard deviation
    ``sigma`` leave on ``m`` values, but for a chance of :data:`_REREAD_Z`'s tail."""
    if m <= 0:
        return 0.0
    k = 2.0 / (9.0 * m)
    return 2.0 * sigma * sigma * m * (1.0 - k + _REREAD_Z * math.sqrt(k)) ** 3


def features(x: np.ndarray) -> np.ndarray:
    """One input row as the flat float64 vector the detectors compare."""
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if v.size > MAX_DIMS:
        v = v[:: math.ceil(v.size / MAX_DIMS)]
    return v


def calibrate(
    x: np.ndarray,
    shrinkage: float = 0.1,
    margin: float = 1.5,
    photometric_fit: float = 0.9,
    read_noise: float | None = None,
) -> dict[str, Any]:
    """Calibration for the sealed policy from validation inputs ``x`` (one row per sample).

    The OoD threshold is ``margin`` times the largest validation score, so in-distribution data
    is essentially never flagged; ``probe_eps`` is a quarter of the 1% quantile of the distance
    from each sample to its nearest distinct neighbour. ``value_range`` is the range of the
    validation values. ``photometric_fit`` is sealed only when random perturbations of the
    validation samples (up to ``probe_eps`` long, :data:`_CHANCE_DRAWS` of them) never reach it:
    with too few input values a gain and an offset explain anything, and no near-duplicate may
    then pass for a sensor change.

    ``read_noise`` is the standard deviation of the sensor's read noise, in input units, as the
    publisher measured it on the sensor (the validation data cannot tell it: they hold distinct
    scenes); it is sealed only when two reads of one scene stay closer than the 1% quantile of
    the distance between distinct validation samples (:func:`reread_bound` over every value), so
    that a re-read can never be taken for a new scene, and refused otherwise.
    """
    rows = np.stack([features(r) for r in np.asarray(x)])
    if rows.shape[0] < 20:
        raise FormatError("OoD calibration needs at least 20 validation samples")
    mean = rows.mean(axis=0)
    cov = np.cov(rows, rowvar=False).reshape(rows.shape[1], rows.shape[1])
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / cov.shape[0] + 1e-6) * np.eye(
        cov.shape[0]
    )
    precision = np.linalg.inv(cov)
    cal = Calibration(mean, precision, 0.0, 0.0)
    scores = np.array([cal.score(r) for r in rows])
    sq = (rows**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    d2[d2 <= 1e-12] = np.inf  # self and exact duplicates
    nearest = np.sqrt(d2.min(axis=1))
    nearest = nearest[np.isfinite(nearest)]
    floor = float(np.quantile(nearest, 0.01))
    probe_eps = round(floor / 4, 6)
    lo, hi = float(rows.min()), float(rows.max())
    out: dict[str, Any] = {
        "schema": CALIBRATION_SCHEMA,
        "samples": int(rows.shape[0]),
        "mean": np.round(mean, 6).tolist(),
        "precision": np.round(precision, 6).tolist(),
        "threshold": round(float(scores.max() * margin), 6),
        "probe_eps": probe_eps,
        "value_range": [lo, hi],
    }
    if lo < hi and probe_eps > 0 and _chance_share(rows, probe_eps, lo, hi) < photometric_fit:
        out["photometric_fit"] = photometric_fit
    if read_noise is not None:
        if not (_is_number(read_noise) and read_noise > 0 and lo < hi):
            raise UsageError("the sensor's read noise must be a number > 0 (a standard deviation in input units)")
        reach = math.sqrt(reread_bound(read_noise, rows.shape[1]))
        if not reach < floor:
            raise UsageError(
                f"a sensor read noise of {read_noise:g} makes two reads of one scene up to {reach:.4g} apart, "
                f"as far as distinct validation samples ({floor:.4g}, their 1% quantile): re-reads cannot be told "
                "from new scenes; measure the sensor's noise again or leave it out"
            )
        out["read_noise"] = float(read_noise)
    return out


_CHANCE_DRAWS = 2000


def _chance_share(rows: np.ndarray, eps: float, lo: float, hi: float) -> float:
    """The largest :func:`photometric_share` of :data:`_CHANCE_DRAWS` random perturbations (a
    uniform direction, a length up to ``eps``, clipped to the range) of validation rows: what a
    gain and an offset explain of a change that is none. Seeded: a calibration is reproducible."""
    rng = np.random.default_rng(0)
    best = -math.inf
    for _ in range(_CHANCE_DRAWS):
        u = rows[int(rng.integers(len(rows)))]
        step = rng.normal(size=u.size)
        step *= rng.uniform(0.05, 1.0) * eps / max(float(np.linalg.norm(step)), 1e-12)
        v = np.clip(u + step, lo, hi)
        if np.any(v != u):
            best = max(best, photometric_share(v, u, lo, hi))
    return best


_SW_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_SW_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


@functools.lru_cache(maxsize=256)
def _normal_scores(n: int) -> np.ndarray:
    nd = NormalDist()
    m = np.array([nd.inv_cdf((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    m.setflags(write=False)
    return m


def shapiro_w(sample: np.ndarray) -> float:
    """Shapiro-Wilk W statistic (Royston 1992 coefficients), numpy only: the board has no scipy."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    n = x.size
    if n < 3:
        raise ValueError("Shapiro-Wilk needs at least 3 values")
    ss = float(((x - x.mean()) ** 2).sum())
    if ss <= 0:
        return 0.0  # all equal: as far from normal as it gets
    m = _normal_scores(n)
    mm = float(m @ m)
    u = 1 / math.sqrt(n)
    a = m / math.sqrt(mm)
    an = np.polyval(_SW_C1[::-1], u) + a[-1]
    if n > 5:
        an1 = np.polyval(_SW_C2[::-1], u) + a[-2]
        phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a = m / math.sqrt(phi)
        a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    else:
        phi = (mm - 2 * m[-1] ** 2) / (1 - 2 * an**2)
        a = m / math.sqrt(phi)
        a[-1], a[0] = an, -an
    return float((a @ x) ** 2 / ss)


@dataclass(frozen=True)
class Signal:
    """One detection to record: kind, client, a score in [0, inf) and summary evidence."""

    kind: str
    client: str
    score: float
    evidence: dict[str, Any]


class _Ring:
    """The last ``capacity`` vectors, for nearest-neighbour distances without re-stacking, each
    with the first read of its scene when it is a re-read of an earlier one (its *anchor*)."""

    __slots__ = ("rows", "count", "next", "anchors")

    def __init__(self, capacity: int, dim: int) -> None:
        self.rows = np.empty((capacity, dim), dtype=np.float32)
        self.count = 0
        self.next = 0
        self.anchors: list[np.ndarray | None] = [None] * capacity  # None: the row is its own

    def anchor(self, slot: int) -> np.ndarray:
        """The first read of the scene the vector in ``slot`` shows (a copy that outlives the slot)."""
        a = self.anchors[slot]
        if a is None:
            a = self.anchors[slot] = self.rows[slot].copy()
        return a

    def nearest(self, v: np.ndarray) -> float:
        return self.nearest_slot(v)[0]

    def nearest_slot(self, v: np.ndarray) -> tuple[float, int]:
        """The distance to the nearest kept vector and its slot (inf and -1 when none)."""
        if self.count == 0 or v.size != self.rows.shape[1]:
            return math.inf, -1
        diff = self.rows[: self.count] - v
        d2 = np.einsum("ij,ij->i", diff, diff)
        j = int(d2.argmin())
        return math.sqrt(float(d2[j])), j

    def within(self, v: np.ndarray, eps: float, most: int) -> tuple[float, np.ndarray]:
        """The distance to the nearest kept vector and the slots (``most`` at most, nearest
        first) of those closer than ``eps``."""
        if self.count == 0 or v.size != self.rows.shape[1]:
            return math.inf, np.empty(0, dtype=np.int64)
        # In slices: the differences of a whole board-wide index would be a copy of it (8 MB at
        # the 1024-dim cap) on every query.
        d2 = np.empty(self.count, dtype=np.float64)
        step = max(1, _SLICE_VALUES // self.rows.shape[1])
        for i in range(0, self.count, step):
            end = min(i + step, self.count)
            diff = self.rows[i:end] - v
            d2[i:end] = np.einsum("ij,ij->i", diff, diff)
        close = np.flatnonzero(d2 < eps * eps)
        if close.size > most:
            close = close[np.argpartition(d2[close], most)[:most]]
        return math.sqrt(float(d2.min())), close[np.argsort(d2[close])]

    def add(self, v: np.ndarray, anchor: np.ndarray | None = None) -> int:
        """Keep ``v`` (a re-read of ``anchor``, or a scene of its own) in place of the oldest;
        returns its slot (-1: wrong size, not kept)."""
        if v.size != self.rows.shape[1]:
            return -1
        slot = self.next
        self.rows[slot] = v
        self.anchors[slot] = anchor
        self.next = (self.next + 1) % self.rows.shape[0]
        self.count = min(self.count + 1, self.rows.shape[0])
        return slot


_SLICE_VALUES = 1 << 16  # floats per slice of a distance pass over a large ring (256 kB)
_LINK_CANDIDATES = 64  # close inputs whose labels are compared per query (bounds the work)


class _Links:
    """The board-wide index of the ``linked`` detector: one ring of every client's distinct
    inputs, who sent each and the label it got, and the boundary links of the last window."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.ring = _Ring(capacity, dim)
        self.owner: list[str] = [""] * capacity
        self.label: list[Any] = [None] * capacity
        self.seen = 0  # distinct inputs indexed so far
        self.links: deque[tuple[int, str, str]] = deque()  # (input number, sender, earlier input's)
        self.last_event = -math.inf
        self.named: frozenset[str] = frozenset()


def _scene(cal: Calibration | None, ring: _Ring, slot: int, v: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """The first read of the scene ``v`` shows when it is within the read noise of the kept
    vector in ``slot`` (the caller has checked they got the same label), else None; and whether
    ``v`` is a re-read: within the noise of that first read too. A walk of small steps, each
    within the noise of the last, keeps the scene of its first step and stops being a re-read
    once it leaves the noise's reach of it; it never starts a scene of its own."""
    if cal is None or cal.read_noise is None or slot < 0 or not cal.reread(v, ring.rows[slot]):
        return None, False
    first = ring.anchor(slot)
    return first, cal.reread(v, first)


@dataclass
class _Client:
    recent: _Ring
    recent_labels: list[Any] = field(default_factory=list)  # the label each slot of recent got
    by_label: dict[Any, _Ring] = field(default_factory=dict)
    distances: deque[float] = field(default_factory=deque)
    ood: deque[bool] = field(default_factory=deque)
    near: deque[bool] = field(default_factory=deque)
    refusals: deque[float] = field(default_factory=deque)
    queries: int = 0
    prada_flag: bool = False
    last_event: dict[str, float] = field(default_factory=dict)


class Detector:
    """Per-client detection state for one service. Not thread-safe: the caller serialises."""

    def __init__(self, calibration: Calibration | None, config: DetectConfig = DEFAULT_CONFIG.serve.detect) -> None:
        self.calibration = calibration
        self.config = config
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._links: _Links | None = None
        # Clients named in a linked event -> boottime until which they count as fully anomalous.
        self._linked: OrderedDict[str, float] = OrderedDict()

    def _client(self, client: str, dim: int) -> _Client:
        c = self._clients.get(client)
        if c is None:
            c = _Client(recent=_Ring(self.config.history, dim), recent_labels=[None] * self.config.history)
            c.distances = deque(maxlen=self.config.prada_window)
            c.ood = deque(maxlen=self.config.window)
            c.near = deque(maxlen=self.config.window)
            self._clients[client] = c
            while len(self._clients) > self.config.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
            if dim and c.recent.rows.shape[1] != dim:
                # first seen through a refusal (no input yet): size its rings now, or its
                # probing and PRADA windows would stay blind to every input it sends
                c.recent = _Ring(self.config.history, dim)
                c.recent_labels = [None] * self.config.history
                c.by_label.clear()
        return c

    def _emit(self, c: _Client, sig: Signal, now: float, out: list[Signal]) -> None:
        last = c.last_event.get(sig.kind)
        if last is None or now - last >= self.config.cooldown:
            c.last_event[sig.kind] = now
            out.append(sig)

    def observe(self, client: str, x: np.ndarray, label: Any, now: float) -> list[Signal]:
        """Account for one answered input row ``x`` (predicted ``label``); returns detections."""
        cfg = self.config
        v = features(x)
        c = self._client(client, v.size)
        c.queries += 1
        out: list[Signal] = []
        self._link(client, v, label, now, out)
        cal = self.calibration
        if cal is not None and v.size == cal.mean.size:
            score = cal.score(v)
            c.ood.append(score > cal.threshold)
            n_ood = sum(c.ood)
            if n_ood >= cfg.ood_count:
                ev = {
                    "ood_in_window": n_ood,
                    "window": len(c.ood),
                    "last_score": round(score, 3),
                    "threshold": round(cal.threshold, 3),
                    "queries": c.queries,
                }
                self._emit(c, Signal("ood", client, round(score / cal.threshold, 3), ev), now, out)
        nearest, slot = c.recent.nearest_slot(v)
        if nearest == 0.0:
            return out  # an exact repeat tells nothing new; it is not kept twice
        eps = cal.probe_eps if cal is not None else 0.0
        near = nearest < eps
        same_label = slot >= 0 and c.recent_labels[slot] == label
        anchor, reread = _scene(cal, c.recent, slot, v) if same_label else (None, False)
        if near and cal is not None and same_label:
            # the same scene through a sensor whose gain or brightness moved, or read again with
            # the sensor's own noise where the client never got two labels: not probing
            near = not (
                cal.sensor_change(v, c.recent.rows[slot])
                or (reread and not self._mixed(c, v, label, eps))
            )
        c.near.append(near)
        n_near = sum(c.near)
        if eps > 0 and n_near >= cfg.probe_count:
            ev = {
                "near_duplicates_in_window": n_near,
                "window": len(c.near),
                "probe_eps": eps,
                "queries": c.queries,
            }
            self._emit(
                c, Signal("probing", client, round(n_near / cfg.probe_count, 3), ev), now, out
            )
        kept = c.recent.add(v, anchor)
        if kept >= 0:
            c.recent_labels[kept] = label
        same = c.by_label.get(label)
        if same is None:
            same = c.by_label[label] = _Ring(cfg.per_label_history, v.size)
        d, j = same.nearest_slot(v)
        if d == 0.0:
            return out
        # A near-duplicate (a resent input a drifting sensor changed slightly) or a re-read of an
        # earlier scene with the sensor's noise is not a new sample: its small distance would
        # skew the normality test on natural traffic. Probing counts near-duplicates.
        anchor, reread = _scene(cal, same, j, v)
        same.add(v, anchor)
        if math.isfinite(d) and d >= eps and not reread:
            c.distances.append(d)
            if len(c.distances) >= cfg.prada_min and c.queries % cfg.prada_every == 0:
                w = shapiro_w(np.fromiter(c.distances, dtype=np.float64))
                c.prada_flag = w < cfg.prada_w
                if c.prada_flag:
                    ev = {
                        "shapiro_w": round(w, 4),
                        "threshold": cfg.prada_w,
                        "distances": len(c.distances),
                        "queries": c.queries,
                    }
                    self._emit(
                        c,
                        Signal("extraction", client, round(cfg.prada_w / max(w, 1e-9), 3), ev),
                        now,
                        out,
                    )
        return out

    @staticmethod
    def _mixed(c: _Client, v: np.ndarray, label: Any, eps: float) -> bool:
        """Whether an input the client sent closer than ``eps`` to ``v`` got another label: the
        client's near-duplicates straddle the decision boundary."""
        _, close = c.recent.within(v, eps, _LINK_CANDIDATES)
        return any(c.recent_labels[int(j)] != label for j in close)

    def _link(self, client: str, v: np.ndarray, label: Any, now: float, out: list[Signal]) -> None:
        """The board-wide view: index ``v`` and look for boundary links across all clients."""
        cal, cfg = self.calibration, self.config
        if cal is None or cal.probe_eps <= 0:
            return
        links = self._links
        if links is None or links.ring.rows.shape[1] != v.size:
            links = self._links = _Links(cfg.link_history, v.size)
        d, close = links.ring.within(v, cal.probe_eps, _LINK_CANDIDATES)
        if d == 0.0:
            return  # an exact repeat, whoever sent it: applications share and resend inputs
        links.seen += 1
        # Bisection lands halfway between two earlier inputs, one on each side of the boundary:
        # look at every close input, not only the nearest.
        other = next((int(j) for j in close if links.label[j] != label), None)
        if other is not None:
            links.links.append((links.seen, client, links.owner[other]))
        slot = links.ring.add(v)
        links.owner[slot], links.label[slot] = client, label
        while links.links and links.links[0][0] <= links.seen - cfg.link_window:
            links.links.popleft()
        if other is None or len(links.links) < cfg.link_count:
            return  # only a query that makes a link can raise the event: it is its sender's
        # Only the senders of linking queries are named: a client is never slowed for what another
        # sent near its inputs (an attacker could otherwise frame an application).
        named = {sender for _, sender, _ in links.links}
        for name in named:
            self._linked[name] = now + cfg.link_hold
            self._linked.move_to_end(name)
        while len(self._linked) > cfg.max_clients:
            self._linked.popitem(last=False)
        if now - links.last_event < cfg.cooldown and named <= links.named:
            return  # nothing new to say: at most one event per cooldown unless a client joins
        links.last_event, links.named = now, frozenset(named)
        ev = {
            "clients": sorted(named)[: cfg.max_clients],
            "clients_involved": len(named),
            "linked_to": len({owner for _, _, owner in links.links} - named),  # others' inputs it probed
            "boundary_links": len(links.links),
            "window": cfg.link_window,
            "probe_eps": cal.probe_eps,
            "distinct_inputs": links.seen,
        }
        out.append(Signal("linked", client, round(len(links.links) / cfg.link_count, 3), ev))

    def refused(self, client: str, now: float) -> list[Signal]:
        """Account for one throttled request; a client that keeps pushing is a rate anomaly."""
        cfg = self.config
        c = self._client(client, 0)
        c.refusals.append(now)
        while c.refusals and c.refusals[0] < now - cfg.rate_window:
            c.refusals.popleft()
        out: list[Signal] = []
        if len(c.refusals) >= cfg.rate_refusals:
            ev = {"refusals": len(c.refusals), "window_s": cfg.rate_window}
            self._emit(
                c,
                Signal("rate", client, round(len(c.refusals) / cfg.rate_refusals, 3), ev),
                now,
                out,
            )
        return out

    def anomaly(self, client: str, now: float | None = None) -> float:
        """The client's anomaly score in [0, 1]; the throttle slows a client down as it rises.
        A client named in a linked event is at 1 until ``link_hold`` seconds after it (at any
        ``now`` when none is given)."""
        until = self._linked.get(client)
        if until is not None and (now is None or now < until):
            return 1.0
        c = self._clients.get(client)
        if c is None:
            return 0.0
        cfg = self.config
        parts = [
            sum(c.ood) / cfg.ood_count,
            sum(c.near) / cfg.probe_count,
            1.0 if c.prada_flag else 0.0,
            1.0 if len(c.refusals) >= cfg.rate_refusals else 0.0,
        ]
        return min(1.0, max(parts))
