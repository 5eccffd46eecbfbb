"""Over-the-air rollouts: one signed ``update`` command per board, stage by stage.

A *release directory* is what ``edgeward pack`` wrote, copied as it is to any static web server
or object store under a base URL: version 1 bundles ``OUT/<device-id>.ewb`` (described by
``OUT/report.json``), or a version 2 shared release (``--layout shared``: ``OUT/payload.ewp`` and
``OUT/envelopes/<device-id>.ewe``, described by the release index ``OUT/release.json``). A board's
update names its file (bundle or envelope) and, for a shared release, the payload, each with its
exact length and SHA-256.
A rollout of it (``edgeward fleet deploy``) lives in the fleet store (``rollouts`` and
``rollout_devices``, migration 4), the one owner of its state; the command ledger holds the
signed commands and the boards' results, as for every command.

* **Order.** Boards are taken in the order of SHA-256(release id, newline, device id): fixed for
  a release (``--resume`` and every monitor agree), different from one release to the next, so
  that no board is always the canary.
* **Stages.** ``--stages 5%,25%,100%`` are cumulative shares of that order: stage k holds the
  boards up to ceil(p_k x n) (at least one board in the first stage).
* **Advancing** (:func:`decide`, pure): a stage is complete once each of its boards has
  answered, or once ``--stage-timeout`` has passed since it began: a board still silent then is
  *pending*, not failed (its command stays queued and it updates when it comes back). The
  rollout halts as soon as ``--max-failures`` boards have refused or failed their update, and
  then signs nothing more. The monitor records each board's answer as results arrive, and
  halts a rollout or marks it done once its last stage's boards answered (:func:`settle`, from
  counts); ``edgeward fleet deploy --resume`` signs the next stage, since signing needs the
  operator key, which the monitor does not hold.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from device_agent.commands.format import https_url, update_args
from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import FormatError, IntegrityError, UsageError
from device_agent.wire import (
    HEX64_RE,
    ID_RE,
    format_time,
    int_field,
    loads_json,
    obj_fields,
    parse_time,
    printable,
    str_field,
)

REPORT = "report.json"
REPORT_SCHEMA = "edgeward.pack-report/1"
INDEX = "release.json"
INDEX_SCHEMA = "edgeward.release-index/1"
MAX_REPORT_BYTES = 64 * 1024**2  # report.json of a pack for 100,000 boards is ~25 MB
BOARD_STATES = ("waiting", "pending", "updated", "failed", "expired", "cancelled")
ROLLOUT_STATES = ("running", "halted", "done")
DEFAULT_STAGES = "5%,25%,100%"
MAX_STAGES = 16


# --- the release directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFile:
    """The file one board fetches: its name in the release directory, length and SHA-256."""

    device_id: str
    name: str
    length: int
    sha256: str


@dataclass(frozen=True)
class Release:
    release_id: str
    model_id: str
    model_version: int
    path: Path
    files: dict[str, ReleaseFile]  # per board: its v1 bundle or its v2 envelope
    payload: ReleaseFile | None = None  # the shared payload of a version 2 release


def _hash_file(path: Path, limit: int) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise UsageError(f"{path} is {st.st_size} bytes, over the bundle limit of {limit}")
        h = hashlib.sha256()
        while chunk := os.read(fd, 1024 * 1024):
            h.update(chunk)
        return st.st_size, h.hexdigest()
    finally:
        os.close(fd)


def _bounded_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise UsageError(f"{path.parent} has no {path.name}: give the directory 'edgeward pack --out' wrote") from e
    if size > MAX_REPORT_BYTES:
        raise UsageError(f"{path} is {size} bytes, over {MAX_REPORT_BYTES}")
    return loads_json(path.read_bytes(), str(path))


def _entry(raw: Any, what: str, name: str) -> ReleaseFile:
    e = obj_fields(raw, what, {"file", "length", "sha256"}, {"file", "length", "sha256"})
    if e["file"] != name:
        raise FormatError(f"{what} is not named {name}")
    return ReleaseFile(what, name, int_field(e["length"], f"{what} length", 1, 2**53),
                       str_field(e["sha256"], f"{what} sha256", HEX64_RE))


def _read_index(d: Path) -> Release:
    """A version 2 shared release: its index, strictly read."""
    doc = _bounded_json(d / INDEX)
    r = obj_fields(doc, "release index", {"schema", "release_id", "model_id", "model_version", "created", "expires",
                                          "end_of_life", "payload", "devices"},
                   {"schema", "release_id", "model_id", "model_version", "payload", "devices"})
    if r["schema"] != INDEX_SCHEMA:
        raise FormatError(f"{d / INDEX} is not an EdgeWard release index ({INDEX_SCHEMA})")
    if not isinstance(r["devices"], dict):
        raise FormatError("the release index's devices must be an object")
    files = {}
    for dev, e in r["devices"].items():
        str_field(dev, "device_id", ID_RE)
        f = _entry(e, f"{dev}'s envelope", f"envelopes/{dev}.ewe")
        files[dev] = ReleaseFile(dev, f.name, f.length, f.sha256)
    payload = _entry(r["payload"], "payload", "payload.ewp")
    return Release(str_field(r["release_id"], "release_id", ID_RE), str_field(r["model_id"], "model_id", ID_RE),
                   int_field(r["model_version"], "model_version", 1, 2**53), d, files, payload)


def _read_report(d: Path) -> Release:
    """Version 1 bundles: the pack report, strictly read."""
    doc = _bounded_json(d / REPORT)
    if not isinstance(doc, dict) or doc.get("schema") != REPORT_SCHEMA:
        raise FormatError(f"{d / REPORT} is not an EdgeWard pack report ({REPORT_SCHEMA})")
    model = obj_fields(doc.get("model"), "report model", {"id", "version", "format", "sha256", "size_bytes",
                                                           "sealed_bytes", "compression"}, {"id", "version"})
    model_id = str_field(model["id"], "model id", ID_RE)
    version = int_field(model["version"], "model version", 1, 2**53)
    bundles = doc.get("bundles")
    if not isinstance(bundles, list) or not bundles:
        raise FormatError(f"{d / REPORT} lists no version 1 bundles (a version 2 single-file layout is for "
                          "installing by hand; roll out --layout shared or the default layout)")
    files: dict[str, ReleaseFile] = {}
    for b in bundles:
        r = obj_fields(b, "report bundle", {"device_id", "device_key", "bundle_id", "file", "size", "sha256"},
                       {"device_id", "file", "size", "sha256"})
        dev = str_field(r["device_id"], "device_id", ID_RE)
        if r["file"] != f"{dev}.ewb":
            raise FormatError(f"{d / REPORT}: {dev}'s bundle is not named {dev}.ewb")
        files[dev] = ReleaseFile(dev, r["file"], int_field(r["size"], "size", 1, 2**53),
                                 str_field(r["sha256"], "sha256", HEX64_RE))
    return Release(f"{model_id}-v{version}", model_id, version, d, files)


def read_release(path: str | Path, release_id: str | None = None) -> Release:
    """The release ``edgeward pack`` wrote in ``path``: the release index of a shared layout, or
    the pack report of version 1 bundles, bounded and strictly read. Each board's file is checked
    against it when the rollout signs for it (:func:`file_for`)."""
    d = Path(path)
    try:
        rel = _read_index(d) if (d / INDEX).exists() else _read_report(d)
    except FormatError as e:
        raise UsageError(f"{d} is not a release directory: {e}") from e
    if release_id is not None:
        if rel.payload is not None and release_id != rel.release_id:
            raise UsageError(f"--release {release_id}: a shared release is named by its index ({rel.release_id})")
        if not ID_RE.fullmatch(release_id):
            raise UsageError(f"release id {release_id!r} must be letters, digits, '.', '_' or '-' (at most 64)")
        rel = Release(release_id, rel.model_id, rel.model_version, d, rel.files, rel.payload)
    return rel


def check_payload(release: Release) -> None:
    """The shared payload is the file the index describes (hashed once per deploy)."""
    if release.payload is not None:
        _check(release, release.payload)


def _check(release: Release, f: ReleaseFile) -> None:
    size, digest = _hash_file(release.path / f.name, DEFAULT_CONFIG.bundle.max_bundle_bytes)
    if size != f.length or digest != f.sha256:
        raise IntegrityError(f"{release.path / f.name} is not the file the release describes (its length or "
                             "SHA-256 changed after the pack): nothing was signed; pack the release again")


def file_for(release: Release, device_id: str) -> ReleaseFile:
    """The board's file in the release, hashed now: it must be what the release describes."""
    f = release.files.get(device_id)
    if f is None:
        raise UsageError(f"{device_id} is not in release {release.release_id}: pack it for that board, or leave "
                         "the board out")
    _check(release, f)
    return f


