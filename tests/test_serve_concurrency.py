"""Concurrent clients on the real local API, on both runtimes: every answer is the one a client
asking alone gets (docs/agent-service.md, "Concurrency")."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.hardening import digits_cnn
from tests.fixtures.http import predict
from tests.fixtures.serve import serve

# No client is throttled: the test is about the runner, not the limits.
OPEN_POLICY = {
    "throttle": {
        "client_rate": 1e6, "client_burst": 1e6, "global_rate": 1e6, "global_burst": 1e6,
        "daily_budget": 10**9,
    }
}
CLIENTS = 4
CALLS = 60  # per client


def _inputs(fmt: str) -> np.ndarray:
    raw = np.load(digits_cnn().validation)["x"][:24]
    x = (raw / 16.0).astype(np.float32)
    return x[..., None] if fmt == "tflite" else x[:, None]  # NHWC for LiteRT, NCHW for ONNX


@pytest.mark.parametrize(("fmt", "profile"), [("onnx", "rpi4b"), ("tflite", "rpi-zero2w")])
def test_concurrent_clients_with_different_batch_sizes_get_the_single_threaded_answers(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], fmt: str, profile: str
) -> None:
    board = make_board()
    model = digits_cnn().onnx if fmt == "onnx" else digits_cnn().tflite
    out = pack_for(model, [board], profile=profile, policy=OPEN_POLICY)
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    s = serve(board)
    x = _inputs(fmt)
    try:
        token = s.tokens["admin"]  # scores: the most detail to compare
        # Client c sends batches of c + 1 rows (1 to 4), each starting at a different row.
        batches = {
            (c, i): x[(c * 7 + i) % 20 : (c * 7 + i) % 20 + c + 1] for c in range(CLIENTS) for i in range(CALLS)
        }
        alone = s.connect()
        reference = {}
        for key, batch in batches.items():
            st, _, doc = predict(alone, token, batch)
            assert st == 200, doc
            reference[key] = doc
        got: dict[tuple[int, int], tuple[int, Any]] = {}
        start = threading.Barrier(CLIENTS)

        def client(c: int) -> None:
            conn = s.connect()
            start.wait()
            for i in range(CALLS):
                st, _, doc = predict(conn, token, batches[(c, i)])
                got[(c, i)] = (st, doc)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wrong = {k: v for k, v in got.items() if v != (200, reference[k])}
        assert len(got) == CLIENTS * CALLS
        assert not wrong, f"{len(wrong)} of {len(got)} answers differ, e.g. {next(iter(wrong.items()))}"
        assert s.service.counters["answered"] == 2 * CLIENTS * CALLS
    finally:
        s.server.stop()
