"""``edgeward pack`` compresses only when it pays: float32 weights, which zlib shrinks by a few
percent at great cost, are sealed as they are; weights that compress well are zlibbed. Either way
the bundle installs on a real board and answers exactly as onnxruntime does on the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.bundle.format import verify_bundle
from device_agent.bundle.keyfiles import load_public_key_file
from device_agent.errors import UsageError
from packager.pack import PackOptions, estimate_saving

SIDE = 724  # a float32 [724, 724] initializer: 2 MiB, past the size below which pack always tries zlib


def _matmul(tmp_path: Path, name: str, w: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, SIDE])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, SIDE])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def float_weights(tmp_path: Path) -> Path:
    """Trained-like float32 weights: zlib saves about 7% of them, above the 5% it used to take."""
    return _matmul(tmp_path, "dense", np.random.default_rng(1).standard_normal((SIDE, SIDE), dtype=np.float32))


@pytest.fixture
def coarse_weights(tmp_path: Path) -> Path:
    """Weights on a coarse grid with many zeros (a pruned, quantised-then-dequantised layer)."""
    w = np.random.default_rng(2).standard_normal((SIDE, SIDE)).round().astype(np.float32)
    return _matmul(tmp_path, "coarse", w)


def _install_and_compare(board, out: Path, model: Path, publisher: Path) -> str:
    """Install the bundle on the board and check its answer is onnxruntime's on the model;
    returns the compression the publisher signed in the bundle's manifest."""
    bundle = (out / f"{board.device_id}.ewb").read_bytes()
    signed = verify_bundle(bundle, [load_public_key_file(publisher / "publisher.pub")]).manifest.compression
    assert json.loads((out / "report.json").read_text())["model"]["compression"] == signed
    agent = board.agent()
    agent.install(bundle)
    x = np.random.default_rng(3).standard_normal((4, SIDE), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = [int(session.run(None, {"X": row[None]})[0].argmax()) for row in x]
    assert [agent.predict(row)["label"] for row in x] == want
    return signed


def test_float_weights_that_barely_compress_are_sealed_uncompressed(float_weights, make_board, pack_for, publisher):
    board = make_board()
    assert _install_and_compare(board, pack_for(float_weights, [board]), float_weights, publisher) == "none"


def test_weights_that_compress_well_are_zlibbed(coarse_weights, make_board, pack_for, publisher):
    board = make_board()
    out = pack_for(coarse_weights, [board])
    assert _install_and_compare(board, out, coarse_weights, publisher) == "zlib"
    model = json.loads((out / "report.json").read_text())["model"]
    assert model["sealed_bytes"] < 0.5 * model["size_bytes"]


def test_compression_zlib_and_none_are_obeyed(float_weights, make_board, pack_for, publisher):
    """``--compression zlib`` zlibs what saves at least 5% even when it does not pay;
    ``--compression none`` (``--no-compress``) never compresses."""
    for version, (asked, got) in enumerate((("zlib", "zlib"), ("none", "none")), start=1):
        board = make_board(f"pi-{asked}")
        out = pack_for(float_weights, [board], version=version, compression=asked)
        assert _install_and_compare(board, out, float_weights, publisher) == got


def test_an_unknown_compression_is_a_usage_error():
    with pytest.raises(UsageError, match="compression must be one of auto, zlib, none"):
        PackOptions(model_id="m", model_version=1, compression="lzma")


def test_the_sampled_estimate_is_close_to_what_zlib_saves_on_the_whole(float_weights, coarse_weights):
    import zlib

    for path in (float_weights, coarse_weights):
        data = path.read_bytes()
        whole = 1 - len(zlib.compress(data, 1)) / len(data)
        assert abs(estimate_saving(data) - whole) < 0.03
    assert estimate_saving(float_weights.read_bytes()) < 0.10 <= estimate_saving(coarse_weights.read_bytes())


# Whole-process costs: packing a plain ONNX model parses it with the protobuf module onnx ships,
# without ``import onnx`` (0.45 s of ml_dtypes at start-up), and gets the same bytes either way.

_PACK_IN_A_FRESH_PROCESS = """
import json, sys
from packager.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "onnx_imported": "onnx" in sys.modules,
                  "heavy_commands_imported": sorted({"packager.redteam", "fleet.cli"} & set(sys.modules))}))
"""


def _pack_cli(tmp_path: Path, model: Path, board, publisher: Path, out: Path) -> dict:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _PACK_IN_A_FRESH_PROCESS, "pack", str(model), "--profile", "rpi4b",
         "--publisher-key", str(publisher / "publisher.key"), "--device", str(board.enrolment),
         "--model-version", "1", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_packing_a_plain_onnx_model_imports_neither_onnx_nor_the_heavy_commands(
    digits, make_board, publisher, tmp_path
):
    board = make_board()
    out = tmp_path / "out"
    assert _pack_cli(tmp_path, digits.onnx, board, publisher, out) == {
        "rc": 0, "onnx_imported": False, "heavy_commands_imported": []}
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    assert json.loads((out / "report.json").read_text())["model"]["sha256"] == __import__("hashlib").sha256(
        digits.onnx.read_bytes()).hexdigest()


def test_external_data_is_inlined_to_the_same_bytes_without_onnx(digits, make_board, publisher, tmp_path):
    """The model with its weights in a side file is inlined by the protobuf module alone to exactly
    the bytes the onnx package makes (this process has onnx imported), and installs."""
    import hashlib

    from packager.harden.supply import inline_external_data
    from tests.test_harden_cli import _external_model

    src = _external_model(tmp_path, digits)
    inlined, files = inline_external_data(src, src.read_bytes(), 2**31 - 1)
    assert files == ["weights.bin"]
    board = make_board()
    out = tmp_path / "out"
    assert _pack_cli(tmp_path, src, board, publisher, out) == {
        "rc": 0, "onnx_imported": False, "heavy_commands_imported": []}
    assert json.loads((out / "report.json").read_text())["model"]["sha256"] == hashlib.sha256(inlined).hexdigest()
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    x = np.load(digits.test)["x"][:8]
    session = ort.InferenceSession(inlined, providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0].tolist()
    assert [board.agent().predict(row)["label"] for row in x] == want


def test_onnx_imported_after_the_protobuf_module_shares_its_classes(tmp_path):
    import subprocess
    import sys

    code = (
        "from packager.onnxproto import messages, parse_model\n"
        "m = messages()\n"
        "assert m.__name__ == 'packager._onnx_ml_pb2', m.__name__\n"
        "import onnx\n"
        "assert m.ModelProto is onnx.ModelProto and m.TensorProto is onnx.TensorProto\n"
        "from onnx import helper\n"
        "g = helper.make_graph([helper.make_node('Relu', ['X'], ['Y'])], 'g',"
        " [helper.make_tensor_value_info('X', 1, [1])], [helper.make_tensor_value_info('Y', 1, [1])])\n"
        "model = parse_model(helper.make_model(g).SerializeToString(), 'm')\n"
        "onnx.checker.check_model(model)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(root), timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_the_estimate_of_contents_no_larger_than_the_sample_is_the_whole():
    import zlib

    for data in (b"", b"a" * 1000, bytes(range(256)) * 4096):
        assert estimate_saving(data) == (1 - len(zlib.compress(data, 1)) / max(len(data), 1))
