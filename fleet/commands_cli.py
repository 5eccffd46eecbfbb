"""``edgeward fleet decommission | retire | rollback | rotate-key | cancel | publish | time |
import-result | verify-attestation | commands``: the operator's signed commands (docs/commands.md).

Every command that signs takes ``--operator-key`` (``--recovery-key`` to rotate the operator keys),
``--expires-in``, ``--dry-run`` (print what would be signed; sign, record and publish nothing) and
either ``--out PATH`` (write the board's queue to a file for a technician) or ``--broker`` with the
operator's TLS files (publish each board's whole pending queue, retained, QoS 1, and wait for the
broker's acknowledgement). Exit codes: 0 done, 1 refused for security, 2 usage, 3 malformed input,
4 broker unreachable or not acknowledging.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent import crypto
from device_agent.commands.format import TIME_TOPIC, Command
from device_agent.config import DEFAULT_CONFIG
from device_agent.errors import EdgeWardError, FormatError, SecurityRefusal, UsageError
from device_agent.store.datadir import utcnow
from device_agent.store.fsutil import atomic_write
from device_agent.telemetry.report import command_topic
from device_agent.wire import ID_RE, format_time, loads_json, printable

from .ca import FleetHome
from .commands import (
    DEFAULT_EXPIRES_IN,
    STATES,
    CommandLedger,
    Issued,
    beacon,
    parse_age,
    read_group,
    result_device,
    split_results,
    verify_wipe_attestation,
)
from .rollout import DEFAULT_STAGES

if TYPE_CHECKING:
    from packager.signers import Signer

LIMITS = DEFAULT_CONFIG.commands
QUEUE_SUFFIX = ".commands"  # a board's queue file written with --out DIR


# --- shared pieces --------------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> FleetHome:
    from .cli import _home as home

    return home(args)


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    from .cli import _print as out

    out(args, doc, text)


def _ledger(args: argparse.Namespace) -> tuple[FleetHome, CommandLedger]:
    home = _home(args)
    if not home.devices.is_dir():
        raise UsageError(f"{home.path} is not a fleet home with enrolled devices (run 'edgeward fleet enrol')")
    return home, CommandLedger(home)


def _load_key(spec: str | None, option: str) -> Signer:
    from packager.signers import open_signer

    if not spec:
        raise UsageError(f"sign with {option} SIGNER (a key made by 'edgeward keys operator': its file, or its "
                         "pkcs11: URI)")
    return open_signer(spec, option=option)


def _signer(args: argparse.Namespace) -> Signer | None:
    """The key that signs, or None on a dry run (nothing is signed, no passphrase needed)."""
    recovery = getattr(args, "recovery_key", None)
    rotating_operators = getattr(args, "role", None) == "operator"
    if rotating_operators and args.operator_key:
        raise UsageError(
            "rotating the operator keys must be signed with --recovery-key, not --operator-key: boards obey "
            "only a recovery key for it"
        )
    if recovery and not rotating_operators:
        raise UsageError("--recovery-key signs only 'rotate-key --role operator'; sign this with --operator-key")
    if args.dry_run:
        return None
    if rotating_operators:
        return _load_key(recovery, "--recovery-key")
    return _load_key(args.operator_key, "--operator-key")


def _signing(args: argparse.Namespace) -> Signer:
    """The key that signs when this is not a dry run (use it with ``with``: a token session closes)."""
    signer = _signer(args)
    if signer is None:
        raise UsageError("internal: a dry run signs nothing")
    return signer


def _targets(args: argparse.Namespace, home: FleetHome, ledger: CommandLedger) -> tuple[list[str], list[str]]:
    """The devices a command goes to, and the wiped ones --all or --group left out."""
    if getattr(args, "device", None):
        return list(dict.fromkeys(args.device)), []
    if getattr(args, "all", False):
        wanted = sorted(p.stem for p in home.devices.glob("*.json"))
        if not wanted:
            raise UsageError(f"no devices are enrolled in {home.path}")
    elif getattr(args, "group", None):
        wanted = read_group(home, args.group)
    else:
        raise UsageError("name the boards: --device ID (repeatable), --all or --group NAME")
    skipped = [d for d in wanted if ledger.wiped_device(d) is not None]
    devices = [d for d in wanted if d not in skipped]
    if not devices:
        raise UsageError("every board named is wiped; there is nobody to command")
    return devices, skipped


def _out_paths(out: str, devices: list[str]) -> dict[str, Path]:
    """``--out``: one board and a path that is not a directory -> that file; otherwise a
    directory (created) holding ``<device>.commands`` per board."""
    p = Path(out)
    if len(devices) == 1 and not p.is_dir():
        if not p.parent.is_dir():
            raise UsageError(f"--out {p}: directory {p.parent} does not exist")
        return {devices[0]: p}
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p} must be a directory when writing the queues of {len(devices)} boards")
    p.mkdir(parents=True, exist_ok=True)
    return {d: p / f"{d}{QUEUE_SUFFIX}" for d in devices}


def _broker(args: argparse.Namespace, home: FleetHome) -> Any:
    from .cli import _operator_broker

    if not args.broker:
        raise UsageError("give --broker HOST:PORT to publish, or --out PATH to write a file for a technician")
    return _operator_broker(args, home)


def _publisher(args: argparse.Namespace, home: FleetHome) -> Any:
    from .publish import RetainedPublisher

    return RetainedPublisher(_broker(args, home), args.operator, args.connect_timeout, args.ack_timeout)


def _describe_args(kind: str, a: dict[str, Any]) -> str:
    if kind == "rotate-key":
        return f"role={a['role']} keys={len(a['keys'])}"
    if kind == "update":
        size = a["bundle"]["length"] + (a["payload"]["length"] if "payload" in a else 0)
        return (f"release={a['release_id']} model_id={a['model_id']} model_version={a['model_version']} "
                f"bytes={size}" + (" shared-payload" if "payload" in a else ""))
    return " ".join(f"{k}={v}" for k, v in sorted(a.items()))


def _command_doc(cmd: Command, sha256: str | None) -> dict[str, Any]:
    return {
        "device_id": cmd.device_id,
        "seq": cmd.seq,
        "kind": cmd.kind,
        "args": cmd.args,
        "issued": format_time(cmd.issued),
        "expires": format_time(cmd.expires),
        "sha256": sha256,
    }


# --- issuing and delivering -----------------------------------------------------------------------


def _issue_and_deliver(args: argparse.Namespace, kind: str, cmd_args: dict[str, Any],
                       devices: list[str] | None = None) -> int:
    """Plan (--dry-run), or sign and record, then deliver: --out files or the retained queues."""
    home, ledger = _ledger(args)
    signer: Signer | None = None
    try:
        signer = _signer(args)
        expires_in = parse_age(args.expires_in) if args.expires_in else DEFAULT_EXPIRES_IN
        skipped: list[str] = []
        if devices is None:
            devices, skipped = _targets(args, home, ledger)
        if signer is None:  # a dry run
            planned = ledger.plan(kind, cmd_args, devices, expires_in)
            doc = {"dry_run": True, "commands": [_command_doc(c, None) for c in planned], "skipped_wiped": skipped}
            lines = [f"would sign {c.kind} #{c.seq} for {c.device_id}"
                     + (f" ({_describe_args(c.kind, c.args)})" if c.args else "")
                     + f", expiring {format_time(c.expires)}" for c in planned]
            lines.append("dry run: nothing was signed, recorded or published")
            _print(args, doc, "\n".join(_skipped_lines(skipped) + lines))
            return 0
        if args.out:
            paths = _out_paths(args.out, devices)
            issued = ledger.issue(kind, cmd_args, devices, signer, expires_in)
            delivery = _write_queues(ledger, paths, signer)
        else:
            with _publisher(args, home) as pub:  # connect first: an unreachable broker signs nothing
                issued = ledger.issue(kind, cmd_args, devices, signer, expires_in)
                delivery = _publish_queues(ledger, pub, devices, signer, issued)
        _report(args, issued, delivery, skipped)
        return 0
    finally:
        if signer is not None:
            signer.close()
        ledger.close()


def _skipped_lines(skipped: list[str]) -> list[str]:
    return [f"skipped {d}: wiped" for d in skipped]


def _write_queues(ledger: CommandLedger, paths: dict[str, Path], signer: Any) -> dict[str, Any]:
    files = {}
    for device, path in paths.items():
        queue = ledger.pending_queue(device, signer)
        atomic_write(path, queue, 0o644)
        files[device] = {"file": str(path), "pending": len(ledger.pending(device))}
    return {"files": files}


def _publish_queues(ledger: CommandLedger, pub: Any, devices: list[str], signer: Any,
                    issued: list[Issued] | None = None) -> dict[str, Any]:
    messages = [(command_topic(d), ledger.pending_queue(d, signer)) for d in devices]
    try:
        pub.publish(messages)
    except EdgeWardError as e:
        if not issued:
            raise
        seqs = ", ".join(f"{i.device_id} #{i.command.seq}" for i in issued[:5])
        raise type(e)(f"{e}. The commands are signed and pending in the ledger ({seqs}); "
                      "'edgeward fleet publish' sends them again") from e
    topics = {d: {"topic": t, "pending": len(ledger.pending(d))} for d, (t, _) in zip(devices, messages, strict=True)}
    return {"broker": pub.address, "topics": topics}


def _report(args: argparse.Namespace, issued: list[Issued], delivery: dict[str, Any], skipped: list[str]) -> None:
    doc = {"dry_run": False, "commands": [_command_doc(i.command, i.sha256) for i in issued],
           "skipped_wiped": skipped} | delivery
    lines = _skipped_lines(skipped)
    for i in issued:
        c = i.command
        lines.append(f"signed {c.kind} #{c.seq} for {c.device_id}"
                     + (f" ({_describe_args(c.kind, c.args)})" if c.args else "")
                     + f", expiring {format_time(c.expires)}, sha256 {i.sha256[:16]}")
    for device, d in delivery.get("files", {}).items():
        lines.append(f"wrote {device}'s queue ({d['pending']} pending command(s) and a time beacon) to {d['file']}; "
                     f"at the board: edgeward-agent command {Path(d['file']).name} --data-dir DATA_DIR --result RESULT")
    for device, d in delivery.get("topics", {}).items():
        lines.append(f"published {device}'s queue ({d['pending']} pending command(s) and a time beacon) retained "
                     f"on {d['topic']}; the broker acknowledged it")
    _print(args, doc, "\n".join(lines))


def cmd_decommission(args: argparse.Namespace) -> int:
    """Sign the order and revoke the board's certificate in the fleet CRL. The revocation comes
    first: it needs the CA key, and a CA key that cannot be unlocked then stops the command
    before anything is signed."""
    if not args.dry_run and not args.keep_certificate:
        from .broker import broker_crl, install_crl
        from .ca import revoke

        home = _home(args)
        if args.broker_dir:
            broker_crl(Path(args.broker_dir))  # a wrong --broker-dir is refused before anything changes
        crl = revoke(home, args.device_id, "decommissioned", utcnow())
        copied = install_crl(home, Path(args.broker_dir)) if args.broker_dir else None
        where = f"copied to {copied}" if copied else (
            f"copy {crl} to the broker directory as crl.pem (or pass --broker-dir, or re-run 'edgeward fleet "
            "broker-config')")
        print(f"revoked {args.device_id}'s client certificate in the fleet CRL ({where}). The broker enforces it "
              "once it restarts with that CRL: restart it after the board's result has arrived ('fleet status' "
              "shows it wiped) — a board that cannot connect cannot receive the order — or at once for a stolen "
              "board (then deliver the order with --out at the bench).", file=sys.stderr)
    return _issue_and_deliver(args, "decommission", {}, [args.device_id])


def cmd_retire(args: argparse.Namespace) -> int:
    return _issue_and_deliver(args, "retire", {"model_id": args.model})


def cmd_rollback(args: argparse.Namespace) -> int:
    args_ = {"model_id": args.model, "to_version": args.to}
    if args.local is not None:
        args_["local_version"] = args.local
    return _issue_and_deliver(args, "rollback", args_)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    import base64

    from device_agent.bundle.keyfiles import load_public_key_file

    keys = []
    for p in args.new_pub:
        path = Path(p)
        if not path.is_file():
            raise UsageError(f"--new-pub {path} does not exist")
        keys.append(base64.b64encode(load_public_key_file(path)).decode())
    return _issue_and_deliver(args, "rotate-key", {"role": args.role, "keys": keys})


def cmd_cancel(args: argparse.Namespace) -> int:
    return _issue_and_deliver(args, "cancel", {"seq": args.seq}, [args.device])


def cmd_publish(args: argparse.Namespace) -> int:
    """Send each board's pending queue again, with a fresh time beacon; signs no new command."""
    home, ledger = _ledger(args)
    try:
        devices, skipped = _targets(args, home, ledger)
        if args.dry_run:
            counts = {d: len(ledger.pending(d)) for d in devices}
            doc = {"dry_run": True, "pending": counts}
            lines = [f"would publish {d}'s queue: {n} pending command(s) and a fresh time beacon"
                     for d, n in counts.items()]
            _print(args, doc, "\n".join(_skipped_lines(skipped) + lines + ["dry run: nothing was signed or published"]))
            return 0
        with _signing(args) as signer:
            if args.out:
                delivery = _write_queues(ledger, _out_paths(args.out, devices), signer)
            else:
                with _publisher(args, home) as pub:
                    delivery = _publish_queues(ledger, pub, devices, signer)
        _report(args, [], delivery, skipped)
        return 0
    finally:
        ledger.close()


