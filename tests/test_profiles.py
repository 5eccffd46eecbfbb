"""Board profiles list every runtime a board has; the model's format picks the one a bundle uses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle.format import verify_bundle
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.errors import FormatError, UsageError
from packager.cli import main
from packager.profiles import builtin_profiles, load_profile
from tests.conftest import Board
from tests.fixtures.hardening import digits_cnn

RPI4B = Path(__file__).parents[1] / "firmware_profiles" / "rpi4b.toml"


def test_builtin_profiles_list_their_runtimes_with_a_preferred_one() -> None:
    profiles = builtin_profiles()
    for p in profiles.values():
        assert p.preferred_runtime in p.runtimes
    assert load_profile("rpi4b").runtimes == ("onnxruntime", "litert")
    assert load_profile("rpi4b").preferred_runtime == "onnxruntime"
    assert load_profile("rpi-zero2w").preferred_runtime == "litert"
    assert load_profile("rpi4b").runtime_for("tflite") == "litert"
    assert load_profile("rpi4b").runtime_for("onnx") == "onnxruntime"


def test_a_tflite_model_packs_installs_and_serves_for_a_raspberry_pi_4b(
    make_board: Callable[..., Board], publisher: Path, tmp_path: Path, capsys: Any
) -> None:
    board = make_board()
    cnn = digits_cnn()
    out = tmp_path / "out"
    code = main([
        "pack", str(cnn.tflite), "--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
        "--device", str(board.enrolment), "--model-version", "1", "--out", str(out), "--quiet", "--json",
    ])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["runtime"] == "litert" and report["profile"] == "rpi4b"
    data = (out / f"{board.device_id}.ewb").read_bytes()
    manifest = verify_bundle(data, [load_public_key_file(publisher / "publisher.pub")]).manifest
    assert (manifest.profile, manifest.runtime) == ("rpi4b", "litert")
    agent = board.agent()
    agent.install(data)
    z = np.load(cnn.validation)
    x = (z["x"][:50] / 16.0).astype(np.float32)[..., None]
    labels = [r["label"] for r in agent.predict(x)["predictions"]]
    assert np.mean(np.array(labels) == z["y"][:50]) > 0.9


def test_harden_takes_a_tflite_model_for_rpi4b(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "h"
    code = main(["harden", str(digits_cnn().tflite), "--profile", "rpi4b", "--quantise", "none",
                 "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["runtime"] == "litert"
    assert (out / "model.tflite").exists()


def test_a_board_without_the_runtime_refuses_the_model_and_says_what_to_do(tmp_path: Path, capsys: Any) -> None:
    only_onnx = tmp_path / "onnx-only.toml"
    text = RPI4B.read_text().replace('runtimes = ["onnxruntime", "litert"]', 'runtimes = ["onnxruntime"]')
    only_onnx.write_text(text.replace('name = "rpi4b"', 'name = "onnx-only"'))
    with pytest.raises(UsageError, match="has onnxruntime, not litert that a tflite model needs; convert"):
        load_profile(str(only_onnx)).runtime_for("tflite")
    code = main(["harden", str(digits_cnn().tflite), "--profile", str(only_onnx), "--quantise", "none",
                 "--out", str(tmp_path / "h")])
    assert code == 2 and "not litert that a tflite model needs" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_a_release_0_1_profile_with_one_runtime_still_reads(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    text = RPI4B.read_text().replace('runtimes = ["onnxruntime", "litert"]  # every runtime the board has\n', "")
    old.write_text(text.replace('preferred_runtime = "onnxruntime"', 'runtime = "litert"'))
    p = load_profile(str(old))
    assert (p.runtimes, p.preferred_runtime) == (("litert",), "litert")
    both = tmp_path / "both.toml"
    both.write_text(RPI4B.read_text() + 'runtime = "litert"\n')
    with pytest.raises(FormatError, match="unknown fields \\['runtime'\\]"):
        load_profile(str(both))