def base_url(text: str) -> str:
    """``--base-url``: an https:// directory address, ending in one '/'."""
    url = text.rstrip("/") + "/"
    try:
        https_url(url + "x.ewb", "--base-url")
    except FormatError as e:
        raise UsageError(str(e)) from e
    return url


# --- order and stages (pure) -----------------------------------------------------------------------


def order(release_id: str, devices: Iterable[str]) -> list[str]:
    """The stated order of a rollout: by SHA-256 of the release id, a newline and the device id."""
    return sorted(set(devices), key=lambda d: (hashlib.sha256(f"{release_id}\n{d}".encode()).hexdigest(), d))


def parse_stages(text: str) -> list[int]:
    """``5%,25%,100%``: increasing percentages ending at 100."""
    out: list[int] = []
    for part in text.split(","):
        p = part.strip().removesuffix("%")
        if not p.isdigit() or not 0 < int(p) <= 100 or (out and int(p) <= out[-1]):
            raise UsageError(f"--stages {text!r} must be increasing percentages up to 100%, e.g. {DEFAULT_STAGES}")
        out.append(int(p))
    if not out or out[-1] != 100 or len(out) > MAX_STAGES:
        raise UsageError(f"--stages {text!r} must end at 100% and have at most {MAX_STAGES} stages")
    return out


