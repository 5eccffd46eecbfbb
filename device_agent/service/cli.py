"""``edgeward-agent serve | token | audit | events``: the service's commands (registered by
:func:`register` into the agent's CLI)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_agent.cliutil import emit
from device_agent.errors import IntegrityError, UsageError

RUNTIME_DIRECTORY_ENV = "RUNTIME_DIRECTORY"  # set by systemd's RuntimeDirectory= (deploy/systemd/)


def default_socket(data_dir_socket: Path, environ: Mapping[str, str]) -> Path:
    """Where ``serve`` listens without ``--socket``: ``agent.sock`` in the service's runtime
    directory (``$RUNTIME_DIRECTORY``, which systemd makes for the unit, group-readable for the
    client applications' group), else in the data directory, which only its owner can enter.
    A runtime directory that others may write to is refused: anyone could plant the socket."""
    runtime = environ.get(RUNTIME_DIRECTORY_ENV, "").split(":")[0]
    if not runtime:
        return data_dir_socket
    d = Path(runtime)
    try:
        st = d.stat()
    except OSError as e:
        raise UsageError(f"{RUNTIME_DIRECTORY_ENV}={runtime} cannot be used: {e.strerror}; "
                         "create it (systemd's RuntimeDirectory= does) or pass --socket") from e
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{RUNTIME_DIRECTORY_ENV}={runtime} is not a directory; pass --socket")
    if st.st_mode & stat.S_IWOTH:
        raise UsageError(f"{RUNTIME_DIRECTORY_ENV}={runtime} is writable by every user (mode "
                         f"{oct(stat.S_IMODE(st.st_mode))}); use a directory only the agent can write")
    return d / data_dir_socket.name


def update_settings(args: argparse.Namespace) -> Any:
    """The board's command limits with ``--update-ca`` and ``--update-deadline`` (over-the-air updates)."""
    from dataclasses import replace

    from device_agent.config import DEFAULT_CONFIG

    c = DEFAULT_CONFIG.commands
    if getattr(args, "update_ca", None):
        if not Path(args.update_ca).is_file():
            raise UsageError(f"--update-ca {args.update_ca} does not exist; give a PEM file of CA certificates")
        c = replace(c, update_ca_file=str(args.update_ca))
    deadline = getattr(args, "update_deadline", None)
    if deadline is not None:
        if not 0 < deadline <= 86400:
            raise UsageError("--update-deadline must be between 0 and 86400 seconds")
        c = replace(c, update_deadline_s=float(deadline), update_read_s=min(c.update_read_s, float(deadline)))
    return c


def add_update_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--update-ca", metavar="PEM",
                    help="CA certificates the file server of over-the-air updates must chain to (default: the "
                         "system store)")
    sp.add_argument("--update-deadline", type=float, metavar="SECONDS",
                    help="give up one update's download after this long (default 1800)")


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from device_agent.agent import Agent
    from device_agent.config import DEFAULT_CONFIG
    from device_agent.service.http import Server
    from device_agent.service.service import Service, load_config
    from device_agent.store.keys import KeySource
    from device_agent.telemetry.service import service_from_args

    keys = KeySource.from_env(args.kek_file)
    keys.require()  # fail at start (exit 2), not on the first query
    # The one configuration of this board: the defaults with the local --config settings.
    config = replace(DEFAULT_CONFIG, serve=load_config(args.config), commands=update_settings(args))
    agent = Agent(args.data_dir, keys, config=config)
    socket_path = Path(args.socket) if args.socket else default_socket(agent.store.socket_file, os.environ)
    service = Service(agent)  # agent.config.serve

    def telemetry_status() -> dict[str, Any]:
        """Heartbeat content: installed models and the service's counters (no clients, no inputs)."""
        svc = service.status_provider()
        counters = {**svc["counters"], "uptime_s": svc["uptime_s"], "integrity_ok": int(svc["integrity"] == "ok")}
        status = agent.status(check_files=False)
        return {**{k: status[k] for k in ("models", "box_fingerprint", "trust_fingerprint")}, "counters": counters}

    done = threading.Event()
    telemetry = service_from_args(
        args, service.events, status_provider=telemetry_status, config=config.telemetry,
        commands=agent.apply_commands, on_wiped=done.set, wipe_publish_s=config.commands.wipe_publish_s,
    )
    if telemetry is not None:
        from device_agent.commands.update import Updater

        # Over-the-air updates download in a worker, one at a time; what follows an update in its
        # delivery goes back to the telemetry loop, which carries out every other command.
        agent.updater = Updater(agent, redeliver=telemetry.redeliver)
        service.attach(telemetry)  # started after the first integrity check, stopped before the audit log
    server = Server(service, socket_path, args.listen)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with server:
        where = [str(socket_path)] + ([f"{a[0]}:{a[1]}" for a in [server.tcp_address] if a])
        print(f"serving on {', '.join(where)}", file=sys.stderr, flush=True)
        # A bare wait() may miss a signal taken by another thread; a wipe made by another process
        # (edgeward-agent wipe) ends the service too.
        while not done.wait(0.5) and agent.store.is_provisioned():
            pass
    if not agent.store.is_provisioned():
        print("the board was wiped: keys and models destroyed; see wipe-attestation.json and "
              "'edgeward-agent status'", file=sys.stderr, flush=True)
    return 0


def _tokens(args: argparse.Namespace) -> Any:
    """The board's tokens; they are sealed with the device keys, so these commands need them."""
    from device_agent.agent import Agent
    from device_agent.store.keys import KeySource

    return Agent(args.data_dir, KeySource.from_env(args.kek_file)).tokens()


