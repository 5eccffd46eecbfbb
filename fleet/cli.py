"""``edgeward fleet ...``: the operator's commands (CA, enrolment, broker set-up, monitor, views).

Registered into the host CLI by :func:`register`; every command raises EdgeWardError subclasses
and the host CLI turns them into one line and an exit code (4 when the broker is unreachable).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from device_agent.errors import UsageError
from device_agent.wire import format_time, printable

from .ca import FleetHome, default_fleet_dir
from .views import STALE_AFTER_S, device_views, parse_since


def _home(args: argparse.Namespace) -> FleetHome:
    return FleetHome(args.fleet_dir or default_fleet_dir())


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if getattr(args, "json", False) else text)


def table(heads: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table ('-' for missing values); a cell shows every control character
    escaped (most cells hold what a board or a message supplied)."""
    cells = [[("-" if v is None or v == "" else printable(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def cmd_ca_init(args: argparse.Namespace) -> int:
    home = _home(args)
    cert = home.init_ca(args.name, unencrypted=args.insecure_unencrypted_key)
    encrypted = b"ENCRYPTED" in home.ca_key.read_bytes()
    _print(
        args,
        {"ca": str(cert), "key": str(home.ca_key), "encrypted": encrypted},
        f"fleet CA created: {cert}\nCA key {home.ca_key} (0600, "
        + ("passphrase-encrypted)" if encrypted else "NOT encrypted: --insecure-unencrypted-key)"),
    )
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.operator:
        issued = home.enrol_operator(args.operator)
        kind, key_fpr = "operator", None
    elif args.enrolment:
        path = Path(args.enrolment)
        if not path.is_file():
            raise UsageError(f"enrolment {path} does not exist")
        e, issued = home.enrol_device(path.read_bytes(), str(path))
        kind, key_fpr = "device", e.sign_fingerprint
    else:
        raise UsageError("give a device ENROLMENT file or --operator ID")
    doc = {"kind": kind, "id": issued.common_name, "cert": str(issued.cert), "key": str(issued.key)}
    if key_fpr:
        doc["identity_key"] = key_fpr
    text = f"enrolled {kind} {issued.common_name}: {issued.cert} and {issued.key} (0600)"
    if kind == "operator":
        text += "\nre-run 'edgeward fleet broker-config' so the broker ACL lists the operator"
    _print(args, doc, text)
    return 0


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{what} {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def cmd_broker_config(args: argparse.Namespace) -> int:
    from .broker import write_broker_config

    bind, port = _host_port(args.listen, "--listen")
    files = write_broker_config(
        _home(args),
        Path(args.out),
        bind=bind,
        port=port,
        server_names=args.server_name,
        max_queued=args.max_queued,
        unencrypted_ca_key=args.insecure_unencrypted_key,
    )
    doc = {k: str(v) for k, v in vars(files).items()}
    _print(
        args,
        doc,
        f"wrote {files.conf}, {files.acl}, {files.cert}, {files.crl}\n"
        f"run: mosquitto -c {files.conf}",
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from .broker import broker_crl, install_crl
    from .ca import revocations, revoke, revoked

    home = _home(args)
    if args.broker_dir:
        broker_crl(Path(args.broker_dir))  # refuse a wrong --broker-dir before revoking anything
    already = args.device in revoked(home)
    crl_path = revoke(home, args.device, args.reason, datetime.now(UTC))
    serial = x509.load_pem_x509_certificate((home.certs / f"{args.device}.crt").read_bytes())
    entry = next(r for r in revocations(home) if r.serial == serial.serial_number)
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    copied = install_crl(home, Path(args.broker_dir)) if args.broker_dir else None
    next_update = crl.next_update_utc
    doc = {
        "device_id": entry.device_id,
        "serial": format(entry.serial, "x"),
        "revoked_at": format_time(entry.revoked_at),
        "reason": entry.reason,
        "already_revoked": already,
        "crl": str(crl_path),
        "crl_entries": len(crl),
        "next_update": format_time(next_update) if next_update else None,
        "broker_crl": str(copied) if copied else None,
    }
    reason = f", reason: {entry.reason}" if entry.reason else ""
    lines = [
        f"{'already revoked' if already else 'revoked'} {entry.device_id}: certificate serial "
        f"{doc['serial']}, at {doc['revoked_at']}{reason}",
        f"CRL signed: {crl_path} ({len(crl)} revoked, next update {doc['next_update']}: sign a "
        "new one before then with 'fleet broker-config', or the broker refuses every board)",
    ]
    if copied:
        lines.append(f"copied to {copied}")
    else:
        lines.append(
            f"copy {crl_path} to the broker directory as crl.pem (or pass --broker-dir DIR, "
            "or re-run 'edgeward fleet broker-config')"
        )
    lines.append(
        "then restart mosquitto: only a restart disconnects the board if it is connected now "
        "(kill -HUP refuses its new connections but keeps an open one)"
    )
    _print(args, doc, "\n".join(lines))
    return 0


def _operator_broker(args: argparse.Namespace, home: FleetHome) -> Any:
    from device_agent.telemetry.mqtt import Broker

    cert = args.cert or str(home.certs / f"{args.operator}.crt")
    key = args.key or str(home.certs / f"{args.operator}.key")
    return Broker.parse(args.broker, args.ca or str(home.ca_cert), cert, key)


def _access(args: argparse.Namespace) -> Any:
    """The ``--tls-cert``/``--tls-key``/``--client-certs``/``--token-file`` options."""
    from .access import Access, read_token

    return Access(
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_certs=args.client_certs,
        token=read_token(args.token_file) if args.token_file else None,
    )


def _access_args(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--tls-cert", help=f"serve the {what} over TLS with this certificate (PEM)")
    sp.add_argument("--tls-key", help="the TLS certificate's private key (PEM)")
    sp.add_argument(
        "--client-certs",
        action="store_true",
        help="accept client certificates the fleet CA issued to enrolled operators (needs TLS)",
    )
    sp.add_argument("--token-file", help="accept 'Authorization: Bearer TOKEN' with the token in this file (needs TLS)")


def cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor import Monitor, MonitorConfig
    from .store import open_store

    home = _home(args)
    client_id = args.client_id or f"monitor-{args.operator}"
    alert_config = None
    if args.alert_webhook:
        from .alerts import AlertConfig, check_config

        alert_config = AlertConfig(args.alert_webhook, args.alert_severity, args.alert_format, client_id)
        check_config(alert_config)
    access = None
    if args.metrics_listen:
        from .access import listen_policy

        access = _access(args)
        bind, port = _host_port(args.metrics_listen, "--metrics-listen")
        listen_policy(bind, access, "metrics endpoint")
    elif args.tls_cert or args.tls_key or args.client_certs or args.token_file:
        raise UsageError("--tls-cert, --tls-key, --client-certs and --token-file go with --metrics-listen")
    spec = args.db or home.monitor_db
    store = open_store(spec)
    config = MonitorConfig(group=None if args.exclusive else args.group)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    side: list[Any] = []  # the metrics server, the alert thread and their own store connections
    on_chunk = None
    try:
        if access is not None:
            from .access import url_of
            from .metrics import MonitorMetrics, metrics_server

            mine = MonitorMetrics(client_id)
            on_chunk = mine.observe
            reads = open_store(spec)
            side.append(reads)
            server = metrics_server(home, reads, mine, bind, port, access, args.stale_after)
            side.append(server)
            threading.Thread(target=server.serve_forever, name="edgeward-metrics", daemon=True).start()
            print(f"metrics on {url_of(server, access)}metrics", flush=True)
        if alert_config is not None:
            from .alerts import Alerter

            alert_store = open_store(spec)
            side.append(alert_store)
            alerter = Alerter(alert_store, alert_config)
            side.append(alerter)
            alerter.start()
        receipt_key = None
        if args.receipt_key:
            from .commands_cli import _load_key

            receipt_key = _load_key(args.receipt_key, "--receipt-key")
            side.append(receipt_key)  # closed at the end (a token session)
        mon = Monitor(home, store, _operator_broker(args, home), client_id, config, on_chunk=on_chunk,
                      receipt_key=receipt_key)
        try:
            mon.start()
            mon.link.require_connected(args.connect_timeout)
            print(f"monitoring {args.broker} into {store.name} (Ctrl-C to stop)", flush=True)
            end = time.monotonic() + args.duration if args.duration else None
            while not done.wait(0.5) and (end is None or time.monotonic() < end):
                if mon.error is not None:
                    raise mon.error
        finally:
            mon.stop()
    finally:
        for part in reversed(side):
            if hasattr(part, "shutdown"):
                part.shutdown()
                part.server_close()
            elif hasattr(part, "stop"):
                part.stop()
            else:
                part.close()
        store.close()
    return 0


def _store(args: argparse.Namespace, home: FleetHome, required: bool = True) -> Any:
    from .store import MonitorStore, PostgresStore, is_postgres

    if args.db and is_postgres(args.db):
        return PostgresStore(args.db)
    path = Path(args.db or home.monitor_db)
    if not path.exists():
        if not required:  # a fleet without a network: no reports, but the ledger still knows
            return MonitorStore(":memory:")
        raise UsageError(f"no monitor store at {path}; run 'edgeward fleet monitor' first")
    return MonitorStore(path)


def _outbox_cell(view: dict[str, Any]) -> str | None:
    """The board's outbox in its latest telemetry report: reports queued, and on a board that
    waits for receipts, how many the broker took that no receipt covers yet and the receipts it
    refused (a wrong or missing receipt key shows here)."""
    c = view.get("counters")
    box = c.get("outbox") if isinstance(c, dict) else None
    if not isinstance(box, dict) or not isinstance(box.get("queued"), int):
        return None
    cell = f"{box['queued']} queued"
    for key, name in (("unreceipted", "unreceipted"), ("receipts_refused", "receipts refused")):
        if isinstance(box.get(key), int):
            cell += f", {box[key]} {name}"
    return cell


def cmd_status(args: argparse.Namespace) -> int:
    home = _home(args)
    now = datetime.now(UTC)
    from . import rollout

    store = _store(args, home, required=False)
    try:
        views = device_views(home, store, now, args.stale_after)
        rollouts = rollout.view(store)
    finally:
        store.close()
    rows = [
        [
            v["device_id"],
            v["liveness"],
            v.get("last_seen"),
            v.get("models"),
            v.get("received"),
            v.get("events"),
            v.get("flagged"),
            v.get("duplicates"),
        ]
        for v in views
    ]
    for row, v in zip(rows, views, strict=True):
        row.append(v.get("pending_commands") or None)
        row.append(_outbox_cell(v))
    heads = ["DEVICE", "STATE", "LAST SEEN", "MODELS", "REPORTS", "EVENTS", "FLAGGED", "DUPLICATES"]
    heads += ["PENDING CMDS", "OUTBOX"]
    text = table(heads, rows) if rows else "no devices"
    for v in views:
        w = v.get("wiped")
        if w:
            how = (
                f"by command #{w['command_seq']} ({str(w['command_sha256'])[:16]})"
                if w.get("command_seq") is not None
                else "at the board"
            )
            text += "\n" + printable(f"{v['device_id']}: wiped {how}, started {w['started']}; attestation verified")
    if rollouts:
        text += "\n" + "\n".join(rollout.text_view(rollouts))
    _print(args, {"now": format_time(now), "devices": views, "rollouts": rollouts}, text)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    home = _home(args)
    since = parse_since(args.since, datetime.now(UTC))
    events = _store(args, home).events(since=since, device_id=args.device, limit=args.limit)
    heads = ["TIME", "SOURCE", "DEVICE", "SEQ", "KIND", "SEVERITY", "DETAIL"]
    rows = [
        [
            e["time"],
            e["source"],
            e["device_id"],
            e["seq"],
            e["kind"],
            e["severity"],
            e["detail"][:60],
        ]
        for e in events
    ]
    _print(args, events, table(heads, rows) if rows else "no events")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .access import listen_policy
    from .dashboard import serve

    home = _home(args)
    bind, port = _host_port(args.listen, "--listen")
    access = _access(args)
    listen_policy(bind, access, "dashboard")
    serve(home, _store(args, home), bind, port, args.stale_after, access)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Retention: delete reports and security events received before the cut-off, in bounded
    batches, keeping each device's newest reports (the replay judgement needs them)."""
    from .monitor import DEFAULT_MONITOR

    home = _home(args)
    before = parse_since(args.older_than, datetime.now(UTC))
    if before is None:
        raise UsageError("--older-than needs an age such as 90d or an ISO 8601 time")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    store = _store(args, home)
    try:
        done = store.prune(before, DEFAULT_MONITOR.redelivery_window, args.batch)
    finally:
        store.close()
    doc = {"before": format_time(before), "reports": done.reports, "events": done.events,
           "transactions": done.batches}
    _print(args, doc, f"pruned {done.reports} reports and {done.events} security events received before "
           f"{doc['before']} in {done.batches} transactions")
    return 0


def cmd_export_events(args: argparse.Namespace) -> int:
    """A board's events over a time range as signed JSON (incident records, NCSC 5.2). The file
    is written only once the export is signed."""
    from device_agent.store.fsutil import atomic_write

    from .commands_cli import _load_key
    from .incidents import MAX_EVENTS, export_document, sign_export

    home = _home(args)
    now = datetime.now(UTC)
    since, until = parse_since(args.since, now), parse_since(args.until, now)
    store = _store(args, home)
    try:
        events = store.events(since=since, device_id=args.device, limit=MAX_EVENTS + 1, until=until)
        name = store.name
    finally:
        store.close()
    if len(events) > MAX_EVENTS:
        raise UsageError(f"more than {MAX_EVENTS} events in this range: narrow it with --since/--until/--device")
    with _load_key(args.operator_key, "--operator-key") as signer:  # a token session closes after use
        blob = sign_export(export_document(events, args.device, since, until, now, name), signer)
    atomic_write(Path(args.out), blob, 0o600)
    _print(args, {"out": args.out, "events": len(events)}, f"wrote {len(events)} signed events to {args.out}")
    return 0


def cmd_verify_export(args: argparse.Namespace) -> int:
    from device_agent.bundle.keyfiles import load_public_key_file

    from .incidents import MAX_EXPORT_BYTES, verify_export

    public = load_public_key_file(Path(args.operator_pub))
    try:
        with open(args.file, "rb") as f:
            blob = f.read(MAX_EXPORT_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {args.file}: {e.strerror}") from e
    doc = verify_export(blob, public)
    _print(args, doc, f"verified: {doc['count']} events for {doc['device_id'] or 'every device'}, "
           f"exported {doc['exported']} from {doc['store']}")
    return 0


STORE_HELP = "monitor store: a SQLite file (default: FLEET/monitor.db) or postgresql://USER@HOST/DB"


def register(sub: Any) -> None:
    """Add ``edgeward fleet ...`` to the host command line."""
    fleet = sub.add_parser("fleet", help="fleet CA, broker set-up, telemetry monitor and dashboard")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")

    def add(name: str, help_: str, fn: Any, parent: Any = fsub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--fleet-dir", help="fleet home (default $EDGEWARD_FLEET_DIR or ./fleet-home)"
        )
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=fn)
        return sp

    ca = fsub.add_parser("ca", help="the fleet certificate authority")
    casub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    sp = add(
        "init",
        "create the fleet CA (ca.key 0600, encrypted under EDGEWARD_PASSPHRASE)",
        cmd_ca_init,
        casub,
    )
    sp.add_argument("--name", default="EdgeWard fleet CA")
    sp.add_argument(
        "--insecure-unencrypted-key",
        action="store_true",
        help="without EDGEWARD_PASSPHRASE, write ca.key in the clear instead of refusing (test rigs only)",
    )

    sp = add(
        "enrol",
        "enrol a board from its enrolment file (or an operator) and issue its client cert",
        cmd_enrol,
    )
    sp.add_argument(
        "enrolment", nargs="?", help="device enrolment JSON (edgeward-agent provision --export)"
    )
    sp.add_argument("--operator", help="issue an operator certificate with this id instead")

    sp = add(
        "broker-config",
        "write a runnable mosquitto set-up (TLS, client certs, ACLs)",
        cmd_broker_config,
    )
    sp.add_argument(
        "--out", required=True, help="directory for mosquitto.conf, acl, certificates, data/"
    )
    sp.add_argument("--listen", default="0.0.0.0:8883", help="HOST:PORT of the TLS listener")  # noqa: S104
    sp.add_argument("--server-name", action="append", help="broker DNS name or IP (repeatable)")
    sp.add_argument(
        "--max-queued", type=int, default=1_000_000, help="QoS 1 messages queued per client"
    )
    sp.add_argument(
        "--insecure-unencrypted-key",
        action="store_true",
        help="if this creates the fleet CA: without EDGEWARD_PASSPHRASE, write ca.key in the clear "
        "instead of refusing (test rigs only)",
    )

    sp = add(
        "revoke",
        "revoke a board's client certificate (decommissioned or stolen): sign a fresh CRL so the "
        "broker refuses the board at the TLS handshake once mosquitto has been restarted",
        cmd_revoke,
    )
    sp.epilog = (
        "The board's current certificate (FLEET/certs/DEVICE.crt) is added by serial to "
        "FLEET/revoked.json and FLEET/crl.pem is signed afresh by the fleet CA (needs "
        "EDGEWARD_PASSPHRASE if ca.key is encrypted); revoking again changes nothing. The broker "
        "uses its own copy, BROKER_DIR/crl.pem: pass --broker-dir or copy it, then restart "
        "mosquitto. A revoked board can no longer receive remote commands over MQTT: revoke "
        "after a remote decommission has been confirmed, or at once for a stolen board. "
        "Re-enrolling the board later issues it a new, valid certificate."
    )
    sp.add_argument("device", metavar="DEVICE", help="device id of the board to revoke")
    sp.add_argument(
        "--reason",
        default="",
        metavar="TEXT",
        help="free text kept in FLEET/revoked.json (e.g. 'stolen', 'decommissioned')",
    )
    sp.add_argument(
        "--broker-dir",
        metavar="DIR",
        help="a directory written by 'fleet broker-config': update its crl.pem too",
    )

    def broker_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--broker", required=True, help="HOST:PORT of the fleet broker")
        sp.add_argument(
            "--operator", default="operator", help="operator id whose certificate to use"
        )
        sp.add_argument("--ca", help="CA certificate (default: the fleet CA)")
        sp.add_argument("--cert", help="client certificate (default: certs/OPERATOR.crt)")
        sp.add_argument("--key", help="client key (default: certs/OPERATOR.key)")

    sp = add(
        "monitor", "verify and store every board report (MQTT 5 shared subscription)", cmd_monitor
    )
    broker_args(sp)
    sp.add_argument("--store", "--db", dest="db", help=STORE_HELP)
    sp.add_argument(
        "--client-id", help="MQTT client id (default monitor-OPERATOR); one per monitor"
    )
    sp.add_argument("--group", default="edgeward-monitors", help="shared subscription group")
    sp.add_argument(
        "--exclusive",
        action="store_true",
        help="plain persistent subscription instead of a shared one (a single monitor on "
        "mosquitto: nothing is lost across a broker restart)",
    )
    sp.add_argument("--connect-timeout", type=float, default=10.0)
    sp.add_argument("--duration", type=float, help="stop after this many seconds")
    sp.add_argument(
        "--receipt-key",
        metavar="SIGNER",
        help="sign a receipt per board after every commit with this key (made by 'edgeward keys receipt': "
        "its file, or its pkcs11: URI); boards given its .pub keep each report until a receipt covers it",
    )
    sp.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (loopback, or TLS and authentication beyond it)",
    )
    _access_args(sp, "metrics")
    sp.add_argument(
        "--stale-after", type=float, default=STALE_AFTER_S, help="seconds of silence: stale (metrics)"
    )
    sp.add_argument("--alert-webhook", metavar="URL", help="POST security events to this webhook")
    sp.add_argument(
        "--alert-severity",
        default="warning",
        choices=("info", "warning", "critical"),
        help="alert on events at or above this severity (default warning)",
    )
    sp.add_argument(
        "--alert-format",
        default="alertmanager",
        choices=("alertmanager", "json"),
        help="the webhook body: Alertmanager's webhook format or a generic JSON one",
    )

    for name, help_, fn in (
        ("status", "devices: state, last seen, model versions, counters", cmd_status),
        ("events", "board events and monitor security events, oldest first", cmd_events),
        ("dashboard", "serve the local fleet dashboard", cmd_dashboard),
    ):
        sp = add(name, help_, fn)
        sp.add_argument("--store", "--db", dest="db", help=STORE_HELP)
        if name != "events":
            sp.add_argument(
                "--stale-after", type=float, default=STALE_AFTER_S, help="seconds of silence: stale"
            )
        else:
            sp.add_argument("--since", help="ISO 8601 time or an age such as 30m, 6h, 2d")
            sp.add_argument("--device", help="only this device")
            sp.add_argument("--limit", type=int, default=1000)
        if name == "dashboard":
            sp.add_argument(
                "--listen",
                default="127.0.0.1:8080",
                help="HOST:PORT to serve on (loopback by default; beyond it TLS and authentication)",
            )
            _access_args(sp, "dashboard")

    sp = add("prune", "retention: delete reports and security events older than an age", cmd_prune)
    sp.add_argument("--store", "--db", dest="db", help=STORE_HELP)
    sp.add_argument("--older-than", required=True, help="an age such as 90d, or an ISO 8601 time")
    sp.add_argument("--batch", type=int, default=1000, help="rows deleted per transaction")

    sp = add("export-events", "a board's events over a time range as signed JSON", cmd_export_events)
    sp.add_argument("--store", "--db", dest="db", help=STORE_HELP)
    sp.add_argument("--device", help="only this device")
    sp.add_argument("--since", help="ISO 8601 time or an age such as 30d")
    sp.add_argument("--until", help="ISO 8601 time or an age (events before it)")
    sp.add_argument("--operator-key", help="the operator key that signs the export")
    sp.add_argument("--out", required=True, help="file to write")

    sp = add("verify-export", "check a signed events export against the operator's public key",
             cmd_verify_export)
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--operator-pub", required=True, help="the operator's public key (.pub)")

    from .commands_cli import register as register_commands
    from .commands_cli import register_deploy

    register_commands(fsub, add)
    register_deploy(fsub, add)
