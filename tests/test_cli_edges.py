"""The edges a new user meets first: versions, missing extras, closed pipes, files that are not
arrays, a board that has not served, usage errors with their own exit code, and the one
passphrase rule for every private key the host keeps (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import __version__
from device_agent.cli import main as agent_main
from fleet.ca import FleetHome
from packager.cli import main as host_main

ROOT = Path(__file__).resolve().parent.parent
REFUSAL = "set EDGEWARD_PASSPHRASE to encrypt it, or pass --insecure-unencrypted-key"


def run_py(code: str, *argv: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("which", ["packager.cli", "device_agent.cli"])
def test_both_commands_print_their_version(which: str) -> None:
    r = run_py(f"import sys; from {which} import main; sys.exit(main(sys.argv[1:]))", "--version")
    prog = "edgeward" if which == "packager.cli" else "edgeward-agent"
    assert r.returncode == 0 and r.stdout.strip() == f"{prog} {__version__}", r.stderr
    # One version for the code and the distribution: pyproject takes it from the package.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "device_agent.__version__" }' in pyproject


def test_license_file_is_the_one_pyproject_declares() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


HIDE_HOST_EXTRAS = (
    "import sys\n"
    "for m in ('onnx', 'tqdm', 'ai_edge_quantizer', 'ai_edge_litert', 'art', 'sklearn', 'skl2onnx'):\n"
    "    sys.modules[m] = None  # as on a board that installed only edgeward[device]\n"
    "from packager.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_host_command_on_a_device_only_install_names_the_extra_to_install(digits, tmp_path) -> None:
    r = run_py(HIDE_HOST_EXTRAS, "harden", str(digits.onnx), "--profile", "rpi4b", "--out", str(tmp_path / "h"))
    assert r.returncode == 4, r.stderr
    assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr
    assert "pip install 'edgeward[host]'" in r.stderr
    assert not (tmp_path / "h").exists()


def test_a_closed_stdout_pipe_ends_a_command_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head -1) has gone before the command writes a byte
    try:
        r = run_py("import sys; from packager.cli import main; sys.exit(main(sys.argv[1:]))", "profiles",
                   stdout=write_end)
    finally:
        os.close(write_end)
    assert r.returncode == 0 and r.stderr == ""


def test_host_data_files_that_are_not_npz_are_refused_without_suggesting_pickle(
    digits, tmp_path, publisher, make_board, capsys
) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("0.1,0.2,0.3\n")
    board = make_board()
    code = host_main(["pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key",
                      str(publisher / "publisher.key"), "--device", str(board.enrolment), "--model-version", "1",
                      "--calibrate-ood", str(text), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "numpy.savez" in err, err
    code = host_main(["harden", str(digits.onnx), "--profile", "rpi4b", "--quantise", "static",
                      "--calibration", str(text), "--out", str(tmp_path / "h")])
    err2 = capsys.readouterr().err
    assert code == 3 and "numpy.savez" in err2, err2
    for e in (err, err2):
        assert "allow_pickle" not in e and "pickle.load" not in e and "unsafely" not in e
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()


def _installed_board(digits, make_board, pack_for, monkeypatch):
    board = make_board()
    out = pack_for(digits.onnx, [board], version=1)
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE", board.keys.passphrase.decode())
    assert agent_main(["install", str(out / "pi-001.ewb"), "--data-dir", str(board.data_dir)]) == 0
    return board


def test_agent_usage_errors_and_a_board_that_never_served(
    digits, digits_test, make_board, pack_for, tmp_path, monkeypatch, capsys
) -> None:
    board = _installed_board(digits, make_board, pack_for, monkeypatch)
    d = str(board.data_dir)
    x = tmp_path / "x.npy"
    np.save(x, digits_test[0][0])
    capsys.readouterr()
    # predict takes --json, as every data command does.
    assert agent_main(["predict", "--data-dir", d, "--input", str(x), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"label"}
    # A model id the board does not have is a usage error, not an environment fault.
    assert agent_main(["predict", "--data-dir", d, "--input", str(x), "--model", "nosuch"]) == 2
    assert "model 'nosuch' is not installed; installed: digits" in capsys.readouterr().err
    # Nothing to roll back to is a usage error, not a security refusal.
    assert agent_main(["rollback", "--data-dir", d]) == 2
    assert "no previous version" in capsys.readouterr().err
    # A board that has never served has no audit log yet: nothing is wrong with it.
    assert agent_main(["audit", "verify", "--data-dir", d]) == 0
    assert "the service has not served on this board" in capsys.readouterr().out
    assert agent_main(["audit", "verify", "--data-dir", d, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["started"] is False and doc["records"] == 0
    # ...but a log that exists and was cut is still NOT intact (exit 1).
    audit = board.data_dir / "audit"
    audit.mkdir(mode=0o700)
    (audit / "head.json").write_text(json.dumps({"seq": 5, "hash": "0" * 64}))
    assert agent_main(["audit", "verify", "--data-dir", d]) == 1
    assert "NOT intact" in capsys.readouterr().err


# --- the one passphrase rule for private keys the host keeps -------------------------------------


@pytest.mark.parametrize("kind", ["publisher", "operator", "recovery"])
def test_signing_keys_without_a_passphrase_are_refused_unless_named(kind, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EDGEWARD_PASSPHRASE", raising=False)
    out = tmp_path / "k"
    assert host_main(["keys", kind, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and err.count("\n") == 1
    assert not out.exists()  # a refusal changes nothing
    assert host_main(["keys", kind, "--out", str(out), "--insecure-unencrypted-key", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    key = out / f"{kind}.key"
    assert doc["encrypted"] is False and b"ENCRYPTED" not in key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_fleet_ca_key_follows_the_same_rule(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EDGEWARD_PASSPHRASE", raising=False)
    fleet = tmp_path / "fleet"
    for argv in (["fleet", "ca", "init"], ["fleet", "broker-config", "--out", str(tmp_path / "broker")]):
        assert host_main([*argv, "--fleet-dir", str(fleet)]) == 2
        err = capsys.readouterr().err
        assert REFUSAL in err and "ca.key" in err
        assert not (fleet / "ca.key").exists() and not (fleet / "ca.crt").exists()
    assert host_main(["fleet", "ca", "init", "--fleet-dir", str(fleet), "--insecure-unencrypted-key", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["encrypted"] is False
    monkeypatch.setenv("EDGEWARD_PASSPHRASE", "fleet secret")
    home = FleetHome(tmp_path / "fleet2")
    home.init_ca()
    assert b"ENCRYPTED PRIVATE KEY" in home.ca_key.read_bytes()


def test_the_device_passphrase_can_come_from_a_file(make_board, tmp_path, monkeypatch) -> None:
    """EDGEWARD_DEVICE_PASSPHRASE_FILE: the passphrase as a systemd credential (deploy/systemd/)."""
    from device_agent.errors import UsageError
    from device_agent.store.keys import KeySource

    board = make_board()
    f = tmp_path / "passphrase"
    f.write_bytes(board.keys.passphrase + b"\n")  # as `echo` writes it
    monkeypatch.delenv("EDGEWARD_DEVICE_PASSPHRASE", raising=False)
    monkeypatch.setenv("EDGEWARD_DEVICE_PASSPHRASE_FILE", str(f))
    src = KeySource.from_env()
    assert src.passphrase == board.keys.passphrase
    from device_agent.agent import Agent

    assert Agent(board.data_dir, src).status()["device_id"] == "pi-001"
    f.write_bytes(b"")
    with pytest.raises(UsageError, match="is empty"):
        KeySource.from_env()


@pytest.mark.parametrize(
    ("module", "argv", "names"),
    [
        ("device_agent.cli", ["status"], "--data-dir"),
        ("device_agent.cli", ["nosuch"], "nosuch"),
        ("packager.cli", ["pack", "--profile", "rpi4b"], "--publisher-key"),
        ("packager.cli", ["fleet", "status", "--no-such-option"], "--no-such-option"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_problem_and_the_help(module: str, argv: list[str], names: str) -> None:
    r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert names in lines[0] and "--help" in lines[0]


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path a parser accepts (``()``, ``("fleet",)``, ``("fleet", "deploy")``...),
    read from the parsers themselves so that a new command is covered as soon as it exists."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in sorted(action.choices.items()):
                paths += _command_paths(sp, (*prefix, name))
    return paths


def _help_cases() -> list[Any]:
    from device_agent.cli import build_parser as agent_parser
    from packager.cli import build_parser as host_parser

    return [pytest.param(main, path, id=" ".join((prog, *path)))
            for prog, main, build in (("edgeward", host_main, host_parser),
                                      ("edgeward-agent", agent_main, agent_parser))
            for path in _command_paths(build())]


@pytest.mark.parametrize(("main", "path"), _help_cases())
def test_every_command_prints_its_help(main: Callable[[list[str]], int], path: tuple[str, ...],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # argparse %-formats help text: a bare '%' in any help string is a traceback at --help time.
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == ""
    assert out.startswith("usage:") and "Traceback" not in out


def test_the_help_of_every_command_is_enumerated() -> None:
    names = {c.id for c in _help_cases()}
    assert {"edgeward fleet deploy", "edgeward fleet ca init", "edgeward-agent serve", "edgeward pack"} <= names


def test_the_stubs_of_the_heavy_commands_have_their_full_help() -> None:
    """`edgeward pack` registers redteam and fleet as stubs (not importing them); the top-level help
    a stub gives must be the one the full command gives."""
    from packager.cli import LAZY_COMMANDS, build_parser

    def helps(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {c.dest: c.help for c in sub._choices_actions}

    full = helps(build_parser())
    for name in LAZY_COMMANDS:
        other = next(c for c in ("pack", *LAZY_COMMANDS) if c != name)
        assert helps(build_parser(other)) == full, name
