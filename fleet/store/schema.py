"""The monitor store's schema, as numbered migrations for each engine.

A store records the last migration it ran (SQLite: ``PRAGMA user_version``; PostgreSQL: the
``edgeward_schema`` table). On open, every later migration runs, in order, in one transaction;
a store written by a newer EdgeWard is refused. Migrations only ever add: a release never
rewrites a step that has shipped.

1. the tables of release 0.1 (devices, reports once per (device, seq), security events);
2. retention: indexes on the time the monitor received each row; security events once per
   (topic, payload digest, kind), with a repeat count (a store's existing repeats are folded);
3. alerts: one row per security event a monitor claimed for the webhook (primary key: the event),
   so that with several monitors each event is sent once;
4. rollouts: one row per over-the-air rollout of a release (its stages, where it stands, halted
   or done, and the shared payload of a version 2 release) and one per board in it (its place in
   the order, its stage, its file, its update command and what the board answered) --
   ``fleet/rollout.py``.
"""

from __future__ import annotations

SQLITE: dict[int, list[str]] = {
    1: [
        "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, first_seen TEXT NOT NULL, "
        "last_seen TEXT NOT NULL, highest_seq INTEGER NOT NULL DEFAULT 0, "
        "state TEXT NOT NULL DEFAULT 'online', state_seq INTEGER NOT NULL DEFAULT 0, "
        "status TEXT NOT NULL DEFAULT '{}', counters_seq INTEGER NOT NULL DEFAULT 0, "
        "counters TEXT NOT NULL DEFAULT '{}', received INTEGER NOT NULL DEFAULT 0, "
        "duplicates INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS reports (device_id TEXT NOT NULL, seq INTEGER NOT NULL, "
        "kind TEXT NOT NULL, time TEXT NOT NULL, received TEXT NOT NULL, digest TEXT NOT NULL, "
        "data TEXT NOT NULL, PRIMARY KEY (device_id, seq))",
        "CREATE INDEX IF NOT EXISTS reports_time ON reports (kind, time)",
        "CREATE TABLE IF NOT EXISTS security (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "received TEXT NOT NULL, device_id TEXT, kind TEXT NOT NULL, severity TEXT NOT NULL, "
        "detail TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER, digest TEXT NOT NULL)",
    ],
    2: [
        "CREATE INDEX IF NOT EXISTS reports_received ON reports (received)",
        "CREATE INDEX IF NOT EXISTS security_received ON security (received)",
        "ALTER TABLE security ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1",
        "UPDATE security SET repeats = (SELECT COUNT(*) FROM security s WHERE s.topic = "
        "security.topic AND s.digest = security.digest AND s.kind = security.kind) "
        "WHERE id IN (SELECT MIN(id) FROM security GROUP BY topic, digest, kind)",
        "DELETE FROM security WHERE id NOT IN (SELECT MIN(id) FROM security GROUP BY topic, digest, kind)",
        "CREATE UNIQUE INDEX IF NOT EXISTS security_once ON security (topic, digest, kind)",
    ],
    3: [
        "CREATE TABLE IF NOT EXISTS alerts (event_key TEXT PRIMARY KEY, claimed_by TEXT NOT NULL, "
        "claimed_at TEXT NOT NULL, sent_at TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
        "last_error TEXT NOT NULL DEFAULT '')",
    ],
    4: [
        "CREATE TABLE IF NOT EXISTS rollouts (release_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, "
        "model_version INTEGER NOT NULL, base_url TEXT NOT NULL, stages TEXT NOT NULL, "
        "max_failures INTEGER NOT NULL, stage_timeout_s INTEGER NOT NULL, created TEXT NOT NULL, "
        "state TEXT NOT NULL, stage INTEGER NOT NULL, stage_started TEXT NOT NULL, updated TEXT NOT NULL, "
        "detail TEXT NOT NULL DEFAULT '', payload_url TEXT, payload_length INTEGER, payload_sha256 TEXT)",
        "CREATE TABLE IF NOT EXISTS rollout_devices (release_id TEXT NOT NULL, device_id TEXT NOT NULL, "
        "position INTEGER NOT NULL, stage INTEGER NOT NULL, url TEXT NOT NULL, length INTEGER NOT NULL, "
        "sha256 TEXT NOT NULL, state TEXT NOT NULL, seq INTEGER, command_sha256 TEXT, issued TEXT, "
        "updated TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (release_id, device_id))",
        "CREATE INDEX IF NOT EXISTS rollout_devices_state ON rollout_devices (state, device_id)",
    ],
}

