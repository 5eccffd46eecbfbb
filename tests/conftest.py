"""Shared fixtures: real keys, real models, real provisioned boards in tmp dirs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from device_agent.store.keys import KeySource
from tests.fixtures.models import Digits, build_digits, silero_vad_onnx

CACHE = Path(__file__).parent / ".fixtures-cache"
PASSPHRASE = b"correct horse battery staple"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EDGEWARD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long run: scripts/test.sh --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The digits MLP (ONNX) trained by the project's own script, cached between runs."""
    return build_digits(CACHE / "digits")


@pytest.fixture(scope="session")
def digits_test(digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(digits.test)
    return z["x"], z["y"]


@pytest.fixture(scope="session")
def silero_path() -> Path:
    return silero_vad_onnx()


@pytest.fixture(scope="session")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A publisher key pair directory (publisher.key, publisher.pub), unencrypted."""
    from packager.keys import generate

    d = tmp_path_factory.mktemp("publisher")
    os.environ.pop("EDGEWARD_PASSPHRASE", None)
    generate("publisher", d, unencrypted=True)
    return d


@pytest.fixture
def keys() -> KeySource:
    return KeySource(passphrase=PASSPHRASE)


@dataclass
class Board:
    data_dir: Path
    enrolment: Path
    device_id: str
    keys: KeySource

    def agent(self, **kw: object) -> Agent:
        return Agent(self.data_dir, self.keys, **kw)  # type: ignore[arg-type]


@pytest.fixture
def make_board(tmp_path: Path, publisher: Path, keys: KeySource) -> Callable[..., Board]:
    """Provision a fresh board trusting the session publisher."""
    from device_agent.bundle.keyfiles import load_public_key_file

    def make(device_id: str = "pi-001", key_source: KeySource | None = None) -> Board:
        d = tmp_path / f"board-{device_id}"
        enrolment = tmp_path / f"{device_id}.json"
        pub = load_public_key_file(publisher / "publisher.pub")
        src = key_source or keys
        enrolment.write_bytes(Agent.provision(d, device_id, [pub], [], src))
        return Board(d, enrolment, device_id, src)

    return make


@pytest.fixture
def pack_for(tmp_path: Path, publisher: Path) -> Callable[..., Path]:
    """Pack a model for boards with the real `edgeward pack` code path; returns the out dir."""
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    counter = iter(range(10**6))

    def do(model: Path, boards: list[Board], version: int = 1, profile: str = "rpi4b", **opts: object) -> Path:
        out = tmp_path / f"out-{next(counter)}"
        task = dict(opts.pop("task", {}))  # type: ignore[call-overload]
        learnable = opts.pop("learnable", None)
        m = read_model(model)
        task = infer_task(m, task)
        if learnable is not None:  # (data .npz path, {"bounds": ..., "enabled": ..., "carry_feedback": ...})
            from packager.learnable import apply as make_learnable

            data, given = learnable  # type: ignore[misc]
            policy = dict(opts.pop("policy", {}))  # type: ignore[call-overload]
            policy["learning"] = dict(given)
            m, policy = make_learnable(m, task, {}, policy, str(data))
            opts["policy"] = policy
        pack(
            m,
            load_profile(profile),
            FileSigner(load_private_key(publisher / "publisher.key")),
            load_enrolments([b.enrolment for b in boards]),
            PackOptions(model_id=str(opts.pop("model_id", "digits")), model_version=version,
                        task=task, **opts),  # type: ignore[arg-type]
            out,
        )
        return out

    return do


@pytest.fixture
def release_for(tmp_path: Path, publisher: Path) -> Callable[..., Path]:
    """Pack a model as one version 2 release for boards with the real `edgeward pack --layout
    shared` code path; returns the out dir (payload.ewp, envelopes/<id>.ewe, release.json)."""
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions
    from packager.profiles import load_profile
    from packager.release import pack_release
    from packager.signers import FileSigner

    counter = iter(range(10**6))

    def do(model: Path, boards: list[Board], version: int = 1, profile: str = "rpi4b",
           layout: str = "shared", **opts: object) -> Path:
        out = tmp_path / f"release-{next(counter)}"
        m = read_model(model)
        task = infer_task(m, dict(opts.pop("task", {})))  # type: ignore[call-overload]
        pack_release(
            m,
            load_profile(profile),
            FileSigner(load_private_key(publisher / "publisher.key")),
            [b.enrolment for b in boards],
            PackOptions(model_id=str(opts.pop("model_id", "digits")), model_version=version,
                        task=task, **opts),  # type: ignore[arg-type]
            out,
            layout=layout,
        )
        return out

    return do


def tree_snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mode and bytes: equal snapshots mean nothing changed."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
