"""``edgeward harden`` and ``edgeward pack`` with hardening, end to end on real boards.

The hardened bundle is installed on a provisioned board; the application sends raw input (an
8x8 image, a photo of text) and gets the right answer, while the model bytes carry no names,
labels or dictionary. The model card validates against the CycloneDX 1.6 schema.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.format import Sidecar
from device_agent.errors import FormatError
from packager.cli import main
from tests.fixtures.hardening import (
    RAPIDOCR_PREPROCESS,
    digits_cnn,
    preprocess_files,
    rapidocr_labels,
    rapidocr_rec_model,
    text_image,
    write_json,
)
from tests.fixtures.models import silero_vad_onnx

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _validate_cyclonedx(doc: dict) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    assert error is None, str(error)


def _sealed_model(bundle: bytes, board) -> bytes:
    """The model bytes sealed in a bundle, decrypted with the board's own key."""
    from device_agent.bundle.format import verify_bundle

    agent = board.agent()
    vb = verify_bundle(bundle, list(agent.trust_anchors().publishers))
    contents = vb.decrypt(agent.store.unlock(board.keys).box_private)
    try:
        return bytes(contents.model)
    finally:
        contents.wipe()


def _props(card: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in card["components"][0]["properties"]}


def test_harden_cli_writes_model_sidecar_card_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cnn = digits_cnn()
    nchw, _ = preprocess_files(tmp_path)
    labels = write_json(tmp_path / "labels.json", LABELS)
    out = tmp_path / "hardened"
    code = main(
        [
            "harden",
            str(cnn.onnx),
            "--profile",
            "rpi4b",
            "--out",
            str(out),
            "--quantise",
            "static",
            "--prune",
            "auto",
            "--calibration",
            str(cnn.calibration),
            "--validation",
            str(cnn.validation),
            "--preprocess",
            str(nchw),
            "--labels",
            str(labels),
            "--training-samples",
            "1347",
            "--training-data",
            "scikit-learn load_digits (UCI optdigits), 75% split",
            "--limitation",
            "8x8 grey digits only",
            "--retention",
            "delete 90 days after end of life",
            "--end-of-life",
            "2030-01-01T00:00:00Z",
            "--expect-sha256",
            hashlib.sha256(cnn.onnx.read_bytes()).hexdigest(),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "model-card.cdx.json",
        "model.onnx",
        "report.json",
        "sidecar.json",
    ]
    model = (out / "model.onnx").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["size_bytes"]["input"] == cnn.onnx.stat().st_size
    assert report["size_bytes"]["output"] == len(model)
    acc = report["accuracy"]
    assert acc["gate"] == "checked" and acc["input"] > 0.97 and acc["drop_points"] <= 1.0
    assert acc["output"] == pytest.approx(acc["input"] - acc["drop_points"] / 100, abs=1e-4)
    assert acc["agreement"] >= 0.98 and report["sparsity"]["chosen"] > 0
    accuracy_row = next(line for line in text.splitlines() if line.startswith("accuracy "))
    assert f"{acc['input']:.4f}" in accuracy_row and f"{acc['output']:.4f}" in accuracy_row
    assert report["quantisation"]["status"] == "applied" and report["seconds"]
    sidecar = Sidecar.from_json(json.loads((out / "sidecar.json").read_text()))
    assert sidecar.model_sha256 == hashlib.sha256(model).hexdigest()
    assert sidecar.task["labels"] == LABELS and sidecar.preprocess["steps"][1] == {
        "op": "layout",
        "to": "NCHW",
    }
    card = json.loads((out / "model-card.cdx.json").read_text())
    assert sidecar.model_card == card
    _validate_cyclonedx(card)
    comp = card["components"][0]
    assert comp["type"] == "machine-learning-model"
    assert comp["hashes"][0]["content"] == sidecar.model_sha256
    assert (
        comp["pedigree"]["ancestors"][0]["hashes"][0]["content"]
        == hashlib.sha256(cnn.onnx.read_bytes()).hexdigest()
    )
    props = _props(card)
    assert props["edgeward:end_of_life"] == "2030-01-01T00:00:00Z"
    assert "crypto-shred" in props["edgeward:destruction_method"]
    assert props["edgeward:retention"] == "delete 90 days after end of life"
    assert int(props["edgeward:parameters_after"]) < int(props["edgeward:parameters_before"])
    metrics = comp["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
    assert [m["type"] for m in metrics] == ["accuracy", "accuracy"]
    limits = comp["modelCard"]["considerations"]["technicalLimitations"]
    assert "8x8 grey digits only" in limits and any("training samples" in lim for lim in limits)
    assert comp["modelCard"]["modelParameters"]["datasets"] == [{"ref": "data:training"}]
    for secret in (b"acme", b"ACME", b"conv1", b"digit_image", b"zero", b"jane.doe"):
        assert secret not in model


def test_harden_pack_one_run_board_answers_raw_images(
    tmp_path: Path, make_board, publisher: Path
) -> None:
    cnn = digits_cnn()
    _, nhwc = preprocess_files(tmp_path)
    labels = write_json(tmp_path / "labels.json", LABELS)
    board = make_board("board-7")
    out = tmp_path / "bundles"
    code = main(
        [
            "pack",
            str(cnn.tflite),
            "--profile",
            "rpi-zero2w",
            "--publisher-key",
            str(publisher / "publisher.key"),
            "--device",
            str(board.enrolment),
            "--model-id",
            "digits",
            "--model-version",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--labels",
            str(labels),
            "--calibration",
            str(cnn.calibration),
            "--validation",
            str(cnn.validation),
            "--preprocess",
            str(nhwc),
            "--prune",
            "auto",
            "--end-of-life",
            "2031-01-01T00:00:00Z",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["hardening"]["quantisation"]["status"] == "applied"
    assert report["hardening"]["accuracy"]["drop_points"] <= 1.0
    card = json.loads((out / "model-card.cdx.json").read_text())
    _validate_cyclonedx(card)
    bundle = (out / "board-7.ewb").read_bytes()
    agent = board.agent()
    agent.install(bundle)
    assert agent.model().sidecar.model_card == card  # sealed inside, identical to the one beside
    val = np.load(cnn.validation)
    one = agent.predict(
        val["x"][0]
    )  # a raw 8x8 image, values 0..16: no shape, scale or layout known
    assert one == {"label": LABELS[int(val["y"][0])]}
    many = agent.predict(val["x"][:50])["predictions"]
    hits = sum(p["label"] == LABELS[int(y)] for p, y in zip(many, val["y"][:50], strict=True))
    assert hits >= 48
    sealed = _sealed_model(bundle, board)  # what the board decrypts, not the ciphertext
    assert hashlib.sha256(sealed).hexdigest() == agent.model().sidecar.model_sha256
    for secret in (b"serving_default", b"TFLITE_METADATA", b"ACME", b"seven"):
        assert secret in cnn.tflite.read_bytes()  # the original carries it
        assert secret not in sealed


def test_harden_rapidocr_board_reads_text_without_dictionary_in_model(
    tmp_path: Path, make_board, publisher: Path
) -> None:
    rec = rapidocr_rec_model()
    labels = write_json(tmp_path / "chars.json", rapidocr_labels(rec))
    spec = write_json(tmp_path / "ocr-pre.json", RAPIDOCR_PREPROCESS)
    hardened = tmp_path / "hardened"
    assert (
        main(
            [
                "harden",
                str(rec),
                "--profile",
                "rpi4b",
                "--out",
                str(hardened),
                "--quantise",
                "none",
                "--task",
                "ctc",
                "--labels",
                str(labels),
                "--preprocess",
                str(spec),
                "--json",
            ]
        )
        == 0
    )
    model = (hardened / "model.onnx").read_bytes()
    dictionary = "\n".join(rapidocr_labels(rec)[1:-1])
    assert dictionary[2000:2016].encode() not in model and b"character" not in model
    board = make_board("ocr-1")
    out = tmp_path / "bundles"
    assert (
        main(
            [
                "pack",
                str(hardened),  # the harden output as CI inspected it, sealed as is
                "--profile",
                "rpi4b",
                "--publisher-key",
                str(publisher / "publisher.key"),
                "--device",
                str(board.enrolment),
                "--model-id",
                "ocr",
                "--model-version",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    agent = board.agent()
    agent.install((out / "ocr-1.ewb").read_bytes())
    assert agent.predict(text_image("EdgeWard 2026")) == {"label": "EdgeWard 2026"}
    assert agent.predict(text_image("NCSC", width=160), role="engineer")["label"] == "NCSC"


def test_harden_cli_silero_quantisation_skipped_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vad"
    assert (
        main(
            [
                "harden",
                str(silero_vad_onnx()),
                "--profile",
                "rpi4b",
                "--out",
                str(out),
                "--quantise",
                "dynamic",
                "--no-accuracy-gate",  # three inputs: a single-array validation cannot feed it
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "quantisation skipped: control flow" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["quantisation"]["status"] == "skipped"
    _validate_cyclonedx(json.loads((out / "model-card.cdx.json").read_text()))


def test_harden_cli_accuracy_gate_exit_1(
    tmp_path: Path, digits, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "harden",
            str(digits.onnx),
            "--profile",
            "rpi4b",
            "--out",
            str(tmp_path / "o"),
            "--quantise",
            "none",
            "--prune",
            "0.9",
            "--validation",
            str(digits.test),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "max-accuracy-drop" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_harden_cli_allow_list(tmp_path: Path, digits, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "approved.sha256"
    allow.write_text("# approved models\n" + "0" * 64 + "  other.onnx\n")
    base = [
        "harden",
        str(digits.onnx),
        "--profile",
        "rpi4b",
        "--out",
        str(tmp_path / "o"),
        "--allow-list",
        str(allow),
        "--validation",
        str(digits.test),
    ]
    assert main(base) == 1
    assert "not on the allow-list" in capsys.readouterr().err
    allow.write_text(f"{hashlib.sha256(digits.onnx.read_bytes()).hexdigest()}  digits_mlp.onnx\n")
    assert main(base) == 0


@pytest.mark.parametrize("name", ["model.pt", "model.pkl", "model.joblib"])
def test_harden_cli_refuses_pickle(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04K\x01.")
    assert main(["harden", str(path), "--profile", "rpi4b", "--out", str(tmp_path / "o")]) == 1
    assert "pickle" in capsys.readouterr().err


def test_harden_external_data_is_inlined(tmp_path: Path, digits, digits_test) -> None:
    import onnx

    src = _external_model(tmp_path, digits)
    assert (src.parent / "weights.bin").stat().st_size > 10_000 and src.stat().st_size < 5_000
    out = tmp_path / "o"
    assert (
        main(
            [
                "harden",
                str(src),
                "--profile",
                "rpi4b",
                "--out",
                str(out),
                "--quantise",
                "none",
                "--validation",
                str(digits.test),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["input"]["external_data"] == ["weights.bin"]
    assert report["accuracy"]["input"] == report["accuracy"]["output"] > 0.9
    assert (
        not onnx.load_from_string((out / "model.onnx").read_bytes())
        .graph.initializer[0]
        .external_data
    )


def test_harden_pack_flag_uses_profile_defaults_and_plain_pack_keeps_bytes(
    tmp_path: Path,
    digits,
    digits_test,
    make_board,
    publisher: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = make_board("pi-9")
    base = [
        "pack",
        str(digits.onnx),
        "--profile",
        "rpi4b",
        "--publisher-key",
        str(publisher / "publisher.key"),
        "--device",
        str(board.enrolment),
        "--model-id",
        "digits",
        "--quiet",
    ]
    assert main([*base, "--model-version", "1", "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["hardening"] is None
    _validate_cyclonedx(json.loads((tmp_path / "plain" / "model-card.cdx.json").read_text()))
    assert plain["model"]["sha256"] == hashlib.sha256(digits.onnx.read_bytes()).hexdigest()
    capsys.readouterr()
    assert (
        main(
            [
                *base,
                "--model-version",
                "2",
                "--out",
                str(tmp_path / "hard"),
                "--harden",
                "--validation",
                str(digits.test),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out  # the summary table
    report = json.loads((tmp_path / "hard" / "report.json").read_text())
    acc = report["hardening"]["accuracy"]
    assert acc["gate"] == "checked" and acc["input"] > 0.9 and acc["drop_points"] <= 1.0
    assert f"{acc['input']:.4f}" in table and f"{acc['output']:.4f}" in table
    assert report["hardening"]["quantisation"] == {"mode": "dynamic", "status": "applied"}
    assert report["model"]["size_bytes"] < plain["model"]["size_bytes"]
    agent = board.agent()
    agent.install((tmp_path / "hard" / "pi-9.ewb").read_bytes())
    x, y = digits_test
    predictions = agent.predict(x[:100])["predictions"]
    assert sum(p["label"] == int(t) for p, t in zip(predictions, y[:100], strict=True)) >= 95


def test_harden_pack_from_harden_dir_checks_it(
    tmp_path: Path, digits, make_board, publisher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hardened = tmp_path / "h"
    assert (
        main(
            [
                "harden",
                str(digits.onnx),
                "--profile",
                "rpi4b",
                "--out",
                str(hardened),
                "--validation",
                str(digits.test),
                "--training-samples",
                "1347",
            ]
        )
        == 0
    )
    board = make_board("pi-5")
    assert main(_pack_args(hardened, board, publisher, tmp_path / "o1")) == 0
    card = json.loads((tmp_path / "o1" / "model-card.cdx.json").read_text())
    _validate_cyclonedx(card)
    assert _props(card)["edgeward:training_samples"] == "1347"
    assert (
        card["components"][0]["hashes"][0]["content"]
        == hashlib.sha256((hardened / "model.onnx").read_bytes()).hexdigest()
    )
    assert main(_pack_args(hardened, board, publisher, tmp_path / "o2", "--quantise", "static")) == 2
    tampered = bytearray((hardened / "model.onnx").read_bytes())
    tampered[-1] ^= 1
    (hardened / "model.onnx").write_bytes(bytes(tampered))
    capsys.readouterr()
    assert main(_pack_args(hardened, board, publisher, tmp_path / "o3")) == 1
    assert "differs from" in capsys.readouterr().err


# --- review findings: every pack path pinned, harden outputs re-checked, inputs malformed ------


def _pack_args(model: Path, board, publisher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pack",
        str(model),
        "--profile",
        "rpi4b",
        "--publisher-key",
        str(publisher / "publisher.key"),
        "--device",
        str(board.enrolment),
        "--model-version",
        "1",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def test_harden_pack_checks_allow_list_on_every_path(
    tmp_path: Path, digits, make_board, publisher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    board = make_board("pi-allow")
    other = tmp_path / "other.sha256"
    other.write_text("0" * 64 + "  other.onnx\n")
    hardened = tmp_path / "h"
    assert (
        main(
            ["harden", str(digits.onnx), "--profile", "rpi4b", "--out", str(hardened)]
            + ["--validation", str(digits.test)]
        )
        == 0
    )
    capsys.readouterr()
    for model in (digits.onnx, hardened):  # plain pack, and pack DIR
        out = tmp_path / f"o-{model.name}"
        assert main(_pack_args(model, board, publisher, out, "--allow-list", str(other))) == 1
        assert "not on the allow-list" in capsys.readouterr().err
        assert not out.exists() or not list(out.glob("*.ewb"))
    approved = tmp_path / "approved.sha256"
    for model, name in ((digits.onnx, digits.onnx), (hardened, hardened / "model.onnx")):
        approved.write_text(f"{hashlib.sha256(name.read_bytes()).hexdigest()}  m.onnx\n")
        out = tmp_path / f"ok-{model.name}"
        assert main(_pack_args(model, board, publisher, out, "--allow-list", str(approved))) == 0


@pytest.mark.parametrize(
    "option", [["--training-samples", "10"], ["--limitation", "x"], ["--max-accuracy-drop", "2"]]
)
def test_harden_only_options_refused_without_hardening(
    tmp_path: Path,
    digits,
    make_board,
    publisher: Path,
    option: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    board = make_board("pi-opt")
    assert main(_pack_args(digits.onnx, board, publisher, tmp_path / "o", *option)) == 2
    assert "only apply when hardening" in capsys.readouterr().err


def test_harden_no_accuracy_gate_warns_and_records(
    tmp_path: Path, digits, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["harden", str(digits.onnx), "--profile", "rpi4b", "--quantise", "dynamic"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "--validation" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--no-accuracy-gate"]) == 0
    assert "warning: accuracy not checked" in capsys.readouterr().err
    card = json.loads((tmp_path / "b" / "model-card.cdx.json").read_text())
    limits = card["components"][0]["modelCard"]["considerations"]["technicalLimitations"]
    assert any("--no-accuracy-gate" in lim for lim in limits)
    assert _props(card)["edgeward:hardening:accuracy_gate"] == "disabled"


def test_harden_cli_malformed_validation_labels_exit_3(
    tmp_path: Path, digits, digits_test, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = digits_test
    bad = tmp_path / "onehot.npz"
    np.savez(bad, x=x, y=np.eye(10)[y])
    argv = ["harden", str(digits.onnx), "--profile", "rpi4b", "--out", str(tmp_path / "o")]
    assert main([*argv, "--validation", str(bad)]) == 3
    assert "one label per input" in capsys.readouterr().err


def test_harden_corrupt_onnx_and_pickle_named_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--profile", "rpi4b", "--out", str(tmp_path / "o"), "--quantise", "none"]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff garbage")
    assert main(["harden", str(corrupt), *argv]) == 3
    assert "not a valid ONNX" in capsys.readouterr().err
    pickled = tmp_path / "model.onnx"
    pickled.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")
    assert main(["harden", str(pickled), *argv]) == 1
    assert "pickle" in capsys.readouterr().err


def _external_model(tmp_path: Path, digits) -> Path:
    import onnx
    from onnx import numpy_helper

    src = tmp_path / "ext" / "mlp.onnx"
    src.parent.mkdir()
    model = onnx.load(digits.onnx)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    onnx.save(
        model,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return src


def test_harden_external_data_pin_covers_the_weights(
    tmp_path: Path, digits, capsys: pytest.CaptureFixture[str]
) -> None:
    from packager.harden.supply import inline_external_data

    src = _external_model(tmp_path, digits)
    inlined, files = inline_external_data(src, src.read_bytes(), 2**31 - 1)
    assert files == ["weights.bin"]
    argv = ["harden", str(src), "--profile", "rpi4b", "--quantise", "none"]
    graph_only = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main([*argv, "--out", str(tmp_path / "a"), "--expect-sha256", graph_only]) == 1
    capsys.readouterr()
    pin = hashlib.sha256(inlined).hexdigest()
    assert main([*argv, "--out", str(tmp_path / "b"), "--expect-sha256", pin]) == 0
    weights = src.parent / "weights.bin"
    tampered = bytearray(weights.read_bytes())
    tampered[100] ^= 0x40
    weights.write_bytes(bytes(tampered))  # same graph file, same pin, different weights
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c"), "--expect-sha256", pin]) == 1
    assert "not the pinned" in capsys.readouterr().err
    allow = tmp_path / "allow.sha256"
    allow.write_text(f"{pin}  mlp.onnx\n")
    assert main([*argv, "--out", str(tmp_path / "d"), "--allow-list", str(allow)]) == 1


def test_harden_external_data_outside_model_dir_refused(tmp_path: Path, digits) -> None:
    import onnx

    from device_agent.errors import SecurityRefusal
    from packager.harden.supply import inline_external_data

    src = _external_model(tmp_path, digits)
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    with pytest.raises(SecurityRefusal, match="leaves the model's directory"):
        inline_external_data(src, model.SerializeToString(), 2**31 - 1)
    with pytest.raises(FormatError, match="over 1000 bytes"):
        inline_external_data(src, src.read_bytes(), 1000)


def test_harden_pack_dir_refuses_tampered_output(
    tmp_path: Path, digits, make_board, publisher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's scenario: the unstripped original put back in place with its metadata,
    sidecar hash and card facts fixed up to match, and a bad pre-processing step."""
    import shutil

    hardened = tmp_path / "h"
    argv = ["harden", str(digits.onnx), "--profile", "rpi4b", "--validation", str(digits.test)]
    assert main([*argv, "--out", str(hardened)]) == 0
    board = make_board("pi-tamper")
    pristine = tmp_path / "pristine"
    shutil.copytree(hardened, pristine)

    def tamper(model: bytes | None = None, preprocess: dict | None = None) -> Path:
        d = tmp_path / f"t{len(list(tmp_path.glob('t*')))}"
        shutil.copytree(pristine, d)
        if model is not None:
            (d / "model.onnx").write_bytes(model)
            digest = hashlib.sha256(model).hexdigest()
            side = json.loads((d / "sidecar.json").read_text())
            side["model"].update(sha256=digest, length=len(model))
            (d / "sidecar.json").write_text(json.dumps(side))
            rep = json.loads((d / "report.json").read_text())
            rep["card_facts"].update(output_sha256=digest, output_bytes=len(model))
            (d / "report.json").write_text(json.dumps(rep))
        if preprocess is not None:
            side = json.loads((d / "sidecar.json").read_text())
            side["preprocess"] = preprocess
            (d / "sidecar.json").write_text(json.dumps(side))
        return d

    import onnx

    leaky = onnx.load(digits.onnx)
    leaky.metadata_props.add(key="owner", value="jane.doe@acme.example")
    cases = [
        tamper(model=leaky.SerializeToString()),
        tamper(
            preprocess={
                "schema": "edgeward.preprocess/1",
                "sample_rank": 1,
                "steps": [{"op": "exec", "code": "x"}],
            }
        ),
    ]
    labels = tamper()
    side = json.loads((labels / "sidecar.json").read_text())
    side["task"]["labels"] = [str(i) for i in range(9)]  # the model has 10 classes
    (labels / "sidecar.json").write_text(json.dumps(side))
    cases.append(labels)
    facts_only = tamper()
    rep = json.loads((facts_only / "report.json").read_text())
    rep["card_facts"]["output_sha256"] = "0" * 64
    (facts_only / "report.json").write_text(json.dumps(rep))
    cases.append(facts_only)
    capsys.readouterr()
    for i, d in enumerate(cases):
        assert main(_pack_args(d, board, publisher, tmp_path / f"o{i}")) == 1, d
        assert "not an untouched edgeward harden output" in capsys.readouterr().err
    assert main(_pack_args(pristine, board, publisher, tmp_path / "ok")) == 0


def test_harden_pack_dir_accepts_untouched_tflite_output(
    tmp_path: Path, make_board, publisher: Path
) -> None:
    """The re-checks (stripping idempotent, facts, task) pass for an honest TFLite output."""
    cnn = digits_cnn()
    _, nhwc = preprocess_files(tmp_path)
    hardened = tmp_path / "h"
    argv = ["harden", str(cnn.tflite), "--profile", "rpi-zero2w", "--out", str(hardened)]
    argv += ["--calibration", str(cnn.calibration), "--validation", str(cnn.validation)]
    assert main([*argv, "--preprocess", str(nhwc)]) == 0
    board = make_board("pi-tfl")
    out = tmp_path / "o"
    pack = _pack_args(hardened, board, publisher, out)
    pack[pack.index("rpi4b")] = "rpi-zero2w"
    assert main(pack) == 0
    agent = board.agent()
    agent.install((out / "pi-tfl.ewb").read_bytes())
    val = np.load(cnn.validation)
    assert agent.predict(val["x"][0]) == {"label": int(val["y"][0])}


def test_harden_served_api_applies_sealed_preprocess_and_hides_the_shape(
    make_board, pack_for
) -> None:
    """Over the local API too: raw input goes through the sealed spec, and a misfit is
    answered without the model's shape except to admin (F9)."""
    from tests.fixtures.cnn import PREPROCESS_NCHW
    from tests.fixtures.http import predict
    from tests.fixtures.serve import serve

    cnn = digits_cnn()
    board = make_board("pi-api")
    out = pack_for(cnn.onnx, [board], preprocess=PREPROCESS_NCHW)
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    served = serve(board)
    try:
        val = np.load(cnn.validation)
        st, _, doc = predict(served.connect(), served.tokens["user"], val["x"][0])  # a raw 8x8 image
        assert st == 200 and doc == {"label": int(val["y"][0])}
        misfit = np.zeros((8, 9), np.float32)
        st, _, doc = predict(served.connect(), served.tokens["user"], misfit)
        assert st == 422 and "sealed pre-processing" in doc["error"]["message"]
        assert "8" not in doc["error"]["message"]
        st, _, doc = predict(served.connect(), served.tokens["admin"], misfit)
        assert st == 422 and "the model needs 8" in doc["error"]["message"]
    finally:
        served.server.stop()
