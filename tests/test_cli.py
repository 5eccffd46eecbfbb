"""The two command lines as users run them: exit codes, one-line errors, files written."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from device_agent.store.keys import KeySource
from packager.cli import main as host_main

DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent


def run_host(capsys, *argv: str) -> tuple[int, str, str]:
    code = host_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_publisher_key_is_0600_and_passphrase_encrypted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "s3cret passphrase")
    code, out, _ = run_host(capsys, "keys", "publisher", "--out", str(tmp_path / "k"), "--json")
    assert code == 0 and json.loads(out)["encrypted"] is True
    key = tmp_path / "k" / "publisher.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    # Refuses to overwrite, and asks for the passphrase by name when it is missing.
    code, _, err = run_host(capsys, "keys", "publisher", "--out", str(tmp_path / "k"))
    assert code == 2 and "refusing to overwrite" in err
    from packager.keys import load_private_key

    monkeypatch.delenv("EDGEWARD_PASSPHRASE")
    with pytest.raises(Exception, match="set EDGEWARD_PASSPHRASE"):
        load_private_key(key)
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "wrong")
    with pytest.raises(Exception, match="wrong EDGEWARD_PASSPHRASE"):
        load_private_key(key)


def test_profiles_validate_and_choose_the_cipher(capsys):
    from packager.profiles import builtin_profiles, load_profile

    profiles = builtin_profiles()
    assert {"rpi4b", "rpi5", "rpi-zero2w", "generic-aarch64", "x86_64-dev"} <= set(profiles)
    assert load_profile("rpi4b").cipher.startswith("chacha20")
    assert load_profile("rpi-zero2w").cipher.startswith("chacha20")
    assert load_profile("rpi5").cipher.startswith("aes-256-gcm")
    code, _, err = run_host(capsys, "pack", "m.onnx", "--profile", "pi9", "--publisher-key", "k",
                            "--device", "d", "--model-version", "1", "--out", "o")
    assert code == 2 and "unknown profile 'pi9'; known profiles: generic-aarch64, rpi-zero2w, rpi4b" in err


def test_bad_profile_file_is_refused_with_the_field_named(tmp_path):
    from device_agent.errors import FormatError
    from packager.profiles import load_profile

    text = (Path(__file__).parents[1] / "firmware_profiles" / "rpi4b.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('runtimes = ["onnxruntime", "litert"]', 'runtimes = ["onnxruntime", "tensorflow"]'))
    with pytest.raises(FormatError, match="runtimes must be distinct names among onnxruntime, litert"):
        load_profile(str(bad))
    bad.write_text(text.replace('preferred_runtime = "onnxruntime"', 'preferred_runtime = "tensorflow"'))
    with pytest.raises(FormatError, match="preferred_runtime must be one of its runtimes"):
        load_profile(str(bad))


def test_pack_refuses_pickle_and_pins_the_model_digest(digits, tmp_path, publisher, make_board, capsys):
    board = make_board()
    common = ["--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
              "--device", str(board.enrolment), "--model-version", "1"]
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    code, _, err = run_host(capsys, "pack", str(pkl), *common, "--out", str(tmp_path / "o1"))
    assert code == 1 and "pickle-based model formats run code" in err
    disguised = tmp_path / "model.onnx"
    disguised.write_bytes(b"\x80\x04K\x01.")
    code, _, err = run_host(capsys, "pack", str(disguised), *common, "--out", str(tmp_path / "o2"))
    assert code == 1 and "pickle stream" in err
    code, _, err = run_host(capsys, "pack", str(digits.onnx), *common, "--expect-sha256", "0" * 64,
                            "--out", str(tmp_path / "o3"))
    assert code == 1 and "not the pinned" in err
    good = __import__("hashlib").sha256(digits.onnx.read_bytes()).hexdigest()
    code, _, _ = run_host(capsys, "pack", str(digits.onnx), *common, "--expect-sha256", good,
                          "--out", str(tmp_path / "o4"), "--quiet")
    assert code == 0
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))


def test_pack_for_a_devices_dir_records_every_bundle(digits, tmp_path, publisher, make_board, capsys):
    devices = tmp_path / "devices"
    devices.mkdir()
    for i in range(3):
        b = make_board(f"pi-{i:03d}")
        shutil.copy(b.enrolment, devices / b.enrolment.name)
    out = tmp_path / "out"
    code, stdout, _ = run_host(capsys, "pack", str(digits.onnx), "--profile", "rpi5", "--publisher-key",
                               str(publisher / "publisher.key"), "--devices-dir", str(devices),
                               "--model-id", "digits", "--model-version", "7", "--end-of-life",
                               "2030-01-01T00:00:00Z", "--out", str(out), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert json.loads((out / "report.json").read_text()) == report
    assert [r["device_id"] for r in report["bundles"]] == ["pi-000", "pi-001", "pi-002"]
    import hashlib

    for r in report["bundles"]:
        data = (out / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["size"]
        assert json.loads((devices / f"{r['device_id']}.json").read_text())["box_fingerprint"] == r["device_key"]
    assert report["cipher"].startswith("aes-256-gcm")
    card = json.loads((out / "model-card.cdx.json").read_text())
    assert card["bomFormat"] == "CycloneDX" and card["specVersion"] == "1.6"
    component = card["components"][0]
    assert component["type"] == "machine-learning-model"
    assert component["hashes"][0]["content"] == report["model"]["sha256"]
    props = {p["name"]: p["value"] for p in component["properties"]}
    assert props["edgeward:end_of_life"] == "2030-01-01T00:00:00Z"
    assert "crypto-shred" in props["edgeward:destruction_method"]
    assert not list(out.glob(".edgeward-staging-*"))


def test_pack_writes_nothing_when_any_device_fails(digits, tmp_path, publisher, make_board):
    """All or nothing: a failure at the third device leaves the output directory empty."""
    from packager.keys import load_private_key
    from packager.modelfile import infer_task, read_model
    from packager.pack import PackOptions, load_enrolments, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    boards = [make_board(f"pi-{i}") for i in range(5)]

    def failing(items):
        for n, item in enumerate(items):
            if n == 2:
                raise OSError("disk vanished")
            yield item

    m = read_model(digits.onnx)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        pack(m, load_profile("rpi4b"), FileSigner(load_private_key(publisher / "publisher.key")),
             load_enrolments([b.enrolment for b in boards]),
             PackOptions(model_id="digits", model_version=1, task=infer_task(m, {})), out, progress=failing)
    assert list(out.iterdir()) == []


def test_tampered_or_duplicate_enrolment_is_refused(digits, tmp_path, publisher, make_board, capsys):
    board = make_board()
    doc = json.loads(board.enrolment.read_text())
    doc["device_id"] = "pi-666"
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    base = ["pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
            "--model-version", "1", "--out", str(tmp_path / "o")]
    code, _, err = run_host(capsys, *base, "--device", str(forged))
    assert code == 1 and "forged.json" in err and "signature" in err
    code, _, err = run_host(capsys, *base, "--device", str(board.enrolment), "--device", str(board.enrolment))
    assert code == 2 and "enrolled twice" in err
    assert not (tmp_path / "o").exists()


def test_golden_v1_bundle_still_verifies_and_predicts(tmp_path):
    """Bundles written by the first released format keep working (tests/data/make_golden.py)."""
    golden = DATA / "v1"
    board = tmp_path / "board"
    shutil.copytree(golden / "board", board)
    os.chmod(board, 0o700)
    expected = json.loads((golden / "expected.json").read_text())
    agent = Agent(board, KeySource(kek=(golden / "kek.bin").read_bytes()))
    m = agent.install((golden / "golden.ewb").read_bytes())
    assert (m.model_id, m.model_version) == ("golden", 1)
    got = agent.predict(np.load(golden / "input.npy"))
    assert [p["label"] for p in got["predictions"]] == expected["labels"]
    assert agent.model().sidecar.model_sha256 == expected["model_sha256"]


def test_console_scripts_lifecycle_with_exit_codes(digits, digits_test, tmp_path, publisher):
    """The installed `edgeward` and `edgeward-agent` commands, as a technician would run them."""
    env = {**os.environ, "EDGEWARD_DEVICE_PASSPHRASE": "board pass"}
    env.pop("EDGEWARD_PASSPHRASE", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    d = str(tmp_path / "board")
    enrol = str(tmp_path / "pi-7.json")
    r = run("edgeward-agent", "provision", "--data-dir", d, "--device-id", "pi-7", "--publisher-pub",
            str(publisher / "publisher.pub"), "--export", enrol)
    assert r.returncode == 0, r.stderr
    for v in ("1", "2"):
        r = run("edgeward", "pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key",
                str(publisher / "publisher.key"), "--device", enrol, "--model-version", v,
                "--out", str(tmp_path / f"v{v}"), "--quiet")
        assert r.returncode == 0, r.stderr
    v2 = str(tmp_path / "v2" / "pi-7.ewb")
    assert run("edgeward-agent", "install", v2, "--data-dir", d).returncode == 0
    x, _ = digits_test
    np.save(tmp_path / "one.npy", x[3])
    r = run("edgeward-agent", "predict", "--data-dir", d, "--input", str(tmp_path / "one.npy"))
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"label"}
    r = run("edgeward-agent", "install", str(tmp_path / "v1" / "pi-7.ewb"), "--data-dir", d)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not newer than version 2" in r.stderr
    data = Path(v2).read_bytes()
    (tmp_path / "cut.ewb").write_bytes(data[: len(data) - 10])
    r = run("edgeward-agent", "install", str(tmp_path / "cut.ewb"), "--data-dir", d)
    assert r.returncode == 3 and "truncated" in r.stderr
    r = run("edgeward-agent", "predict", "--data-dir", d, "--input", str(tmp_path / "cut.ewb"))
    assert r.returncode == 3 and "not a readable .npy" in r.stderr
    r = run("edgeward-agent", "status", "--data-dir", d, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["models"][0]["version"] == 2
    r = run("edgeward", "inspect", v2, "--publisher-pub", str(publisher / "publisher.pub"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True
    other = tmp_path / "other"
    assert run("edgeward", "keys", "publisher", "--out", str(other), "--insecure-unencrypted-key").returncode == 0
    r = run("edgeward", "inspect", v2, "--publisher-pub", str(other / "publisher.pub"))
    assert r.returncode == 1 and "REFUSED" in r.stdout
    r = run("edgeward-agent", "install", v2, "--data-dir", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "not a provisioned data dir" in r.stderr
    r = run("edgeward-agent", "predict", "--data-dir", d, "--input", str(tmp_path / "one.npy"), "--role", "root")
    assert r.returncode == 2
