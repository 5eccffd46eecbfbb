"""Write the golden bundle of a released format version into tests/data/v<N>/ (run once per release).

    python tests/data/make_golden.py tests/data/v1
    python tests/data/make_golden.py tests/data/v2

Version 2 (a shared release) adds payload.ewp, the board's envelope (envelopes/golden-board.ewe),
another board's envelope of the same release (envelopes/golden-other.ewe, so the Merkle tree has
two leaves and the proof is not empty) and the board's single file (golden.ewb: envelope, then
payload).

The directory then holds: a tiny real ONNX classifier's bundle (golden.ewb), the publisher's
public key, a provisioned board whose keys are wrapped under the test-only key file kek.bin,
an input and the labels the model must give for it. These files are never regenerated for an
old version: the test proves new agents still read what old packagers wrote.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from device_agent import Agent, crypto
from device_agent.bundle.enrolment import load_enrolment
from device_agent.bundle.keyfiles import public_key_pem
from device_agent.store.keys import KeySource
from packager.modelfile import ModelFile, infer_task
from packager.pack import PackOptions, pack
from packager.profiles import load_profile


def tiny_classifier() -> bytes:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    kek = bytes(range(100, 132))
    (out / "kek.bin").write_bytes(kek)
    signer = Ed25519PrivateKey.generate()
    pub = crypto.ed25519_public_raw(signer)
    (out / "publisher.pub").write_bytes(public_key_pem(pub))
    enrolment = Agent.provision(out / "board", "golden-board", [pub], [], KeySource(kek=kek),
                                now=datetime(2026, 11, 22, tzinfo=UTC))
    model = ModelFile(out / "tiny.onnx", tiny_classifier(), "onnx")
    opts = PackOptions(model_id="golden", model_version=1, task=infer_task(model, {"labels": ["a", "b", "c"]}),
                       created=datetime(2026, 11, 22, tzinfo=UTC))
    pack(model, load_profile("rpi4b"), signer, [load_enrolment(enrolment)], opts, out / "packed")
    (out / "packed" / "golden-board.ewb").rename(out / "golden.ewb")
    for p in (out / "packed").iterdir():
        p.unlink()
    (out / "packed").rmdir()
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.save(out / "input.npy", x)
    probe = out / "probe"  # install into a copy: the committed board stays freshly provisioned
    shutil.copytree(out / "board", probe)
    agent = Agent(probe, KeySource(kek=kek))
    agent.install((out / "golden.ewb").read_bytes())
    expected = [p["label"] for p in agent.predict(x)["predictions"]]
    shutil.rmtree(probe)
    (out / "expected.json").write_text(json.dumps({"labels": expected, "model_sha256": model.sha256}) + "\n")
    print(f"golden bundle written to {out}")


def main_v2(out: Path) -> None:
    import tempfile

    from packager.release import pack_release

    out.mkdir(parents=True, exist_ok=True)
    kek = bytes(range(100, 132))
    (out / "kek.bin").write_bytes(kek)
    signer = Ed25519PrivateKey.generate()
    pub = crypto.ed25519_public_raw(signer)
    (out / "publisher.pub").write_bytes(public_key_pem(pub))
    created = datetime(2026, 12, 4, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "golden-board.json").write_bytes(
            Agent.provision(out / "board", "golden-board", [pub], [], KeySource(kek=kek), now=created))
        (work / "golden-other.json").write_bytes(
            Agent.provision(work / "other", "golden-other", [pub], [], KeySource(kek=kek), now=created))
        model = ModelFile(out / "tiny.onnx", tiny_classifier(), "onnx")
        opts = PackOptions(model_id="golden", model_version=1, task=infer_task(model, {"labels": ["a", "b", "c"]}),
                           created=created)
        from packager.signers import FileSigner

        enrolments = [work / "golden-board.json", work / "golden-other.json"]
        pack_release(model, load_profile("rpi4b"), FileSigner(signer), enrolments, opts, work / "packed")
        shutil.copy(work / "packed" / "payload.ewp", out / "payload.ewp")
        shutil.copytree(work / "packed" / "envelopes", out / "envelopes")
    env = (out / "envelopes" / "golden-board.ewe").read_bytes()
    (out / "golden.ewb").write_bytes(env + (out / "payload.ewp").read_bytes())
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.save(out / "input.npy", x)
    probe = out / "probe"
    shutil.copytree(out / "board", probe)
    agent = Agent(probe, KeySource(kek=kek))
    agent.install_release(out / "envelopes" / "golden-board.ewe", out / "payload.ewp")
    expected = [p["label"] for p in agent.predict(x)["predictions"]]
    shutil.rmtree(probe)
    (out / "expected.json").write_text(json.dumps({"labels": expected, "model_sha256": model.sha256}) + "\n")
    print(f"golden release written to {out}")


if __name__ == "__main__":
    target = Path(sys.argv[1])
    main_v2(target) if target.name == "v2" else main(target)
