"""Loading a model costs at most twice its size at peak: the decrypted buffer is the model's
memory (docs/agent-service.md, "Memory"); the answers are those of a plain load."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import FormatError
from device_agent.runtime.onnx_weights import split_weights
from device_agent.runtime.runners import OnnxRunner, load_from_buffer, load_runner
from tests.fixtures.hardening import digits_cnn
from tests.fixtures.models import silero_vad_onnx

ROOT = Path(__file__).parents[1]
SIDE = 3000  # float32 [3000, 3000]: a 36 MB model, big enough to dwarf the runtime's own memory


def _feeds(which: str, digits_x: np.ndarray) -> tuple[Path, dict[str, np.ndarray]]:
    if which == "silero-vad":
        rng = np.random.default_rng(0)
        return silero_vad_onnx(), {
            "input": rng.standard_normal((1, 512)).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
    cnn = digits_cnn()
    x = (np.load(cnn.validation)["x"][:16] / 16).astype(np.float32)[:, None]
    return (cnn.onnx, {"digit_image": x}) if which == "digits-cnn" else (Path(), {"x": digits_x})


@pytest.mark.parametrize("which", ["digits-mlp", "digits-cnn", "silero-vad"])
def test_weights_served_from_the_buffer_answer_as_a_plain_load(which: str, digits, digits_test) -> None:
    path, feeds = _feeds(which, digits_test[0][:16])
    data = (digits.onnx if which == "digits-mlp" else path).read_bytes()
    plain = load_runner("onnxruntime", data)
    if which == "digits-mlp":
        feeds = {plain.inputs[0].name: feeds["x"]}
    _, weights = split_weights(data)
    # silero-vad keeps its weights in Constant nodes of If branches: they stay in the graph.
    assert bool(weights) == (which != "silero-vad"), "the large initializers are served from the buffer"
    lead = b"sidecar and header bytes before the model"
    buffer = bytearray(lead + data + b"trailing bytes")
    runner = load_from_buffer("onnxruntime", buffer, len(lead), len(data))
    for a, b in zip(plain.run(feeds), runner.run(feeds), strict=True):
        if which == "digits-cnn":
            # Served in place, convolutions run without onnxruntime's NCHWc layout (runners.py):
            # other kernels, the same answers to float rounding.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(a.argmax(axis=1), b.argmax(axis=1))
        else:
            np.testing.assert_array_equal(a, b)
    # Only the weights remain in the buffer; the graph, the sidecar and the rest are wiped.
    assert buffer.count(0) >= len(buffer) - sum(w.length for w in weights)
    runner.close()
    assert buffer.count(0) == len(buffer)  # unloading wipes the plaintext


def test_truncated_or_corrupt_models_are_format_errors(digits) -> None:
    data = digits.onnx.read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 300)):
        # A cut at a field boundary is a shorter valid protobuf; any other is a FormatError.
        with contextlib.suppress(FormatError):
            split_weights(data[:cut])
    with pytest.raises(FormatError):
        split_weights(b"\x0f" + data)  # wire type 7 does not exist
    with pytest.raises(FormatError, match="graphs"):
        split_weights(b"\x08\x08")  # an ir_version and no graph
    buffer = bytearray(b"\x3a\x05\x2a\x03\x0a\x01")  # a graph whose initializer runs past its end
    with pytest.raises(FormatError):
        OnnxRunner.from_buffer(buffer, 0, len(buffer))


CHILD = r"""
import json, sys
import onnxruntime  # library code, not model memory
from device_agent.agent import Agent
from device_agent.store.keys import KeySource

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

agent = Agent(sys.argv[1], KeySource(kek=bytes.fromhex(sys.argv[2])))
before = status()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
loaded = agent.model()
print(json.dumps({"extra_peak": status()["VmHWM"] - before["VmRSS"], "model": loaded.sidecar.model_length}))
"""


@pytest.mark.parametrize("compress", [False, True])
def test_loading_a_model_peaks_at_most_twice_its_size(tmp_path: Path, publisher: Path, compress: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from device_agent.agent import Agent
    from device_agent.bundle.enrolment import load_enrolment
    from device_agent.bundle.keyfiles import load_public_key_file
    from device_agent.store.keys import KeySource
    from packager.keys import load_private_key
    from packager.modelfile import ModelFile
    from packager.pack import PackOptions, pack
    from packager.profiles import load_profile
    from packager.signers import FileSigner

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak")
    w = np.random.default_rng(0).standard_normal((SIDE, SIDE), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, SIDE])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, SIDE])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    del model, graph, w
    kek = os.urandom(32)
    keys = KeySource(kek=kek)
    board = tmp_path / "board"
    enrolment = load_enrolment(
        Agent.provision(board, "pi-mem", [load_public_key_file(publisher / "publisher.pub")], [], keys)
    )
    opts = PackOptions(model_id="big", model_version=1, compression="zlib" if compress else "none",
                       task={"kind": "raw", "output": 0})
    pack(ModelFile(Path("big.onnx"), data, "onnx"), load_profile("rpi4b"),
         FileSigner(load_private_key(publisher / "publisher.key")), [enrolment], opts, tmp_path / "out")
    Agent(board, keys).install(bytearray((tmp_path / "out" / "pi-mem.ewb").read_bytes()))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(board), kek.hex()], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == len(data)
    ratio = result["extra_peak"] / len(data)
    assert ratio <= 2.0, f"loading peaked at {ratio:.2f}x the model"
    del onnx


def test_a_learnt_head_must_name_weights_of_the_model_with_their_shapes(digits) -> None:
    """Replacing weights the graph does not have, or with another shape, is refused at load;
    onnxruntime would otherwise ignore an unknown name and serve the shipped weights."""
    import onnx

    model = Path(digits.onnx).read_bytes()
    inits = {i.name: tuple(i.dims) for i in onnx.load_from_string(model).graph.initializer
             if i.data_type == onnx.TensorProto.FLOAT}
    small = min(inits, key=lambda n: int(np.prod(inits[n])))  # stays inline unless named
    good = {small: np.zeros(inits[small], np.float32)}
    runner = OnnxRunner.from_buffer(bytearray(model), 0, len(model), 0, good)
    runner.close()
    for bad in ({"no-such-weight": np.zeros(3, np.float32)}, {small: np.zeros((*inits[small], 2), np.float32)}):
        with pytest.raises(FormatError, match="learnt head"):
            OnnxRunner.from_buffer(bytearray(model), 0, len(model), 0, bad)