def cmd_time(args: argparse.Namespace) -> int:
    """A signed time beacon, retained on the fleet's time topic (or written to a file)."""
    home = _home(args)
    now = utcnow().replace(microsecond=0)
    if args.dry_run:
        _print(args, {"dry_run": True, "time": format_time(now), "topic": TIME_TOPIC},
               f"would sign a time beacon for {format_time(now)} and publish it retained on {TIME_TOPIC}\n"
               "dry run: nothing was signed or published")
        return 0
    with _signing(args) as signer:
        payload = beacon(signer, now)
    doc: dict[str, Any] = {"dry_run": False, "time": format_time(now), "sha256": crypto.sha256_hex(payload)}
    if args.out:
        path = _out_paths(args.out, ["time"])["time"]
        atomic_write(path, payload, 0o644)
        doc["file"] = str(path)
        text = f"wrote a signed time beacon for {doc['time']} to {path}"
    else:
        with _publisher(args, home) as pub:
            pub.publish([(TIME_TOPIC, payload)])
        doc |= {"broker": pub.address, "topic": TIME_TOPIC}
        text = f"published a signed time beacon for {doc['time']} retained on {TIME_TOPIC}; the broker acknowledged it"
    _print(args, doc, text)
    return 0


# --- results and attestations ---------------------------------------------------------------------


