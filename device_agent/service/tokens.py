"""Bearer tokens for the local API (NCSC 3.1: answer only whom you should).

A token is shown once when created and stored only as its SHA-256: the token carries 256 bits
from ``secrets``, so a fast hash is enough (no password stretching is needed) and a stolen
``tokens.json`` lets nobody call the API. Look-ups compare digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from device_agent.errors import FormatError, UsageError
from device_agent.runtime.output import ROLES
from device_agent.store import layout
from device_agent.store.datadir import DataDir
from device_agent.trust.state import TOKENS_SCHEMA
from device_agent.wire import HEX64_RE, format_time, obj_fields, parse_time, str_field

PREFIX = "ewt_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """One client's token as stored: an id (safe to show and log), its role and digest."""

    id: str
    role: str
    sha256: str
    created: datetime
    revoked: datetime | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise FormatError(f"token {self.id} has unknown role {self.role!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "sha256": self.sha256,
            "created": format_time(self.created),
            "revoked": format_time(self.revoked) if self.revoked else None,
        }

    @classmethod
    def from_json(cls, raw: Any) -> TokenRecord:
        fields = {"id", "role", "sha256", "created", "revoked"}
        r = obj_fields(raw, "token record", fields, fields)
        return cls(
            id=str_field(r["id"], "token id", limit=16),
            role=str_field(r["role"], "token role", limit=16),
            sha256=str_field(r["sha256"], "token digest", HEX64_RE),
            created=parse_time(r["created"], "created"),
            revoked=parse_time(r["revoked"], "revoked") if r["revoked"] is not None else None,
        )


class TokenStore:
    """``D/tokens.json`` (0600, sealed with the board's key: a token planted on the SD card is
    refused). Re-read when the file changes, so a revocation made with the CLI takes effect in a
    running service at the next request."""

    def __init__(self, data: DataDir, key: bytes | bytearray) -> None:
        self._data = data
        self.path = data.tokens_file
        self._key = key
        self._stamp: tuple[int, int, int] | None = None
        self._records: list[TokenRecord] = []

    def _load(self) -> list[TokenRecord]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._records = None, []
            return self._records
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            raw = self._data.read_sealed(layout.TOKENS, self._key)  # TamperedState if edited
            doc = obj_fields(raw, "tokens.json", {"schema", "tokens"}, {"schema", "tokens"})
            if doc["schema"] != TOKENS_SCHEMA or not isinstance(doc["tokens"], list):
                raise FormatError(f"{self.path} is not {TOKENS_SCHEMA}; recreate the tokens")
            self._records = [TokenRecord.from_json(r) for r in doc["tokens"]]
            self._stamp = stamp
        return self._records

    def _save(self, records: list[TokenRecord]) -> None:
        doc = {"schema": TOKENS_SCHEMA, "tokens": [r.to_json() for r in records]}
        self._data.write_sealed(layout.TOKENS, doc, self._key)
        self._stamp = None

    def add(self, role: str, now: datetime) -> tuple[TokenRecord, str]:
        """Create a token for ``role``; returns the record and the token (shown once, not kept)."""
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        token = PREFIX + secrets.token_urlsafe(32)
        rec = TokenRecord(id=secrets.token_hex(4), role=role, sha256=digest(token), created=now)
        self._save([*self._load(), rec])
        return rec, token

    def list(self) -> list[TokenRecord]:
        return list(self._load())

    def revoke(self, token_id: str, now: datetime) -> TokenRecord:
        records = self._load()
        for i, r in enumerate(records):
            if r.id == token_id and r.revoked is None:
                new = TokenRecord(r.id, r.role, r.sha256, r.created, now)
                self._save([*records[:i], new, *records[i + 1 :]])
                return new
        raise UsageError(f"no active token with id {token_id!r}; see 'edgeward-agent token list'")

    def authenticate(self, token: str) -> TokenRecord | None:
        """The active record for ``token``, or None; every digest is compared in constant time."""
        want = digest(token)
        found = None
        for r in self._load():
            if hmac.compare_digest(r.sha256, want) and r.revoked is None:
                found = r
        return found