def stage_of(n: int, stages: list[int]) -> list[int]:
    """The stage (0-based) of each of ``n`` boards in rollout order."""
    cuts = [max(1, math.ceil(p * n / 100)) for p in stages]
    return [next(k for k, c in enumerate(cuts) if i < c) for i in range(n)]


@dataclass(frozen=True)
class Step:
    """Where a rollout stands after :func:`decide`, and the boards to sign an update for now."""

    state: str
    stage: int
    stage_started: datetime
    issue: tuple[str, ...]
    detail: str


def counts_of(boards: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(1 for b in boards if b["state"] == s) for s in BOARD_STATES}


def stage_counts_of(boards: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """The boards counted by stage (0-based) and state: what :func:`advance` decides from."""
    out: dict[int, dict[str, int]] = {}
    for b in boards:
        by_state = out.setdefault(int(b["stage"]), {})
        by_state[b["state"]] = by_state.get(b["state"], 0) + 1
    return out


def summary(boards: list[dict[str, Any]] | dict[str, int]) -> str:
    c = boards if isinstance(boards, dict) else counts_of(boards)
    return ", ".join(f"{c[s]} {s}" for s in BOARD_STATES if c.get(s)) or "no boards"


def done_detail(boards: list[dict[str, Any]] | dict[str, int]) -> str:
    """What a finished rollout says after its state ("done, every stage complete: 3 updated")."""
    c = boards if isinstance(boards, dict) else counts_of(boards)
    return f"every stage complete: {summary(c)}" + (
        "; pending boards update when they come back" if c.get("pending") else "")


def halted_detail(stage: int, failures: int, max_failures: Any, failed: list[str]) -> str:
    """What a halted rollout says after its state; ``failures`` is every failed board so far."""
    return (f"stopped at stage {stage + 1}: {failures} board(s) failed (--max-failures {max_failures}), nothing "
            f"more is signed: {', '.join(failed[:10])}" + (" ..." if failures > len(failed[:10]) else ""))


def advance(rollout: dict[str, Any], by_stage: dict[int, dict[str, int]], failed: list[str],
            now: datetime) -> Step:
    """Where a rollout stands at ``now`` from its stored state and its boards counted by stage and
    state (``failed``: its first failed boards in order): the stage whose waiting boards are to be
    signed, or halted, or done. Pure; the monitor calls it with the store's counts (it cannot sign,
    so it records only done, halted and the detail), :func:`decide` with every board."""
    stage = int(rollout["stage"])
    started = parse_time(rollout["stage_started"], "stage_started")
    if rollout["state"] != "running":
        return Step(rollout["state"], stage, started, (), rollout["detail"])
    last = len(rollout["stages"]) - 1
    totals = {s: sum(c.get(s, 0) for c in by_stage.values()) for s in BOARD_STATES}
    if totals["failed"] >= int(rollout["max_failures"]):
        return Step("halted", stage, started, (), halted_detail(stage, totals["failed"], rollout["max_failures"],
                                                                failed))
    timeout = timedelta(seconds=int(rollout["stage_timeout_s"]))
    while True:
        current = {s: sum(c.get(s, 0) for k, c in by_stage.items() if k <= stage) for s in BOARD_STATES}
        label = f"stage {stage + 1}/{last + 1} ({rollout['stages'][stage]}%)"
        if current["waiting"]:
            return Step("running", stage, started, (), f"{label}: {current['waiting']} update(s) to sign")
        # Boards of earlier stages still silent were counted pending when their stage timed out.
        silent = by_stage.get(stage, {}).get("pending", 0)
        if silent and now < started + timeout:
            return Step("running", stage, started, (), f"{label}: waiting for {silent} board(s) until "
                        f"{format_time(started + timeout)}; {summary(current)}")
        if stage == last:
            return Step("done", stage, started, (), done_detail(totals))
        stage, started = stage + 1, now


def decide(rollout: dict[str, Any], boards: list[dict[str, Any]], now: datetime) -> Step:
    """The next step of a rollout from its stored state and its boards' states, at ``now``: as
    :func:`advance`, with the boards to sign an update for now."""
    failed = [b["device_id"] for b in boards if b["state"] == "failed"]
    step = advance(rollout, stage_counts_of(boards), failed, now)
    if step.state != "running" or rollout["state"] != "running":
        return step
    issue = tuple(b["device_id"] for b in boards if b["stage"] <= step.stage and b["state"] == "waiting")
    return Step(step.state, step.stage, step.stage_started, issue, step.detail)


def settle(rollout: dict[str, Any], by_stage: dict[int, dict[str, int]], failed: list[str],
           now: datetime) -> tuple[str, str]:
    """What the monitor records for a rollout after a board answered: its state (running, halted or
    done) and a detail true at ``now``. A stage that is complete with a next one to sign stays
    recorded as it is (its successor starts when ``fleet deploy --resume`` signs it)."""
    step = advance(rollout, by_stage, failed, now)
    if rollout["state"] == "halted":  # later answers of commands already out: the count follows them
        total = sum(c.get("failed", 0) for c in by_stage.values())
        return "halted", halted_detail(int(rollout["stage"]), total, rollout["max_failures"], failed)
    if rollout["state"] == "done":  # a pending board came back: the summary follows it
        return "done", done_detail({s: sum(c.get(s, 0) for c in by_stage.values()) for s in BOARD_STATES})
    if step.state == "running" and step.stage != int(rollout["stage"]):
        stages = len(rollout["stages"])
        return "running", (f"stage {int(rollout['stage']) + 1}/{stages} complete: run 'edgeward fleet deploy "
                           f"RELEASE_DIR --resume' to sign stage {step.stage + 1}/{stages}; {step.detail}")
    return step.state, step.detail


# --- carrying a rollout out ------------------------------------------------------------------------


def sync(store: Any, ledger: Any, now: datetime, device_id: str | None = None) -> list[str]:
    """Record in the rollouts what boards answered to their update commands (the ledger holds
    the verified results), and halt a rollout that reached its failure limit; returns the
    releases that moved. The monitor calls this for one board as its result arrives (a few
    indexed queries, whatever the fleet's size); ``--resume`` and ``import-result`` for all."""
    moved: list[str] = []
    for b in store.rollout_open(device_id):
        c = ledger.command(b["device_id"], int(b["seq"]))
        if c is None or c["sha256"] != b["command_sha256"]:
            continue
        state = {"applied": "updated", "refused": "failed", "expired": "expired",
                 "cancelled": "cancelled"}.get(c["state"])
        if state is not None and state != b["state"] and store.rollout_answered(
            b["release_id"], b["device_id"], int(b["seq"]), state, c.get("detail") or "", now
        ) and b["release_id"] not in moved:
            moved.append(b["release_id"])
    for release_id in moved:
        [r] = store.rollouts(release_id)
        by_stage, failed = store.rollout_stage_counts(release_id)
        state, detail = settle(r, by_stage, failed, now)
        if (state, detail) != (r["state"], r["detail"]):
            stage = len(r["stages"]) - 1 if state == "done" else int(r["stage"])
            store.rollout_moved(release_id, state, stage, r["stage_started"], detail, now)
    return moved


def new_rollout(release: Release, devices: list[str], base: str, stages: list[int], max_failures: int,
                stage_timeout: timedelta, now: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rows of a new rollout: every board in order with its stage and its file."""
    ordered = order(release.release_id, devices)
    stage = stage_of(len(ordered), stages)
    t = format_time(now)
    rollout = {"release_id": release.release_id, "model_id": release.model_id,
               "model_version": release.model_version, "base_url": base, "stages": stages,
               "max_failures": max_failures, "stage_timeout_s": int(stage_timeout.total_seconds()), "created": t,
               "state": "running", "stage": 0, "stage_started": t, "updated": t, "detail": "",
               "payload_url": None, "payload_length": None, "payload_sha256": None}
    if release.payload is not None:
        rollout |= {"payload_url": base + quote(release.payload.name), "payload_length": release.payload.length,
                    "payload_sha256": release.payload.sha256}
    boards = []
    for i, d in enumerate(ordered):
        f = release.files[d]
        boards.append({"device_id": d, "position": i + 1, "stage": stage[i], "url": base + quote(f.name),
                       "length": f.length, "sha256": f.sha256, "state": "waiting", "seq": None})
    return rollout, boards


def orders_for(release: Release | None, rollout: dict[str, Any], issue: Iterable[str],
               boards: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The update arguments of each board to sign now; each file is hashed again when the
    release directory is at hand (it must still be what was recorded)."""
    by_id = {b["device_id"]: b for b in boards}
    out = []
    for d in issue:
        b = by_id[d]
        if release is not None:
            f = file_for(release, d)
            if f.sha256 != b["sha256"] or f.length != b["length"]:
                raise IntegrityError(f"{d}'s file in {release.path} changed since the rollout began: nothing was "
                                     "signed; a release is immutable: pack a new one under a new release id")
        args: dict[str, Any] = {"release_id": rollout["release_id"], "model_id": rollout["model_id"],
                                "model_version": int(rollout["model_version"]),
                                "bundle": {"url": b["url"], "length": int(b["length"]), "sha256": b["sha256"]}}
        if rollout.get("payload_url"):
            args["payload"] = {"url": rollout["payload_url"], "length": int(rollout["payload_length"]),
                               "sha256": rollout["payload_sha256"]}
        out.append((d, update_args(args, DEFAULT_CONFIG.commands)))
    return out


def view(store: Any) -> list[dict[str, Any]]:
    """Every rollout with its boards, for ``fleet status`` and ``fleet deploy --json``."""
    out = []
    for r in store.rollouts():
        boards = store.rollout_devices(r["release_id"])
        out.append(r | {"summary": summary(boards), "devices": [
            {k: b[k] for k in ("device_id", "position", "stage", "state", "seq", "issued", "updated", "detail")}
            | {"stage": int(b["stage"]) + 1} for b in boards]})
    return out


TEXT_BOARDS = 50  # boards listed per rollout in text; --json lists every one


def text_view(rollouts: list[dict[str, Any]]) -> list[str]:
    """``fleet status``'s lines for the rollouts; every line is passed through :func:`printable`
    (a board's result detail is whatever the board wrote: it must not rewrite the lines above it)."""
    lines = []
    for r in rollouts:
        lines.append(f"rollout {r['release_id']} ({r['model_id']} v{r['model_version']}): {r['state']}, stage "
                     f"{int(r['stage']) + 1}/{len(r['stages'])} of {','.join(f'{p}%' for p in r['stages'])}; "
                     + (r["detail"] if r["state"] == "done" and r["detail"]  # its detail carries the summary
                        else f"{r['summary']}" + (f" -- {r['detail']}" if r["detail"] else "")))
        # Those that need a look first (failed, pending, expired...), then the rest, in order.
        shown = sorted(r["devices"], key=lambda b: (b["state"] in ("updated", "waiting"), b["position"]))
        for b in shown[:TEXT_BOARDS]:
            lines.append(f"  {b['position']:>4} {b['device_id']:<24} stage {b['stage']}  {b['state']:<9}"
                         + (f" #{b['seq']}" if b["seq"] is not None else "")
                         + (f"  {printable(b['detail'])[:100]}" if b["detail"] else ""))
        if len(shown) > TEXT_BOARDS:
            lines.append(f"  ... and {len(shown) - TEXT_BOARDS} more boards ('fleet status --json' lists every one)")
    return [printable(line) for line in lines]