def _read(path: str, limit: int, what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError as e:
        raise UsageError(f"{what} {p} does not exist") from e
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a file")
    if size > limit:
        raise FormatError(f"{what} {p} is {size} bytes, over the limit of {limit}")
    return p.read_bytes()


def cmd_import_result(args: argparse.Namespace) -> int:
    """Record the signed results a technician brought back from boards without a network."""
    home, ledger = _ledger(args)
    try:
        items = split_results(_read(args.result, LIMITS.max_queue_bytes, "result file"), LIMITS)
        keys = home.device_keys()
        recorded, refused, malformed = [], [], []
        for raw in items:
            digest = crypto.sha256_hex(raw)
            try:
                device = result_device(raw, LIMITS)
                key = keys.get(device)
                if key is None:
                    raise SecurityRefusal(f"result from {device}, which is not enrolled in {home.path}")
                r = ledger.record_result(raw, key, source="import")
            except SecurityRefusal as e:
                refused.append({"sha256": digest, "why": str(e)})
                continue
            except FormatError as e:
                malformed.append({"sha256": digest, "why": str(e)})
                continue
            row = ledger.command(r.device_id, r.seq) or {}
            recorded.append(r.body() | {"command_state": row.get("state"), "effects": _effects_summary(r.effects)})
        if any(d["kind"] == "update" for d in recorded) and Path(home.monitor_db).exists():
            from . import rollout
            from .store import open_store

            store = open_store(home.monitor_db)  # the rollouts learn what the boards answered
            try:
                rollout.sync(store, ledger, utcnow())
            finally:
                store.close()
        doc = {"recorded": recorded, "refused": refused, "malformed": malformed}
        lines = [f"{d['device_id']} #{d['seq']} {d['kind']}: {d['outcome']} ({d['detail']}); the ledger says "
                 f"{d['command_state']}" + _effects_text(d["effects"]) for d in recorded]
        lines += [f"REFUSED result {d['sha256'][:16]}: {d['why']}" for d in refused]
        lines += [f"MALFORMED result {d['sha256'][:16]}: {d['why']}" for d in malformed]
        _print(args, doc, "\n".join(printable(line) for line in lines))  # a board's detail, escaped
    finally:
        ledger.close()
    if refused:
        raise SecurityRefusal(f"{len(refused)} of {len(items)} result(s) did not verify and were not recorded")
    if malformed:
        raise FormatError(f"{len(malformed)} of {len(items)} result(s) are malformed and were not recorded")
    return 0


def _effects_summary(effects: dict[str, Any]) -> dict[str, Any]:
    from .commands import _summarise_effects

    return _summarise_effects(effects)


def _effects_text(e: dict[str, Any]) -> str:
    out = ""
    if "wiped" in e:
        w = e["wiped"]
        out += f"; wiped at {w.get('started')}, {len(w.get('bundles_destroyed') or [])} bundle(s) destroyed"
    if "new_enrolment" in e:
        out += f"; new encryption key {str(e['new_enrolment'])[:23]} stored as its enrolment"
    return out


def cmd_verify_attestation(args: argparse.Namespace) -> int:
    """Check a wipe-attestation.json offline against the board's enrolled identity key."""
    from device_agent.bundle.enrolment import load_enrolment

    data = _read(args.file, 64 * 1024, "attestation")
    doc = loads_json(data, str(args.file))
    body = doc.get("body") if isinstance(doc, dict) else None
    device = body.get("device_id") if isinstance(body, dict) else None
    if not isinstance(device, str) or not ID_RE.match(device):
        raise FormatError(f"{args.file} is not a wipe attestation (no body naming a device)")
    home = _home(args)
    if args.device_enrolment:
        enr_path = Path(args.device_enrolment)
        source = str(enr_path)
    else:
        enr_path = home.devices / f"{device}.json"
        source = str(enr_path)
        if not enr_path.is_file():
            raise UsageError(f"{device} is not enrolled in {home.path}; pass --device-enrolment FILE")
    enrolment = load_enrolment(_read(str(enr_path), 64 * 1024, "enrolment"), source)
    if enrolment.device_id != device:
        raise SecurityRefusal(f"the attestation is for {device}, the enrolment for {enrolment.device_id}")
    verified = verify_wipe_attestation(doc, enrolment.sign_public)
    by = verified.get("by") or {}
    out: dict[str, Any] = {
        "verified": True,
        "device_id": device,
        "identity_key": enrolment.sign_fingerprint,
        "enrolment": source,
        "started": verified.get("started"),
        "completed": doc.get("completed"),
        "bundles_destroyed": verified.get("bundles_destroyed"),
        "files_shredded": verified.get("files_shredded"),
        "files_deleted": verified.get("files_deleted"),
        "key_encryption_key": verified.get("key_encryption_key"),
        "method": verified.get("method"),
        "by": by,
        "ledger": None,
    }
    warning = None
    if "command_seq" in by:
        from .commands import LEDGER_FILE

        row = None
        if (home.path / LEDGER_FILE).exists():
            ledger = CommandLedger(home)
            try:
                row = ledger.command(device, int(by["command_seq"]))
                if args.record:
                    ledger.mark_wiped(device, doc, enrolment.sign_public, "attestation")
            finally:
                ledger.close()
        if row is None:
            out["ledger"] = "unknown"
            warning = f"the fleet ledger has no command #{by['command_seq']} for {device}"
        elif row["kind"] == "decommission" and row["sha256"] == by.get("command_sha256"):
            out["ledger"] = "matches"
        else:
            out["ledger"] = "mismatch"
            warning = (f"the ledger's command #{by['command_seq']} for {device} is not the one the attestation names: "
                       "the wipe was ordered by a command this fleet did not issue")
    elif args.record:
        ledger = CommandLedger(home)
        try:
            ledger.mark_wiped(device, doc, enrolment.sign_public, "attestation")
        finally:
            ledger.close()
    out["recorded"] = bool(args.record)
    how = (f"by command #{by['command_seq']} ({str(by.get('command_sha256'))[:16]}) from operator "
           f"{str(by.get('operator'))[:23]}" if "command_seq" in by else "at the board (edgeward-agent wipe)")
    destroyed = [str(b) for b in out["bundles_destroyed"] or []]
    text = "\n".join(printable(line) for line in [  # what the board wrote, escaped
        f"VERIFIED: {device}'s wipe attestation is signed by its enrolled identity key "
        f"{enrolment.sign_fingerprint[:23]}",
        f"  wiped {how}",
        f"  started   {out['started']}  (signed)",
        f"  completed {out['completed'] or '-'}  (written after the keys were gone: not signed)",
        f"  destroyed {len(destroyed)} bundle(s): {', '.join(destroyed) or '-'}",
        f"  files     {out['files_shredded']} shredded, {out['files_deleted']} deleted",
        f"  key-encryption key: {out['key_encryption_key']}",
        f"  method    {out['method']}",
    ] + (["  ledger    the command matches the fleet ledger"] if out["ledger"] == "matches" else [])
      + ([f"  recorded as wiped in {home.path}"] if args.record else []))
    _print(args, out, text)
    if warning:
        import sys

        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def cmd_commands(args: argparse.Namespace) -> int:
    from .cli import table

    home = _home(args)
    from .commands import LEDGER_FILE

    if not (home.path / LEDGER_FILE).exists():
        rows: list[dict[str, Any]] = []
    else:
        ledger = CommandLedger(home)
        try:
            rows = ledger.commands(args.device)
        finally:
            ledger.close()
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    heads = ["DEVICE", "SEQ", "KIND", "ARGS", "STATE", "ISSUED", "EXPIRES", "RESULT"]
    table_rows = [
        [r["device_id"], r["seq"], r["kind"], _describe_args(r["kind"], r["args"]), r["state"], r["issued"],
         r["expires"], (r["result"] or {}).get("detail", "")[:60]]
        for r in rows
    ]
    _print(args, rows, table(heads, table_rows) if rows else "no commands")
    return 0


# --- the command line -----------------------------------------------------------------------------

EXIT_CODES = (
    "exit codes: 0 done; 1 refused for security (a result or attestation that does not verify, the broker "
    "refusing the operator); 2 usage; 3 malformed input; 4 broker unreachable or not acknowledging"
)


def _signing_args(sp: argparse.ArgumentParser, *, recovery: bool = False, expires: bool = True) -> None:
    sp.add_argument("--operator-key", metavar="SIGNER",
                    help="operator signing key ('edgeward keys operator'): a key file (EDGEWARD_PASSPHRASE "
                         "unlocks it) or a pkcs11: URI (docs/ci.md)")
    if recovery:
        sp.add_argument("--recovery-key", metavar="SIGNER",
                        help="recovery signing key (kept offline; a key file or a pkcs11: URI): signs --role "
                             "operator, and only that")
    if expires:
        sp.add_argument("--expires-in", default="30d", metavar="AGE",
                        help="the board refuses the command after this (30d default: boards may be "
                             "offline long; also 12h, 90m, 3600s)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print what would be signed; sign, record and publish nothing")
    sp.add_argument("--out", metavar="PATH",
                    help="write the board's whole queue to PATH for a technician instead of publishing "
                         "(several boards: PATH is a directory of <device>.commands files)")
    sp.add_argument("--broker", metavar="HOST:PORT", help="publish the retained queue on this broker")
    sp.add_argument("--operator", default="operator",
                    help="operator id whose certificate to use (default: operator)")
    sp.add_argument("--ca", help="CA certificate (default: the fleet CA)")
    sp.add_argument("--cert", help="client certificate (default: FLEET/certs/OPERATOR.crt)")
    sp.add_argument("--key", help="client key (default: FLEET/certs/OPERATOR.key)")
    sp.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the broker")
    sp.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for the broker's PUBACK")


def register(fsub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the command subcommands to ``edgeward fleet``; ``add`` is fleet/cli.py's helper."""

    def sub(name: str, help_: str, fn: Any, description: str = "") -> argparse.ArgumentParser:
        sp = add(name, help_, fn)
        sp.description = (description or help_) + "\n\n" + EXIT_CODES
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        return sp

    signing = _signing_args

    def targets(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group(required=True)
        g.add_argument("--device", action="append", metavar="ID", help="a board (repeatable)")
        g.add_argument("--all", action="store_true", help="every enrolled board that is not wiped")
        g.add_argument("--group", metavar="NAME",
                       help="the boards listed in FLEET/groups/NAME.txt (one device id per line, # comments)")

    delivery = (" Each board gets its own signed command with its next sequence number; its whole queue of pending "
                "commands is then published retained on edgeward/v1/<device>/commands (or written with --out).")

    sp = sub("decommission", "order a board to wipe itself (crypto-shred) and return a signed attestation",
             cmd_decommission,
             "Order a board to crypto-shred its keys and models. It answers with a result carrying the wipe "
             "attestation, signed by its identity key before the key is destroyed; once recorded (by the monitor or "
             "'import-result') 'fleet status' shows the board as wiped." + delivery)
    sp.add_argument("device_id", metavar="DEVICE")
    sp.add_argument("--keep-certificate", action="store_true",
                    help="do not revoke the board's client certificate (by default the fleet CRL revokes it, "
                         "which needs the fleet CA key; the broker enforces it once it loads the CRL and restarts)")
    sp.add_argument("--broker-dir", metavar="DIR",
                    help="the broker directory written by 'fleet broker-config': the new CRL is copied there")
    signing(sp)

    sp = sub("retire", "order boards to stop serving a model and shred it (their encryption key rotates)",
             cmd_retire,
             "Order boards to retire MODEL: they stop serving it, shred its bundles and rotate their encryption "
             "key, so copies of the bundle kept anywhere stay unopenable. Each board's result carries its new "
             "enrolment, which replaces FLEET/devices/<id>.json so the next 'edgeward pack --devices-dir' uses the "
             "new key." + delivery)
    sp.add_argument("model", metavar="MODEL")
    targets(sp)
    signing(sp)

    sp = sub("rollback", "allow boards to serve an older version of a model again", cmd_rollback,
             "Order boards to serve version VERSION of MODEL: the kept previous version at once, or permit "
             "installing that older bundle once (the board otherwise refuses downgrades)." + delivery)
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("--to", type=int, required=True, metavar="VERSION", help="the version to serve")
    sp.add_argument("--local", type=int, metavar="N", help="a local learnt version of VERSION to serve instead "
                    "(0: the publisher's head); VERSION must be the one the board serves")
    targets(sp)
    signing(sp)

    sp = sub("rotate-key", "replace the publisher, operator or receipt keys boards trust", cmd_rotate_key,
             "Replace the keys boards trust for one role with the --new-pub keys.\n\n"
             "--role publisher and --role receipt (the monitors' receipt keys) are signed with --operator-key. "
             "--role operator must be signed with --recovery-key "
             "(the boards' recovery anchor, kept offline) and boards refuse it signed by anything else: whoever "
             "stole an operator key cannot rotate the genuine operator keys out first and lock the fleet out."
             + delivery)
    sp.add_argument("--role", choices=["publisher", "operator", "receipt"], required=True)
    sp.add_argument("--new-pub", action="append", required=True, metavar="PUB",
                    help="public key file the boards will trust for the role (repeatable)")
    targets(sp)
    signing(sp, recovery=True)

    sp = sub("cancel", "cancel a pending command with a later signed command", cmd_cancel,
             "Issue a cancel for command SEQ of one board. Both stay in the board's queue; a board that has not "
             "carried out SEQ yet skips it (its result says 'cancelled'). A command the board already carried out "
             "cannot be cancelled; only pending ones can be named." + delivery)
    sp.add_argument("seq", type=int, metavar="SEQ")
    sp.add_argument("--device", required=True, metavar="ID", help="the board whose command SEQ is")
    signing(sp)

    sp = sub("publish", "send boards' pending queues again with a fresh time beacon (signs no new command)",
             cmd_publish,
             "Republish each board's retained queue: after the broker was unreachable, to drop commands that "
             "have results or expired, or to refresh the time beacon. With --out, write it for a technician.")
    targets(sp)
    signing(sp, expires=False)

    sp = sub("time", "publish a signed time beacon, retained on edgeward/v1/_time", cmd_time,
             "Sign the fleet's current time and publish it retained on edgeward/v1/_time (every board may read "
             "it): a board's clock floor moves forward only with signed times. --out writes the beacon to a file.")
    signing(sp, expires=False)

    sp = sub("import-result", "record signed command results a technician brought back", cmd_import_result,
             "Verify each result in RESULT (one result, or several as 'edgeward-agent command --result' writes "
             "them) against the board's enrolled identity key and record it in the ledger. Results that do not "
             "verify are refused (exit 1) and not recorded; the others are.")
    sp.add_argument("result", metavar="RESULT")

    sp = sub("verify-attestation", "check a board's wipe-attestation.json against its enrolled identity key",
             cmd_verify_attestation,
             "Check a wipe attestation offline: it must be signed by the identity key in the fleet home's "
             "enrolment of the board it names (or --device-enrolment). Prints what was destroyed, when, and by "
             "which command; exit 1 if it does not verify.")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--device-enrolment", metavar="ENR", help="the board's enrolment file (default: FLEET/devices)")
    sp.add_argument("--record", action="store_true",
                    help="also record the board as wiped in the ledger (a wipe done at the bench)")

    sp = sub("commands", "list the command ledger: every command issued, its state and result", cmd_commands,
             "List every command issued (optionally to one DEVICE): sequence number, kind, arguments, state "
             "(pending, applied, refused, cancelled, expired), issue and expiry times, the board's result.")
    sp.add_argument("device", nargs="?", metavar="DEVICE")
    sp.add_argument("--state", choices=STATES, help="only commands in this state")



# --- over-the-air rollouts -------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    """Start a staged rollout of a release directory, or (``--resume``) carry one on."""
    from datetime import UTC, datetime

    from . import rollout as ro
    from .store import open_store

    home, ledger = _ledger(args)
    store = open_store(args.db or home.monitor_db)
    signer: Signer | None = None
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        release = ro.read_release(args.release_dir, args.release)
        expires_in = parse_age(args.expires_in) if args.expires_in else DEFAULT_EXPIRES_IN
        skipped: list[str] = []
        if args.resume:
            if args.base_url or args.device or args.all or args.group or args.stages or args.max_failures is not None \
                    or args.stage_timeout:
                raise UsageError("--resume carries on the rollout as it was started: give only RELEASE_DIR (and "
                                 "--release), the key and the broker")
            ro.sync(store, ledger, now)
            found = store.rollouts(release.release_id)
            if not found:
                raise UsageError(f"no rollout of release {release.release_id}; start one without --resume")
            rollout, boards, new = found[0], store.rollout_devices(release.release_id), False
        else:
            if not args.base_url:
                raise UsageError("give --base-url: the https:// address the release directory is served under")
            if not (args.device or args.all or args.group):
                raise UsageError("name the boards: --device ID (repeatable), --all or --group NAME")
            if store.rollouts(release.release_id):
                raise UsageError(f"release {release.release_id} is being rolled out already ('edgeward fleet status'); "
                                 "carry it on with --resume, or pack a new release")
            devices, skipped = _targets(args, home, ledger)
            outside = [d for d in devices if d not in release.files]
            if outside and args.device:
                ro.file_for(release, outside[0])  # names the board that is not in the release
            devices = [d for d in devices if d in release.files]
            if not devices:
                raise UsageError(f"none of the boards named is in release {release.release_id}")
            skipped += [f"{d}: not in this release" for d in outside]
            max_failures = 1 if args.max_failures is None else args.max_failures
            if max_failures < 1:
                raise UsageError("--max-failures must be at least 1")
            timeout = parse_age(args.stage_timeout or "6h", "--stage-timeout")
            rollout, boards = ro.new_rollout(release, devices, ro.base_url(args.base_url),
                                             ro.parse_stages(args.stages or ro.DEFAULT_STAGES), max_failures, timeout,
                                             now)
            for d in devices:
                ro.file_for(release, d)  # every file is what the pack report says, before anything is signed
            new = True
        step = ro.decide(rollout, boards, now)
        orders = ro.orders_for(release, rollout, step.issue, boards)
        if orders:
            ro.check_payload(release)  # a shared release's payload is what its index says
        if args.dry_run:
            planned = ledger.plan_each("update", orders, expires_in, now)
            lines = [f"skipped {s}" for s in skipped]
            if new:
                lines.append(f"release {release.release_id} ({release.model_id} v{release.model_version}) to "
                             f"{len(boards)} board(s) in this order (SHA-256 of release id and device id):")
                lines += [f"  {b['position']:>4} {b['device_id']:<24} stage {b['stage'] + 1}  {b['url']}"
                          for b in boards]
            if new and release.payload is not None:
                lines.append(f"  every board also fetches the shared payload {rollout['payload_url']} "
                             f"({release.payload.length} bytes, payload sha256 {release.payload.sha256[:16]})")
            lines += [f"would sign update #{c.seq} for {c.device_id}: {_file_label(c.args)}" for c in planned]
            lines.append(f"then: {step.state}, {step.detail}")
            lines.append("dry run: nothing was signed, recorded or published")
            doc = {"dry_run": True, "release_id": release.release_id, "state": step.state, "detail": step.detail,
                   "order": [{k: b[k] for k in ("device_id", "position", "url", "length", "sha256")}
                             | {"stage": b["stage"] + 1} for b in boards],
                   "commands": [_command_doc(c, None) for c in planned], "skipped": skipped,
                   "payload": None if not rollout.get("payload_url") else {
                       "url": rollout["payload_url"], "length": rollout["payload_length"],
                       "sha256": rollout["payload_sha256"]}}
            _print(args, doc, "\n".join(lines))
            return 0
        signer = _signing(args)
        issued: list[Issued] = []
        targets = [d for d, _ in orders]

        def record() -> list[Issued]:
            if new and not store.create_rollout(rollout, boards):
                raise UsageError(f"release {release.release_id} is being rolled out already; use --resume")
            nonlocal step
            done = ledger.issue_each("update", orders, signer, expires_in, now) if orders else []
            for i in done:
                store.rollout_issued(release.release_id, i.device_id, i.command.seq, i.sha256, now)
            if done:  # where it stands once these are signed: waiting for their answers, not "to sign"
                signed = rollout | {"state": step.state, "stage": step.stage,
                                    "stage_started": format_time(step.stage_started)}
                step = ro.decide(signed, store.rollout_devices(release.release_id), now)
            store.rollout_moved(release.release_id, step.state, step.stage, format_time(step.stage_started),
                                step.detail, now)
            return done

        delivery: dict[str, Any] = {}
        if args.out and targets:
            issued = record()
            delivery = _write_queues(ledger, _out_paths(args.out, targets), signer)
        elif targets:
            with _publisher(args, home) as pub:  # connect first: an unreachable broker signs nothing
                issued = record()
                delivery = _publish_queues(ledger, pub, targets, signer, issued)
        else:
            issued = record()
        doc = {"dry_run": False, "release_id": release.release_id, "state": step.state, "detail": step.detail,
               "commands": [_command_doc(i.command, i.sha256) for i in issued], "skipped": skipped,
               "rollouts": ro.view(store)} | delivery
        lines = [f"skipped {s}" for s in skipped]
        lines += [f"signed update #{i.command.seq} for {i.device_id}: {_file_label(i.command.args)}, command sha256 "
                  f"{i.sha256[:16]}" for i in issued]
        lines += [f"published {d}'s queue retained on {t['topic']}" for d, t in delivery.get("topics", {}).items()]
        lines += [f"wrote {d}'s queue to {f['file']}" for d, f in delivery.get("files", {}).items()]
        lines.append(f"rollout {release.release_id}: {step.state}, {step.detail}")
        _print(args, doc, "\n".join(lines))
        return 0
    finally:
        if signer is not None:
            signer.close()
        store.close()
        ledger.close()


def _file_label(args: dict[str, Any]) -> str:
    """The files an update names, each labelled with what its digest is of."""
    b = args["bundle"]
    kind = "envelope" if "payload" in args else "bundle"
    text = f"{kind} {b['url'].rsplit('/', 1)[-1]} ({b['length']} bytes, {kind} sha256 {b['sha256'][:16]})"
    if "payload" in args:
        p = args["payload"]
        text += f" + payload ({p['length']} bytes, payload sha256 {p['sha256'][:16]})"
    return text


def register_deploy(fsub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """``edgeward fleet deploy``: a staged over-the-air rollout (docs/operations.md, "Releasing to a fleet")."""
    from .cli import STORE_HELP

    sp = add("deploy", "roll a release out over the air in stages: one signed update command per board",
             cmd_deploy)
    sp.description = (
        "Sign one 'update' command per board of the first stage, naming its file in RELEASE_DIR (what "
        "'edgeward pack' wrote) under --base-url with its length and SHA-256, and publish the boards' queues. "
        "Boards are taken in the order of SHA-256(release id, device id); --stages are cumulative shares of it. "
        "A stage is done when each of its boards answered, or --stage-timeout after it began (silent boards stay "
        "pending, not failed); the rollout halts at --max-failures failures. The monitor records answers, halts a "
        "rollout and marks it done when its last stage is complete; it holds no operator key, so run "
        "'deploy RELEASE_DIR --resume' (by hand or from a timer) to sign each next stage.\n\n" + EXIT_CODES)
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("release_dir", metavar="RELEASE_DIR")
    sp.add_argument("--base-url", metavar="URL", help="https:// address RELEASE_DIR is served under")
    sp.add_argument("--release", metavar="ID", help="the release id of version 1 bundles (default: MODEL-vVERSION "
                    "from report.json; a shared release is named by its release.json)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--device", action="append", metavar="ID", help="a board (repeatable)")
    g.add_argument("--all", action="store_true", help="every enrolled board that is not wiped and is in the release")
    g.add_argument("--group", metavar="NAME", help="the boards listed in FLEET/groups/NAME.txt")
    sp.add_argument("--stages", metavar="P%,...",
                    help="cumulative shares of the boards (default " + DEFAULT_STAGES.replace("%", "%%") + ")")
    sp.add_argument("--max-failures", type=int, metavar="N", help="halt after N boards fail (default 1)")
    sp.add_argument("--stage-timeout", metavar="AGE",
                    help="after this, silent boards of a stage count as pending and the stage is complete: the next "
                         "'--resume' signs the next stage (default 6h)")
    sp.add_argument("--resume", action="store_true", help="carry on the rollout of this release: sign the next stage "
                    "once the current one is done")
    sp.add_argument("--store", "--db", dest="db", help=STORE_HELP)
    _signing_args(sp)

