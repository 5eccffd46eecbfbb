"""Every name an attacker chooses -- device ids, model ids, bundle ids, profile names, MQTT topic
levels, token ids and roles -- with path traversal, topic wildcards or control characters: each
is refused where it enters (provisioning, a signed manifest, a signed command, an enrolment, the
token commands), nothing is written outside the data directory, and the board's trusted state
does not change. No name from a bundle, a command or a message ever becomes a path
(``device_agent/store/layout.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent import crypto
from device_agent.bundle.enrolment import DOMAIN as ENROLMENT_DOMAIN
from device_agent.bundle.enrolment import Enrolment
from device_agent.commands.format import COMMAND_DOMAIN, COMMAND_MAGIC, results_topic
from device_agent.store.keys import DeviceKeys
from device_agent.wire import ID_RE, canonical_json
from tests.adversarial.conftest import Target
from tests.adversarial.forge import resign
from tests.fixtures.trusted import DAY0, refused_cli

HOSTILE = [
    "../../etc/passwd", "..", "a/b", "pi-001/../../x", "/abs", "pi\\x", "pi-1\n", "pi-1\r", "pi\x00x",
    "pi\x1b[2J", "+", "#", "pi/+/#", "", " pi", "é", "a" * 65, "-leading-dash", ".hidden",
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_device_id_is_refused_at_provisioning(
    tmp_path: Path, publisher: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    kek = tmp_path / "kek.bin"
    kek.write_bytes(bytes(32))
    before = _tree(tmp_path)
    data = tmp_path / "board"
    refused_cli(capsys, data, ["provision", "--data-dir", str(data), f"--device-id={name}", "--publisher-pub",
                               str(publisher / "publisher.pub"), "--export", str(tmp_path / "e.json"),
                               "--kek-file", str(kek)], 2, "device id must be 1-64 characters")
    assert _tree(tmp_path) == before  # no data dir, no enrolment, nothing elsewhere


def test_hostile_names_in_a_validly_signed_manifest_are_refused(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target.install(1)
    good = target.bundle(2)
    outside = _tree(tmp_path)
    for field in ("model_id", "device_id", "profile", "bundle_id"):
        for name in ("../../state", "a/b", "pi-1\n", "\x1b[2J", "+/#"):
            data = resign(good, target.publisher, **{field: name})
            f = tmp_path / "hostile.ewb"
            f.write_bytes(data)
            refused_cli(capsys, target.data_dir, target.cli("install", str(f)), 3, f"{field} has an invalid value")
    assert _tree(tmp_path) - outside <= {"hostile.ewb"}


def _signed_raw_command(target: Target, body: dict[str, object]) -> bytes:
    """A command body the format would never build, signed by the board's own operator."""
    raw = canonical_json(body)
    op = target.operator
    return COMMAND_MAGIC + crypto.key_id(op.public) + crypto.sign(op.key, COMMAND_DOMAIN, raw) + raw


@pytest.mark.parametrize(("device", "args", "field"), [
    ("pi-001/#", {"model_id": "digits"}, "device_id"),
    ("pi-001\n", {"model_id": "digits"}, "device_id"),
    ("pi-001", {"model_id": "../state"}, "model_id"),
    ("pi-001", {"model_id": "digits\x00"}, "model_id"),
])
def test_hostile_names_in_a_signed_command_are_refused(
    target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, args: dict[str, str],
    field: str,
) -> None:
    target.install(1)
    body = {"schema": "edgeward.command/1", "kind": "retire", "device_id": device, "seq": 1,
            "issued": "2027-01-01T00:00:00Z", "expires": "2027-02-01T00:00:00Z", "nonce": "ab" * 16, "args": args}
    f = tmp_path / "c.cmd"
    f.write_bytes(_signed_raw_command(target, body))
    refused_cli(capsys, target.data_dir, target.cli("command", str(f), "--result", str(tmp_path / "r")), 3,
                f"{field} has an invalid value")


@pytest.mark.parametrize("name", ["../../evil", "pi/+", "pi-1\n"])
def test_a_validly_signed_enrolment_with_a_hostile_device_id_is_refused_by_pack(
    target: Target, tmp_path: Path, publisher: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """The enrolment is signed by the device's own key, so anyone can make one: the packager
    refuses the name before it becomes ``DIR/<device-id>.ewb``."""
    from packager.cli import main as host_main

    dk = DeviceKeys.generate()
    box_public = crypto.box_public_from_private(dk.box_private)
    enrolment = Enrolment(name, box_public, crypto.ed25519_public_raw(dk.signer()), DAY0)
    signed = enrolment.signed_bytes(crypto.sign(dk.signer(), ENROLMENT_DOMAIN, canonical_json(enrolment.body())))
    (tmp_path / "evil.json").write_bytes(signed)
    out = tmp_path / "out"
    refused_cli(capsys, tmp_path / "nothing", ["pack", str(target.model), "--profile", "rpi4b", "--publisher-key",
                                               str(publisher / "publisher.key"), "--device",
                                               str(tmp_path / "evil.json"), "--model-version", "1", "--out", str(out)],
                3, "device_id has an invalid value", main=host_main)
    assert not out.exists()


def test_topic_levels_come_only_from_validated_device_ids() -> None:
    """A board's MQTT topics are built from its device id, which provisioning, enrolments and
    commands all check against one pattern: no '/', '+' or '#' can add or match a level."""
    for name in HOSTILE:
        assert not ID_RE.match(name), name
    assert results_topic("pi-001").split("/") == ["edgeward", "v1", "pi-001", "results"]


def test_hostile_token_ids_and_roles_are_refused(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = target.agent()
    agent.tokens().add("user", datetime.now(UTC) - timedelta(days=1))
    for name in ("../tokens.json", "*", "ab\ncd", "\x1b[2J"):
        refused_cli(capsys, target.data_dir, target.cli("token", "revoke", name), 2, "no active token with id")
    for role in ("root", "admin\n", "../admin"):
        refused_cli(capsys, target.data_dir, target.cli("token", "add", f"--role={role}"), 2, "invalid choice")

