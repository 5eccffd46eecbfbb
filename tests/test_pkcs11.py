"""Signing through PKCS#11: publisher and operator keys made and kept inside a real SoftHSM2 token.

Every test here talks to Debian's SoftHSM2 (PKCS#11 3.0, CKM_EDDSA) through python-pkcs11, with a
token the module creates in a temporary directory. The boards that install the bundles and obey the
commands are real provisioned data directories, verifying with the unchanged board code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.cli import main as agent_cli
from device_agent.errors import EnvironmentFault, UsageError
from fleet.ca import FleetHome
from packager.cli import main as edgeward
from packager.signers import (
    PIN_ENV,
    SIGN_MECHANISM,
    Pkcs11Signer,
    open_signer,
    parse_pkcs11_uri,
    require_mechanisms,
)
from tests.conftest import PASSPHRASE

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN = "edgeward-ci"
PIN = "4711-ci-pin"

pytestmark = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not MODULE.exists(),
    reason="needs Debian's softhsm2 (scripts/test.sh installs it: apt-get install softhsm2)",
)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh SoftHSM2 token in a temporary directory, its module and PIN in the environment
    the way a CI job sets them (the PIN from a secret, never on a command line)."""
    import pkcs11

    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.setenv("EDGEWARD_PKCS11_MODULE", str(MODULE))
        mp.setenv(PIN_ENV, PIN)
        mp.delenv("EDGEWARD_PASSPHRASE", raising=False)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin",
                        "so-" + PIN], check=True, capture_output=True)
        pkcs11.lib(str(MODULE)).reinitialize()  # this process may have loaded the module with another config
        yield d / "tokens"


def uri(label: str) -> str:
    return f"pkcs11:token={TOKEN};object={label}"