POSTGRESQL: dict[int, list[str]] = {
    1: [
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen TEXT NOT NULL, "
        "last_seen TEXT NOT NULL, highest_seq BIGINT NOT NULL DEFAULT 0, "
        "state TEXT NOT NULL DEFAULT 'online', state_seq BIGINT NOT NULL DEFAULT 0, "
        "status TEXT NOT NULL DEFAULT '{}', counters_seq BIGINT NOT NULL DEFAULT 0, "
        "counters TEXT NOT NULL DEFAULT '{}', received BIGINT NOT NULL DEFAULT 0, "
        "duplicates BIGINT NOT NULL DEFAULT 0)",
        "CREATE TABLE reports (device_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, "
        "time TEXT NOT NULL, received TEXT NOT NULL, digest TEXT NOT NULL, data TEXT NOT NULL, "
        "PRIMARY KEY (device_id, seq))",
        "CREATE INDEX reports_time ON reports (kind, time)",
        "CREATE TABLE security (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "received TEXT NOT NULL, device_id TEXT, kind TEXT NOT NULL, severity TEXT NOT NULL, "
        "detail TEXT NOT NULL, topic TEXT NOT NULL, seq BIGINT, digest TEXT NOT NULL)",
    ],
    2: [
        "CREATE INDEX reports_received ON reports (received)",
        "CREATE INDEX security_received ON security (received)",
        "ALTER TABLE security ADD COLUMN repeats BIGINT NOT NULL DEFAULT 1",
        "CREATE UNIQUE INDEX security_once ON security (topic, digest, kind)",
    ],
    3: [
        "CREATE TABLE alerts (event_key TEXT PRIMARY KEY, claimed_by TEXT NOT NULL, "
        "claimed_at TEXT NOT NULL, sent_at TEXT, attempts BIGINT NOT NULL DEFAULT 0, "
        "last_error TEXT NOT NULL DEFAULT '')",
    ],
    4: [
        "CREATE TABLE rollouts (release_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, "
        "model_version BIGINT NOT NULL, base_url TEXT NOT NULL, stages TEXT NOT NULL, "
        "max_failures BIGINT NOT NULL, stage_timeout_s BIGINT NOT NULL, created TEXT NOT NULL, "
        "state TEXT NOT NULL, stage BIGINT NOT NULL, stage_started TEXT NOT NULL, updated TEXT NOT NULL, "
        "detail TEXT NOT NULL DEFAULT '', payload_url TEXT, payload_length BIGINT, payload_sha256 TEXT)",
        "CREATE TABLE rollout_devices (release_id TEXT NOT NULL, device_id TEXT NOT NULL, "
        "position BIGINT NOT NULL, stage BIGINT NOT NULL, url TEXT NOT NULL, length BIGINT NOT NULL, "
        "sha256 TEXT NOT NULL, state TEXT NOT NULL, seq BIGINT, command_sha256 TEXT, issued TEXT, "
        "updated TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (release_id, device_id))",
        "CREATE INDEX rollout_devices_state ON rollout_devices (state, device_id)",
    ],
}

LATEST = max(SQLITE)
if max(POSTGRESQL) != LATEST:  # both engines carry every migration
    raise RuntimeError("the SQLite and PostgreSQL migrations are out of step")


def pending(found: int, steps: dict[int, list[str]], where: str) -> list[str]:
    """The statements that bring a store at migration ``found`` to :data:`LATEST`."""
    from device_agent.errors import EnvironmentFault

    if found > LATEST:
        raise EnvironmentFault(
            f"{where} was written by a newer EdgeWard (store version {found}, this release reads "
            f"{LATEST}); upgrade EdgeWard on this machine"
        )
    return [s for v in range(found + 1, LATEST + 1) for s in steps[v]]
