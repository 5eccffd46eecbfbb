"""Write a board's data directory as a released agent leaves it, into tests/data/datadir-<release>/.

    python tests/data/make_datadir.py tests/data/datadir-0.1

Run once per release, with that release installed: it drives only the public commands
(`edgeward`, `edgeward-agent`) and the local HTTP API, so it records exactly what a board in the
field holds after a life of use: provisioned, two versions of a model installed, a user token,
queries answered and refused (audit log, events), and telemetry queued for an unreachable broker
(outbox). The upgrade test copies this directory and checks that the current agent keeps the
installed models, the token and the anti-rollback state. The files are never regenerated for an
old release.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


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


def run(*argv: str | Path, env: dict[str, str]) -> str:
    return subprocess.run([str(a) for a in argv], env=env, check=True, capture_output=True, text=True).stdout


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def query(sock: Path, token: str | None, row: list[float]) -> int:
    conn = UnixConnection(sock)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/v1/predict", json.dumps({"inputs": row}).encode(), headers)
    status = conn.getresponse().status
    conn.close()
    return status


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir()
    kek = bytes(range(100, 132))
    (out / "kek.bin").write_bytes(kek)
    os.chmod(out / "kek.bin", 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env["EDGEWARD_DEVICE_KEK_FILE"] = str(out / "kek.bin")
    board = out / "board"
    run(BIN / "edgeward", "keys", "publisher", "--out", work, env=env)
    shutil.copy(work / "publisher.pub", out / "publisher.pub")
    run(BIN / "edgeward-agent", "provision", "--data-dir", board, "--device-id", "field-board",
        "--publisher-pub", work / "publisher.pub", "--export", work / "enrolment.json", env=env)
    (work / "tiny.onnx").write_bytes(tiny_classifier())
    labels = work / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c"]))
    for version in (1, 2):
        run(BIN / "edgeward", "pack", work / "tiny.onnx", "--profile", "rpi4b",
            "--publisher-key", work / "publisher.key", "--device", work / "enrolment.json",
            "--model-id", "tiny", "--model-version", str(version), "--labels", labels,
            "--out", work / f"v{version}", env=env)
        run(BIN / "edgeward-agent", "install", work / f"v{version}" / "field-board.ewb",
            "--data-dir", board, env=env)
        shutil.copy(work / f"v{version}" / "field-board.ewb", out / f"v{version}.ewb")
    token = json.loads(run(BIN / "edgeward-agent", "token", "add", "--data-dir", board,
                           "--role", "user", "--json", env=env))["token"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.save(out / "input.npy", x)
    expected = json.loads(run(BIN / "edgeward-agent", "predict", "--data-dir", board,
                              "--input", out / "input.npy", env=env))
    # A broker nobody listens on: the service queues its reports in the outbox.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet = work / "fleet"
    run(BIN / "edgeward", "fleet", "ca", "init", "--fleet-dir", fleet, env=env)
    issued = json.loads(run(BIN / "edgeward", "fleet", "enrol", work / "enrolment.json",
                            "--fleet-dir", fleet, "--json", env=env))
    sock = work / "agent.sock"
    proc = subprocess.Popen(
        [BIN / "edgeward-agent", "serve", "--data-dir", board, "--socket", sock,
         "--broker", f"127.0.0.1:{port}", "--ca", fleet / "ca.crt", "--cert", issued["cert"],
         "--key", issued["key"], "--heartbeat", "0.2"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the agent did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
        statuses = [query(sock, token, row) for row in x.tolist()]
        statuses += [query(sock, None, x[0].tolist()), query(sock, "not-a-token", x[0].tolist())]
        time.sleep(1.0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    shutil.rmtree(work)
    (out / "expected.json").write_text(json.dumps({
        "token": token,  # a test-only board: the token opens nothing outside this directory
        "predict": expected,
        "statuses": statuses,
        "model_id": "tiny",
        "installed_version": 2,
        "previous_version": 1,
    }, indent=2) + "\n")
    print(f"data dir written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