def private_key_attributes(label: str) -> dict[str, Any]:
    """What the token itself says about the private key object (read back, not assumed)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    tok = pkcs11.lib(str(MODULE)).get_token(token_label=TOKEN)
    with tok.open(user_pin=PIN) as s:
        [key] = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        attrs = {a.name: bool(key[a]) for a in (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                                                Attribute.NEVER_EXTRACTABLE, Attribute.TOKEN, Attribute.PRIVATE)}
        try:
            key[Attribute.VALUE]
            attrs["VALUE_readable"] = True
        except pkcs11.exceptions.AttributeSensitive:
            attrs["VALUE_readable"] = False
    return attrs


def no_private_key_file(root: Path, token_dir: Path) -> list[Path]:
    """Files under ``root`` (outside the token's own store) that hold a PEM or PKCS#8 private key."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and token_dir not in p.parents:
            data = p.read_bytes()
            if b"PRIVATE KEY" in data or b"ENCRYPTED" in data:
                found.append(p)
    return found


def provision(tmp_path: Path, device_id: str, publisher_pub: Path, operator_pub: Path | None = None) -> Path:
    from device_agent.store.keys import KeySource

    enrolment = tmp_path / f"{device_id}.json"
    operators = [load_public_key_file(operator_pub)] if operator_pub else []
    enrolment.write_bytes(Agent.provision(tmp_path / f"board-{device_id}", device_id,
                                          [load_public_key_file(publisher_pub)], operators,
                                          KeySource(passphrase=PASSPHRASE)))
    return enrolment


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = edgeward(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the whole path: generate in the token, pack for several boards, install -----------------------


def test_a_publisher_key_made_in_the_token_packs_bundles_that_boards_install(
    token: Path, tmp_path: Path, digits: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-a"), "--out", str(tmp_path / "keys"),
                         "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["private"] is None and made["uri"].startswith(uri("publisher-a") + ";id=%")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["publisher.pub"]
    # The token says the key cannot leave it, and refuses to hand over its value.
    assert private_key_attributes("publisher-a") == {
        "SENSITIVE": True, "EXTRACTABLE": False, "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True,
        "TOKEN": True, "PRIVATE": True, "VALUE_readable": False,
    }

    boards = [provision(tmp_path, f"pi-{i}", tmp_path / "keys" / "publisher.pub") for i in range(3)]
    argv = ["pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key", uri("publisher-a"),
            "--model-id", "digits", "--model-version", "1", "--out", str(tmp_path / "release"), "--json"]
    for b in boards:
        argv += ["--device", str(b)]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads(out)
    assert report["publisher"] == made["fingerprint"] and report["publisher_signer"] == uri("publisher-a")
    assert len(report["bundles"]) == 3

    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", PASSPHRASE.decode())
    for i in range(3):
        bundle = tmp_path / "release" / f"pi-{i}.ewb"
        code, _, err = run(capsys, "inspect", str(bundle), "--publisher-pub", str(tmp_path / "keys" / "publisher.pub"))
        assert code == 0, err
        assert agent_cli(["install", str(bundle), "--data-dir", str(tmp_path / f"board-pi-{i}")]) == 0
    assert no_private_key_file(tmp_path, token) == []


def test_an_operator_key_in_the_token_signs_commands_boards_obey(
    token: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating the boards' publisher key with an operator key that lives in the token."""
    from packager.keys import generate

    assert run(capsys, "keys", "operator", "--pkcs11", uri("operator-a"), "--out", str(tmp_path / "ops"))[0] == 0
    generate("publisher", tmp_path / "old", unencrypted=True)
    generate("publisher", tmp_path / "new", unencrypted=True)
    enrolment = provision(tmp_path, "pi-rot", tmp_path / "old" / "publisher.pub", tmp_path / "ops" / "operator.pub")
    home = FleetHome(tmp_path / "fleet")
    home.init_ca(unencrypted=True)
    home.enrol_device(enrolment.read_bytes(), "pi-rot")

    code, _, err = run(capsys, "fleet", "rotate-key", "--role", "publisher", "--new-pub",
                       str(tmp_path / "new" / "publisher.pub"), "--device", "pi-rot", "--operator-key",
                       uri("operator-a"), "--out", str(tmp_path / "pi-rot.commands"), "--fleet-dir", str(home.path))
    assert code == 0, err
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", PASSPHRASE.decode())
    assert agent_cli(["command", str(tmp_path / "pi-rot.commands"), "--data-dir", str(tmp_path / "board-pi-rot"),
                      "--result", str(tmp_path / "result")]) == 0
    from device_agent.store.keys import KeySource

    anchors = Agent(tmp_path / "board-pi-rot", KeySource(passphrase=PASSPHRASE)).trust_anchors()
    assert list(anchors.publishers) == [load_public_key_file(tmp_path / "new" / "publisher.pub")]
    # The only private key files are those this test made as files (two publisher keys, the fleet
    # CA and its TLS keys): none for the operator.
    assert sorted(p.name for p in (tmp_path / "ops").iterdir()) == ["operator.pub"]
    assert {p.relative_to(tmp_path).parts[0] for p in no_private_key_file(tmp_path, token)} == {"old", "new", "fleet"}


# --- refusals ---------------------------------------------------------------------------------------


def test_a_wrong_pin_or_a_missing_object_is_refused_and_writes_nothing(
    token: Path, tmp_path: Path, digits: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-b"), "--out", str(tmp_path / "keys"))[0] == 0
    board = provision(tmp_path, "pi-x", tmp_path / "keys" / "publisher.pub")
    out = tmp_path / "release"

    def pack(signer: str) -> tuple[int, str]:
        code, _, err = run(capsys, "pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key", signer,
                           "--device", str(board), "--model-version", "1", "--out", str(out))
        return code, err

    monkeypatch.setenv(PIN_ENV, "not-the-pin")
    code, err = pack(uri("publisher-b"))
    assert code == 2 and "refused the PIN" in err and PIN_ENV in err
    monkeypatch.setenv(PIN_ENV, PIN)
    code, err = pack(uri("no-such-key"))
    assert code == 2 and "holds no private key" in err and "object=no-such-key" in err
    code, err = pack("pkcs11:token=no-such-token;object=publisher-b")
    assert code == 2 and "no PKCS#11 token matches" in err and TOKEN in err
    code, err = pack(uri("publisher-b") + f"?pin-value={PIN}")
    assert code == 2 and "pin-value" in err
    assert PIN not in err  # the refusal does not echo the PIN it was given
    monkeypatch.delenv(PIN_ENV)
    code, err = pack(uri("publisher-b"))
    assert code == 2 and f"set {PIN_ENV}" in err
    assert not out.exists()
    # The key is still there, and signs once the PIN is right.
    monkeypatch.setenv(PIN_ENV, PIN)
    assert pack(uri("publisher-b"))[0] == 0 and (out / "pi-x.ewb").is_file()


def test_the_pin_can_come_from_a_file_only_its_owner_reads(
    token: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "keys", "operator", "--pkcs11", uri("operator-pin"), "--out", str(tmp_path / "k"))[0] == 0
    monkeypatch.delenv(PIN_ENV)
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o644)
    with pytest.raises(UsageError, match="readable by other users"):
        open_signer(uri("operator-pin") + f"?pin-source=file:{pin_file}")
    pin_file.chmod(0o600)
    with open_signer(uri("operator-pin") + f"?pin-source=file:{pin_file}") as signer:
        assert signer.public_raw == load_public_key_file(tmp_path / "k" / "operator.pub")


def test_a_key_that_can_leave_the_token_is_refused(token: Path) -> None:
    """A key someone put in the token extractable (or imported in the clear) is not trusted to
    stay there: the signer refuses it rather than pretend."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    tok = pkcs11.lib(str(MODULE)).get_token(token_label=TOKEN)
    with tok.open(rw=True, user_pin=PIN) as s:
        s.generate_keypair(KeyType.EC_EDWARDS, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True,
                           label="leaky", id=b"\x07",
                           public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
                           private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
    with pytest.raises(UsageError, match="can leave the token"):
        Pkcs11Signer(uri("leaky"))


def test_generating_never_replaces_a_key_in_the_token(
    token: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-c"), "--out", str(tmp_path / "a"))[0] == 0
    code, _, err = run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-c"), "--out", str(tmp_path / "b"))
    assert code == 2 and "already holds" in err and not (tmp_path / "b").exists()
    code, _, err = run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-d"), "--out", str(tmp_path / "a"))
    assert code == 2 and "already exists" in err  # a .pub is not overwritten either, and nothing was made
    code, _, err = run(capsys, "keys", "publisher", "--pkcs11", uri("publisher-d"), "--out", str(tmp_path / "c"),
                       "--insecure-unencrypted-key")
    assert code == 2 and "never leaves its token" in err


def test_a_token_without_ed25519_is_named_with_the_mechanism_it_lacks(token: Path) -> None:
    """SoftHSM2 offers CKM_EDDSA; a token that offers everything it does except that is refused
    by name (the check EdgeWard runs on the token's real mechanism list before signing)."""
    import pkcs11

    tok = pkcs11.lib(str(MODULE)).get_token(token_label=TOKEN)
    offered = [f"CKM_{m.name}" for m in tok.slot.get_mechanisms() if hasattr(m, "name")]
    assert SIGN_MECHANISM in offered
    require_mechanisms(offered, [SIGN_MECHANISM], TOKEN)
    with pytest.raises(EnvironmentFault, match=f"token '{TOKEN}' does not offer CKM_EDDSA") as e:
        require_mechanisms([m for m in offered if m != SIGN_MECHANISM], [SIGN_MECHANISM], TOKEN)
    assert e.value.exit_code == 4


# --- URIs (RFC 7512) --------------------------------------------------------------------------------


def test_uris_are_parsed_strictly() -> None:
    u = parse_pkcs11_uri("pkcs11:token=CI%20signing;object=pub%2Flisher;id=%01%a2?module-path=/x.so&pin-source=/p")
    assert (u.token, u.label, u.object_id, u.module_path, u.pin_source) == (
        "CI signing", "pub/lisher", b"\x01\xa2", "/x.so", "/p")
    assert u.describe() == "pkcs11:token=CI%20signing;object=pub%2Flisher;id=%01%a2"  # no module, no PIN source
    assert parse_pkcs11_uri(u.describe()).path == u.path
    for bad, why in [
        ("pkcs11:token=a;object=b?pin-value=1234", "pin-value"),
        ("pkcs11:token=a;object=b;slot-pin=1", "not supported"),
        ("pkcs11:token=a;token=b;object=c", "twice"),
        ("pkcs11:object=b", "names no token"),
        ("pkcs11:token=a", "names no key"),
        ("pkcs11:token=a;object=b;type=secret-key", "type must be private"),
        ("pkcs11:token=a;object", "no value"),
        ("pkcs11:token=%ff;object=b", "not UTF-8"),
    ]:
        with pytest.raises(UsageError, match=why):
            parse_pkcs11_uri(bad)


def test_a_plain_path_and_file_uri_still_name_key_files(publisher: Path) -> None:
    pub = load_public_key_file(publisher / "publisher.pub")
    for spec in (str(publisher / "publisher.key"), f"file:{publisher / 'publisher.key'}"):
        with open_signer(spec) as s:
            assert s.public_raw == pub
    with pytest.raises(UsageError, match="--operator-key: private key .* does not exist"):
        open_signer(str(publisher / "missing.key"), option="--operator-key")