def cmd_token_add(args: argparse.Namespace) -> int:
    from device_agent.store.datadir import utcnow

    rec, token = _tokens(args).add(args.role, utcnow())
    doc = {"id": rec.id, "role": rec.role, "token": token}
    emit(args, doc, lambda _doc: f"token {rec.id} ({rec.role}); shown once, store it now:\n{token}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    recs = [r.to_json() for r in _tokens(args).list()]
    for r in recs:
        r.pop("sha256")
    lines = [
        f"{r['id']}  {r['role']:<8}  created {r['created']}  "
        f"{'revoked ' + r['revoked'] if r['revoked'] else 'active'}"
        for r in recs
    ]
    emit(args, recs, lambda _doc: "\n".join(lines) or "no tokens")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from device_agent.store.datadir import utcnow

    rec = _tokens(args).revoke(args.id, utcnow())
    emit(args, {"id": rec.id, "revoked": True}, lambda _doc: f"token {rec.id} revoked")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from device_agent.service.audit import VerifyReport, verify
    from device_agent.store.datadir import DataDir

    d = DataDir(args.data_dir)
    d.require_provisioned()
    if not d.audit_dir.exists():
        # The service creates the log when it first starts: a board that never served has none.
        doc = {**VerifyReport(ok=True).to_json(), "started": False}
        emit(args, doc, lambda _doc: f"no audit log yet in {d.audit_dir}: the service has not served on this board "
             "(edgeward-agent serve starts the log). If it has served, the whole log was removed")
        return 0
    rep = verify(d.audit_dir)
    doc = {**rep.to_json(), "started": True}
    text = (
        f"audit log intact: {rep.records} records ({rep.first_seq}..{rep.last_seq}) "
        f"in {rep.segments} segment(s)"
        if rep.ok
        else "audit log NOT intact:\n  " + "\n  ".join(rep.problems)
    )
    if not rep.ok and not args.json:
        raise IntegrityError(text.replace("\n  ", "; "))
    emit(args, doc, lambda _doc: text)
    return 0 if rep.ok else IntegrityError.exit_code


def cmd_events(args: argparse.Namespace) -> int:
    from device_agent.service.events import EventStore
    from device_agent.store.datadir import DataDir

    d = DataDir(args.data_dir)
    d.require_provisioned()
    store = EventStore(d.events_file)
    try:
        events = [
            e
            for e in store.list(after_seq=args.after, limit=args.limit)
            if not args.kind or e.kind == args.kind
        ]
    finally:
        store.close()
    docs = [e.to_json() for e in events]
    lines = [
        f"{e['seq']:>6} {e['time']} {e['kind']:<10} {e['severity']:<8} {e['client'] or '-':<10} "
        f"{e['score'] if e['score'] is not None else '-'}  "
        f"{json.dumps(e['evidence'], sort_keys=True)}"
        for e in docs
    ]
    emit(args, docs, lambda _doc: "\n".join(lines) or "no events")
    return 0


def register(sub: Any) -> None:
    """Add the service's commands to the agent CLI's sub-parsers."""

    def add(parent: Any, name: str, help_: str, fn: Any) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_, description=help_)
        sp.add_argument("--data-dir", required=True, help="the board's data directory")
        sp.set_defaults(func=fn)
        return sp

    sp = add(
        sub,
        "serve",
        "serve predictions on a local API (Unix socket; loopback TCP when asked)",
        cmd_serve,
    )
    sp.add_argument(
        "--socket",
        help="Unix socket path, mode 0660 (default: $RUNTIME_DIRECTORY/agent.sock when systemd gives the "
        "service a runtime directory, else DATA_DIR/agent.sock, which only the agent's user can reach)",
    )
    sp.add_argument("--listen", help="also listen on loopback TCP, e.g. 127.0.0.1:8470")
    sp.add_argument("--config", help="local service settings (JSON): limits can only be tightened")
    from device_agent.telemetry.service import add_broker_arguments

    add_broker_arguments(sp, required=False)  # with --broker, signed telemetry goes to the fleet
    add_update_arguments(sp)
    sp.add_argument("--kek-file", help="32-byte key-encryption key file (instead of a passphrase)")

    tok = sub.add_parser(
        "token",
        help="manage API bearer tokens (needs the device keys: the token list is sealed with them)",
    ).add_subparsers(dest="token_cmd", required=True)
    kek_help = "32-byte key-encryption key file (instead of EDGEWARD_DEVICE_PASSPHRASE)"
    sp = add(
        tok,
        "add",
        "create a token for a role; it is printed once and stored only as a hash",
        cmd_token_add,
    )
    sp.add_argument("--role", required=True, choices=["user", "engineer", "admin"])
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--kek-file", help=kek_help)
    sp = add(tok, "list", "list tokens (ids and roles; never the tokens)", cmd_token_list)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--kek-file", help=kek_help)
    sp = add(
        tok,
        "revoke",
        "revoke a token by id (a running service stops accepting it at once)",
        cmd_token_revoke,
    )
    sp.add_argument("id")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--kek-file", help=kek_help)

    aud = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="audit_cmd", required=True
    )
    sp = add(
        aud,
        "verify",
        "check every record, link and the checkpoint; exit 1 if tampered",
        cmd_audit_verify,
    )
    sp.add_argument("--json", action="store_true")

    sp = add(sub, "events", "list detections and refusals recorded on this board", cmd_events)
    sp.add_argument("--after", type=int, default=0, help="only events after this sequence number")
    sp.add_argument(
        "--kind", help="only events of this kind (ood, extraction, probing, rate, integrity...)"
    )
    sp.add_argument("--limit", type=int, default=1000)
    sp.add_argument("--json", action="store_true")
