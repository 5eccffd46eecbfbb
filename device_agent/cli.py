"""``edgeward-agent``: the board's command line. Exit codes: 0 ok, 1 refused for security,
2 usage, 3 malformed input, 4 environment, 70 internal error (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agent.cliutil import Parser, add_version, emit, run
from device_agent.config import DEFAULT_LIMITS
from device_agent.errors import FormatError, UsageError
from device_agent.service import cli as service_cli
from device_agent.telemetry.service import register_cli as register_telemetry

PROG = "edgeward-agent"


def _pubkey(path: str) -> bytes:
    from device_agent.bundle.keyfiles import load_public_key_file

    return load_public_key_file(Path(path))


def _read_file(path: str, limit: int, what: str) -> bytes:
    """A whole input or command file, bounded before it is read; a FIFO or device is refused at
    once rather than waited on."""
    from device_agent.store.fsutil import read_bounded

    p = Path(path)
    try:
        if p.is_dir():
            raise UsageError(f"{what} {path} is a directory, not a file")
        return read_bounded(p, limit)
    except FileNotFoundError as e:
        raise UsageError(f"{what} {path} does not exist") from e
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from e


def _decommissioned(data_dir: str) -> dict[str, Any] | None:
    """The attestation of a wiped board, if this data dir is one (public, not verified here)."""
    from device_agent.store.wipe import attestation

    if (Path(data_dir) / "device.json").exists():
        return None
    return attestation(Path(data_dir))


def _wiped_how(doc: dict[str, Any]) -> str:
    by = doc["body"].get("by") or {}
    if "command_seq" in by:
        return f"by command #{by['command_seq']} from operator {str(by.get('operator'))[:19]}"
    return "at the board"


def _agent(args: argparse.Namespace) -> Any:
    from device_agent.agent import Agent
    from device_agent.errors import SecurityRefusal
    from device_agent.store.keys import KeySource

    doc = _decommissioned(args.data_dir)
    if doc is not None:
        raise SecurityRefusal(
            f"this board was wiped {_wiped_how(doc)} at {doc.get('completed')}; it serves nothing. "
            "Provision it again to reuse it"
        )
    return Agent(args.data_dir, KeySource.from_env(getattr(args, "kek_file", None)))


def cmd_provision(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent
    from device_agent.store.fsutil import atomic_write
    from device_agent.store.keys import KeySource

    publishers = [_pubkey(p) for p in args.publisher_pub]
    operators = [_pubkey(p) for p in args.operator_pub or []]
    recovery = [_pubkey(p) for p in args.recovery_pub or []]
    receipts = [_pubkey(p) for p in args.receipt_pub or []]
    export = Path(args.export)
    if not export.parent.is_dir():
        raise UsageError(f"cannot write the enrolment: directory {export.parent} does not exist")
    enrolment = Agent.provision(
        args.data_dir, args.device_id, publishers, operators, KeySource.from_env(args.kek_file), recovery=recovery,
        receipts=receipts,
    )
    atomic_write(export, enrolment, 0o644)
    doc = json.loads(enrolment)
    emit(
        args,
        doc,
        lambda d: f"provisioned {d['device_id']} in {args.data_dir}\n"
        f"  encryption key {d['box_fingerprint']}\n  identity key   {d['sign_fingerprint']}\n"
        f"enrolment written to {export} (give it to the publisher: edgeward pack --device {export})",
    )
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from device_agent.wire import format_time

    agent = _agent(args)
    if args.payload:
        m = agent.install_release(Path(args.bundle), Path(args.payload))
    else:
        m = agent.install_file(Path(args.bundle))
    doc = {
        "installed": True,
        "model_id": m.model_id,
        "model_version": m.model_version,
        "bundle_id": m.bundle_id,
        "expires": format_time(m.expires) if m.expires else None,
        "end_of_life": format_time(m.end_of_life) if m.end_of_life else None,
    }
    emit(args, doc, lambda d: f"installed {d['model_id']} version {d['model_version']} (bundle {d['bundle_id']})")
    return 0


def _load_inputs(path: str) -> Any:
    from device_agent.runtime.arrays import load_arrays

    raw = _read_file(path, DEFAULT_LIMITS.max_input_bytes, "input")
    try:
        return load_arrays(raw, DEFAULT_LIMITS)
    except FormatError as e:
        raise FormatError(f"input {path} is not a readable .npy/.npz array file (pickles are refused): {e}") from e


def cmd_predict(args: argparse.Namespace) -> int:
    result = _agent(args).predict(_load_inputs(args.input), role=args.role, model_id=args.model)
    # Always JSON: one line by default (scripts compare it), indented with --json like every command.
    emit(args, result, lambda d: json.dumps(d, sort_keys=True))
    return 0


def _status_table(doc: dict[str, Any]) -> str:
    lines = [
        f"device     {doc['device_id']}",
        f"enc key    {doc['box_fingerprint']}",
        f"board time {doc['now']}",
        f"clock floor {doc['clock_floor'] or '-'}  (signed times only: bundles, commands, the fleet's beacon)",
    ]
    receipt_keys = doc.get("receipt_keys") or []
    lines += [f"receipt key {k}  (its receipts clear the telemetry outbox)" for k in receipt_keys] or [
        "receipt key none: reports leave the outbox on the broker's acknowledgement "
        "(provision --receipt-pub, or fleet rotate-key --role receipt)"
    ]
    retired = doc.get("retired", {})
    lines += [f"retired    {m} ({r['by']}, {r['at']}): never installed again" for m, r in retired.items()]
    lines.append("")
    if not doc["models"]:
        lines.append("no model installed")
        return "\n".join(lines)
    cols = ("model_id", "version", "local_version", "previous_version", "runtime", "profile", "end_of_life", "serving")
    heads = ("MODEL", "VERSION", "LOCAL", "PREVIOUS", "RUNTIME", "PROFILE", "END OF LIFE", "SERVING")
    rows = [[str(m.get(c) if m.get(c) is not None else "-") for c in cols] for m in doc["models"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    wiped = _decommissioned(args.data_dir)
    if wiped is not None:
        body = wiped["body"]
        doc = {
            "device_id": body.get("device_id"),
            "wiped": True,
            "completed": wiped.get("completed"),
            "by": body.get("by") or {},
            "signed": bool(wiped.get("signature")),
            "bundles_destroyed": body.get("bundles_destroyed", []),
        }
        emit(args, doc, lambda d: f"device {d['device_id']}: wiped {_wiped_how(wiped)}, completed {d['completed']}; "
             f"{len(d['bundles_destroyed'])} bundle(s) destroyed; attestation "
             f"{'signed' if d['signed'] else 'UNSIGNED'} in {Path(args.data_dir) / 'wipe-attestation.json'}")
        return 0
    # The state is sealed with the board's keys: status checks it, so it needs them too.
    doc = _agent(args).status()
    emit(args, doc, _status_table)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.local is not None:
        from device_agent.learning.cycle import Learning

        agent = _agent(args)
        to = None if args.local == "previous" else _local_number(args.local)
        doc = Learning(agent).rollback(agent.model(args.model).manifest, to)
        emit(args, doc, lambda d: f"rolled back: {d['model_id']} now serves "
             + (f"local version {d['local_version']}" if d["local_version"] else "the publisher's head"))
        return 0
    m = _agent(args).rollback(args.model)
    doc = {"model_id": m.model_id, "model_version": m.model_version, "bundle_id": m.bundle_id}
    emit(args, doc, lambda d: f"rolled back: {d['model_id']} now serves version {d['model_version']}")
    return 0


def _local_number(text: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise UsageError("--local takes a local version number (0: the publisher's head) or 'previous'")
    return int(text)


def cmd_feedback(args: argparse.Namespace) -> int:
    from device_agent.learning.cycle import Learning, local_source, now_utc

    agent = _agent(args)
    learning = Learning(agent)
    loaded = agent.model(args.model)
    if args.input:
        arrays = _load_inputs(args.input)
        if not isinstance(arrays, dict) or "x" not in arrays or "y" not in arrays or len(arrays) != 2:
            raise FormatError(f"feedback {args.input} must be an .npz with exactly two arrays, x and y")
        from device_agent.agent import model_feeds

        feeds, _ = model_feeds(loaded, arrays["x"], "admin", agent.limits)
        rows = next(iter(feeds.values()))
        doc = learning.intake(loaded, rows, arrays["y"], local_source(args.source), now_utc())
        emit(args, doc, lambda d: f"kept {d['kept']} of {d['received']} example(s) from {local_source(args.source)}"
             + (f"; refused: {d['refused']}" if d["refused"] else "") + f"; {d['held_total']} held on the board")
    elif args.accept or args.drop:
        doc = learning.review(loaded, args.accept or [], args.drop or [])
        emit(args, doc, lambda d: f"accepted {d['accepted']}, dropped {d['dropped']}; {d['held_total']} held")
    elif args.delete_source:
        doc = learning.delete_source(loaded, args.delete_source)
        emit(args, doc, lambda d: f"deleted {d['deleted']} example(s) from {d['source']}")
    else:
        docs = learning.held(loaded, None if args.all else "held")
        emit(args, docs, lambda ds: "\n".join(
            f"{d['id']}  {d['source']:<24} label {d['label']:<4} {d['status']:<9} {d['reason']}" for d in ds)
            or "nothing held for review")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from device_agent.learning.cycle import Learning, now_utc

    agent = _agent(args)
    if args.status:
        doc = Learning(agent).status(agent.model(args.model))
    else:
        doc = Learning(agent).cycle(now_utc(), args.model)
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def cmd_wipe(args: argparse.Namespace) -> int:
    from device_agent.store.datadir import DataDir
    from device_agent.store.wipe import wipe_pending

    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("wipe destroys this board's keys and models for good; pass --yes to confirm")
        if input(f"Destroy every key and model in {args.data_dir}? Type 'wipe': ").strip() != "wipe":
            raise UsageError("not confirmed; nothing was changed")
    if wipe_pending(DataDir(args.data_dir).path):
        from device_agent.store.datadir import utcnow
        from device_agent.store.wipe import complete

        doc = complete(DataDir(args.data_dir), utcnow())
    else:
        doc = _agent(args).wipe(allow_unsigned=args.unsigned)
    emit(
        args,
        doc,
        lambda d: f"wiped {d['body']['device_id']}: {len(d['body']['bundles_destroyed'])} bundle(s) destroyed, "
        f"keys shredded; attestation in {Path(args.data_dir) / 'wipe-attestation.json'}"
        + ("" if d["signature"] else " (unsigned: the keys could not be unlocked)"),
    )
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from device_agent.commands.format import encode_queue, verify_result
    from device_agent.service.cli import update_settings
    from device_agent.store.fsutil import atomic_write

    agent = _agent(args)
    agent.config = replace(agent.config, commands=update_settings(args))
    limits = agent.config.commands
    payload = _read_file(args.file, limits.max_queue_bytes, "command file")
    result_path = Path(args.result)
    if not result_path.parent.is_dir():
        raise UsageError(f"cannot write the result: directory {result_path.parent} does not exist")
    sign_public = agent.store.identity().sign_public
    results = agent.apply_commands(payload)
    if results:
        atomic_write(result_path, results[0] if len(results) == 1 else encode_queue(results, limits), 0o644)
    docs = [verify_result(r, sign_public, limits).body() for r in results]
    emit(args, docs, lambda ds: "\n".join(
        f"#{d['seq']} {d['kind']}: {d['outcome']}: {d['detail']}" for d in ds
    ) + (f"\nsigned result written to {result_path}" if ds else "nothing new to obey (already applied)"))
    return 0 if all(d["outcome"] != "refused" for d in docs) else 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="EdgeWard board agent: provision the board, install signed bundles, predict.",
        epilog="Device keys are unlocked with EDGEWARD_DEVICE_PASSPHRASE or EDGEWARD_DEVICE_KEK_FILE.",
    )
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--data-dir", required=True, help="the board's data directory")
        sp.add_argument("--kek-file", help="32-byte key-encryption key file (instead of a passphrase)")
        sp.set_defaults(func=fn)
        return sp

    sp = add("provision", "create this board's keys and trust anchors; export its enrolment", cmd_provision)
    sp.add_argument("--device-id", required=True)
    sp.add_argument("--publisher-pub", required=True, action="append", help="publisher public key (repeatable)")
    sp.add_argument("--operator-pub", action="append", help="operator public key: signs commands (repeatable)")
    sp.add_argument(
        "--recovery-pub",
        action="append",
        help="recovery public key, kept offline: only it may rotate the operator keys (repeatable)",
    )
    sp.add_argument(
        "--receipt-pub",
        action="append",
        help="the fleet monitors' receipt public key: reports stay in the outbox until a receipt signed by it "
        "covers them (repeatable; without it reports leave on the broker's acknowledgement)",
    )
    sp.add_argument("--export", required=True, help="where to write the public enrolment JSON")
    sp.add_argument("--json", action="store_true")

    sp = add("install", "verify a bundle and install it (the previous version is kept)", cmd_install)
    sp.add_argument("bundle", help="a bundle (.ewb: version 1, or a version 2 single file), or with --payload "
                    "this board's envelope (.ewe)")
    sp.add_argument("--payload", help="the release's shared payload (payload.ewp) the envelope opens")
    sp.add_argument("--json", action="store_true", help="print what was installed as JSON (installed, model_id, "
                    "model_version, bundle_id -- a version 2 release's id --, expires, end_of_life)")

    sp = add("predict", "run the installed model on an .npy/.npz input; prints JSON", cmd_predict)
    sp.add_argument("--input", required=True, help="input array (.npy) or arrays (.npz)")
    sp.add_argument("--role", default="user", choices=["user", "engineer", "admin"])
    sp.add_argument("--model", help="model id, when several are installed")
    sp.add_argument("--json", action="store_true", help="indented JSON (the output is JSON either way)")

    sp = add(
        "status",
        "show the board's identity and installed models (needs the device keys: the state it reads is "
        "sealed with them)",
        cmd_status,
    )
    sp.add_argument("--json", action="store_true")

    sp = add("rollback", "serve the previous installed version again (or, with --local, an earlier local version)",
             cmd_rollback)
    sp.add_argument("--model")
    sp.add_argument("--local", metavar="N|previous", help="roll back the learnt head instead: to local version N "
                    "(0: the publisher's head) or 'previous'")
    sp.add_argument("--json", action="store_true")

    sp = add("wipe", "crypto-shred this board's keys and models (end of life); writes a signed attestation", cmd_wipe)
    sp.add_argument("--yes", action="store_true", help="confirm without a prompt (scripts, CI)")
    sp.add_argument(
        "--unsigned",
        action="store_true",
        help="wipe even when the device keys cannot be unlocked; the attestation is then unsigned",
    )
    sp.add_argument("--json", action="store_true")
    sp = add(
        "command",
        "obey signed fleet commands from a file (boards without a network); writes the signed result",
        cmd_command,
    )
    sp.add_argument("file", help="a command or command queue file ('edgeward fleet ... --out FILE')")
    sp.add_argument("--result", required=True, help="where to write the signed result(s), to bring back to "
                    "'edgeward fleet import-result'")
    sp.add_argument("--json", action="store_true")
    from device_agent.service.cli import add_update_arguments

    add_update_arguments(sp)
    sp = add(
        "feedback",
        "local learning feedback: keep labelled examples (--input X.npz with x and y), list what is held for review, "
        "accept or drop held examples, delete everything one source sent",
        cmd_feedback,
    )
    sp.add_argument("--input", help=".npz with x (inputs, as the application sends them) and y (class indices)")
    sp.add_argument("--source", default="operator", help="the local operator's name (the source: local:NAME)")
    sp.add_argument("--accept", action="append", metavar="ID", help="learn a held example (repeatable)")
    sp.add_argument("--drop", action="append", metavar="ID", help="delete a held example (repeatable)")
    sp.add_argument("--delete-source", metavar="SOURCE", help="delete every example one source sent "
                    "(token:ID or local:NAME)")
    sp.add_argument("--all", action="store_true", help="list every example held, not only those held for review")
    sp.add_argument("--model")
    sp.add_argument("--json", action="store_true")
    sp = add("learn", "run one local learning cycle (filters, refit, gate); prints JSON", cmd_learn)
    sp.add_argument("--status", action="store_true", help="show the local versions and the update log instead")
    sp.add_argument("--model")
    service_cli.register(sub)
    register_telemetry(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv, PROG, before=_finish_interrupted_wipe)


def _finish_interrupted_wipe(args: argparse.Namespace) -> None:
    """Invariant 4: a wipe cut off by a power cut completes before any command runs."""
    from device_agent.store.datadir import DataDir, utcnow
    from device_agent.store.wipe import complete, wipe_pending

    data_dir = getattr(args, "data_dir", None)
    if data_dir and wipe_pending(Path(data_dir)):
        complete(DataDir(data_dir), utcnow())


if __name__ == "__main__":
    sys.exit(main())
