"""Firmware profiles: validated per-board facts that choose the cipher, runtime and limits.

A profile lists every runtime the board has (``runtimes``) and the one to convert to when there
is a choice (``preferred_runtime``); the model's format picks the runtime a bundle uses
(:meth:`Profile.runtime_for`). Profiles written for release 0.1 name one ``runtime``: they are
read as a board with that runtime only.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from device_agent import crypto
from device_agent.bundle.format import RUNTIME_OF_FORMAT, RUNTIMES
from device_agent.errors import FormatError, UsageError
from device_agent.wire import ID_RE

ARCHES = ("aarch64", "armv7l", "x86_64")
QUANTISATIONS = ("none", "dynamic", "static")
STORAGE = ("sd", "emmc", "nvme", "ssd", "usb")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    ram_mb: int
    has_aes: bool
    runtimes: tuple[str, ...]
    preferred_runtime: str
    threads: int
    quantisation: str
    max_model_bytes: int
    storage: str
    python: str

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> FormatError:
            return FormatError(f"profile {self.name!r}: {field} {why}")

        if not ID_RE.match(self.name):
            raise bad("name", "must be a simple identifier")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "runtimes":
                if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
                    raise bad("runtimes", "must be a non-empty list of runtime names")
                continue
            want = {"int": int, "bool": bool, "str": str}[str(f.type)]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise bad(f.name, f"must be {f.type}")
        if self.arch not in ARCHES:
            raise bad("arch", f"must be one of {', '.join(ARCHES)}")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown or len(set(self.runtimes)) != len(self.runtimes):
            raise bad("runtimes", f"must be distinct names among {', '.join(RUNTIMES)}")
        if self.preferred_runtime not in self.runtimes:
            raise bad("preferred_runtime", f"must be one of its runtimes ({', '.join(self.runtimes)})")
        if self.quantisation not in QUANTISATIONS:
            raise bad("quantisation", f"must be one of {', '.join(QUANTISATIONS)}")
        if self.storage not in STORAGE:
            raise bad("storage", f"must be one of {', '.join(STORAGE)}")
        if not 1 <= self.cores <= 256 or not 64 <= self.ram_mb <= 1 << 22:
            raise bad("cores/ram_mb", "are out of range")
        if not 0 <= self.threads <= self.cores:
            raise bad("threads", "must be between 0 (runtime default) and cores")
        if self.max_model_bytes < 1024:
            raise bad("max_model_bytes", "is too small")

    @property
    def cipher(self) -> str:
        """AES-GCM only where the CPU has AES instructions; ChaCha20-Poly1305 everywhere else."""
        return crypto.AES256GCM if self.has_aes else crypto.CHACHA20

    def runtime_for(self, model_format: str) -> str:
        """The runtime that runs a ``model_format`` model on this board, or a UsageError when the
        board does not have it."""
        runtime = RUNTIME_OF_FORMAT[model_format]
        if runtime not in self.runtimes:
            preferred = next(f for f, r in RUNTIME_OF_FORMAT.items() if r == self.preferred_runtime)
            raise UsageError(
                f"profile {self.name} has {' and '.join(self.runtimes)}, not {runtime} "
                f"that a {model_format} model needs; convert the model to {preferred} "
                "or pick a profile with that runtime"
            )
        return runtime

    def to_json(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _parse(data: bytes, source: str) -> Profile:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FormatError(f"profile {source} is not valid TOML: {e}") from e
    if isinstance(raw.get("runtimes"), list):
        raw["runtimes"] = tuple(raw["runtimes"])
    if "runtime" in raw and "runtimes" not in raw and "preferred_runtime" not in raw:
        # A release 0.1 profile: one runtime, which is then also the preferred one.
        raw["runtimes"] = (raw["runtime"],)
        raw["preferred_runtime"] = raw.pop("runtime")
    names = {f.name for f in fields(Profile)}
    unknown, missing = set(raw) - names, names - set(raw)
    if unknown or missing:
        raise FormatError(
            f"profile {source}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}"
        )
    return Profile(**raw)


def builtin_profiles() -> dict[str, Profile]:
    out = {}
    for entry in resources.files("firmware_profiles").iterdir():
        if entry.name.endswith(".toml"):
            p = _parse(entry.read_bytes(), entry.name)
            if entry.name != f"{p.name}.toml":
                raise FormatError(f"profile file {entry.name} must be named after its profile {p.name!r}")
            out[p.name] = p
    return out


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a custom profile from a ``.toml`` path."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"profile file {path} does not exist")
        return _parse(path.read_bytes(), str(path))
    known = builtin_profiles()
    if name_or_path not in known:
        raise UsageError(
            f"unknown profile {name_or_path!r}; known profiles: {', '.join(sorted(known))} "
            "(or pass a .toml file)"
        )
    return known[name_or_path]
