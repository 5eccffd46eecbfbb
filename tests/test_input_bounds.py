"""Hostile .npy/.npz inputs: every declared size is checked before memory is spent on it.

The attacks of the "Hostile input and faults" run: an .npz under the 1 MiB request limit whose
member inflates (deflate, bzip2) to more than 1 GB, and an .npy header declaring 2**40 elements.
Each is refused with a FormatError (HTTP 422, exit 3) in bounded memory, through the decoder the
API uses, the real HTTP API and the real command line; the decoder is fuzzed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import FormatError
from device_agent.service.service import decode_inputs
from tests.conftest import PASSPHRASE
from tests.fixtures.http import request
from tests.fixtures.serve import Served, serve

ROOT = Path(__file__).resolve().parent.parent
EXPANDED = 2**30  # float32 zeros the bombs inflate to: 1 GiB, plus the .npy header
BOUNDED_RSS = 100 * 1024**2  # peak memory growth allowed while refusing a bomb


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _bomb(method: int) -> bytes:
    """An .npz whose one member is a 1 GiB float32 .npy of zeros, compressed with ``method``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("arr_0.npy")  # the name np.savez gives, so it would reach the model
        info.compress_type = method
        with z.open(info, "w") as f:
            f.write(_npy_header((EXPANDED // 4,)))
            zeros = bytes(16 * 1024**2)
            for _ in range(EXPANDED // len(zeros)):
                f.write(zeros)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bombs")
    paths = {}
    for name, method in (("deflate", zipfile.ZIP_DEFLATED), ("bzip2", zipfile.ZIP_BZIP2)):
        paths[name] = out / f"{name}.npz"
        paths[name].write_bytes(_bomb(method))
    paths["npy"] = out / "huge.npy"
    paths["npy"].write_bytes(_npy_header((2**40,)) + bytes(64))  # 2**40 float32 declared, 64 bytes sent
    paths["cut"] = out / "cut.npy"
    paths["cut"].write_bytes(_npy_header((4,)) + bytes(3))  # the same refusal on every version
    return paths


def test_the_bombs_fit_the_request_limit(bombs: dict[str, Path]) -> None:
    assert bombs["deflate"].stat().st_size < 1024**2  # deflate's best ratio is about 1:1032
    assert bombs["bzip2"].stat().st_size < 2048
    with zipfile.ZipFile(bombs["bzip2"]) as z:
        assert z.infolist()[0].file_size > EXPANDED


# The decoder the API calls, in a child process so its peak memory can be measured.
DECODE = """
import json, resource, sys
from pathlib import Path
from device_agent.errors import FormatError
from device_agent.service.service import decode_inputs
body = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = __import__("time").monotonic()
try:
    decode_inputs(body, "application/x-npz")
    result = "decoded"
except FormatError as e:
    result = "FormatError: " + str(e)
except BaseException as e:
    result = type(e).__name__ + ": " + str(e)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"result": result, "growth": growth, "seconds": __import__("time").monotonic() - start}))
"""


def _decode_in_child(path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", DECODE, str(path)], env=env, capture_output=True, text=True,
                       timeout=300, preexec_fn=_limit_address_space)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _limit_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 * 1024**3, 6 * 1024**3))  # a bomb may not take the host down


@pytest.mark.parametrize("method", ["deflate", "bzip2"])
def test_a_compressed_npz_bomb_is_refused_quickly_in_bounded_memory(bombs: dict[str, Path], method: str) -> None:
    got = _decode_in_child(bombs[method])
    assert got["result"].startswith("FormatError:"), got
    assert got["growth"] < BOUNDED_RSS, got
    assert got["seconds"] < 5, got


def test_an_npy_header_declaring_2_to_the_40_elements_is_a_format_error() -> None:
    body = _npy_header((2**40,)) + bytes(64)
    with pytest.raises(FormatError, match="declares"):
        decode_inputs(body, "application/x-npy")


# --- through the real HTTP API ---------------------------------------------------------------


@pytest.fixture
def served(make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any) -> Iterator[Served]:
    board = make_board()
    out = pack_for(digits.onnx, [board])
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    s = serve(board)
    yield s
    s.server.stop()


def test_the_http_api_answers_422_to_each_hostile_body(served: Served, bombs: dict[str, Path]) -> None:
    admin = served.tokens["admin"]
    got = {}
    for name, ctype in (("deflate", "application/x-npz"), ("bzip2", "application/x-npz"),
                        ("npy", "application/x-npy")):
        start = time.monotonic()
        status, _, doc = request(served.connect(), "POST", "/v1/predict", admin, bombs[name].read_bytes(), ctype)
        got[name] = (status, doc["error"]["message"][:120] if status != 200 else doc, time.monotonic() - start)
    assert all(st == 422 and "pickles are refused" in msg and secs < 10 for st, msg, secs in got.values()), got
    status, _, _ = request(served.connect(), "GET", "/v1/health")
    assert status == 200  # still serving


def test_a_well_formed_npz_body_still_predicts(served: Served, digits_test: Any) -> None:
    x, y = digits_test
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, x[:2])
        status, _, doc = request(served.connect(), "POST", "/v1/predict", served.tokens["admin"],
                                 buf.getvalue(), "application/x-npz")
        assert status == 200 and [p["label"] for p in doc["predictions"]] == [int(v) for v in y[:2]], doc


# --- through the real command line ---------------------------------------------------------------

CLI = """
import resource, sys
from device_agent.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
sys.exit(code)
"""


def test_the_cli_exits_3_on_each_hostile_file_in_bounded_memory(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, bombs: dict[str, Path]
) -> None:
    board = make_board()
    out = pack_for(digits.onnx, [board])
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEWARD_DEVICE_PASSPHRASE": PASSPHRASE.decode()}

    def predict(path: Path) -> tuple[int, str, int]:
        r = subprocess.run([sys.executable, "-c", CLI, "predict", "--data-dir", str(board.data_dir),
                            "--input", str(path)], env=env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL, preexec_fn=_limit_address_space)
        *lines, peak = r.stderr.strip().splitlines() or ["0"]
        return r.returncode, "\n".join(lines), int(peak) if peak.isdigit() else -1

    code, err, control = predict(bombs["cut"])  # refused where every version refuses it
    assert code == 3, err
    got = {name: predict(bombs[name]) for name in ("deflate", "bzip2", "npy")}
    assert all(0 < peak < control + BOUNDED_RSS for _, _, peak in got.values()), (control, got)
    assert all(code == 3 and "not a readable .npy" in err for code, err, _ in got.values()), got


# --- the decoder, fuzzed ---------------------------------------------------------------------


def _valid_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _valid_npz(compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=np.arange(12, dtype=np.float32).reshape(3, 4),
                                                      y=np.ones(3, dtype=np.int64))
    return buf.getvalue()


def _decode_or_refuse(body: bytes) -> None:
    from device_agent.config import BundleLimits
    from device_agent.runtime.arrays import load_arrays

    try:
        got = load_arrays(body, BundleLimits(max_input_bytes=4096))
    except FormatError:
        return
    arrays = got.values() if isinstance(got, dict) else [got]
    for a in arrays:
        assert isinstance(a, np.ndarray) and a.dtype.kind in "biuf" and a.nbytes <= 4096


FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_decode_or_are_refused(body: bytes) -> None:
    _decode_or_refuse(body)
    _decode_or_refuse(b"\x93NUMPY" + body)
    _decode_or_refuse(b"PK\x03\x04" + body)


SEEDS = [_valid_npy(np.arange(6, dtype=np.float32).reshape(2, 3)), _valid_npy(np.zeros((2, 2), order="F")),
         _valid_npz(False), _valid_npz(True)]


@pytest.mark.parametrize("key", ["b'fortran_order'", "1", "None"])
def test_an_npy_header_with_a_key_that_is_not_a_string_is_a_format_error(key: str) -> None:
    """numpy sorts the header's keys, so a bytes, int or None key made it raise TypeError: an
    internal error (500, exit 70) instead of the refusal of a malformed input (422, exit 3)."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), {key}: 1}}".encode()
    header = text + b" " * (64 - (10 + len(text) + 1) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(24)
    with pytest.raises(FormatError, match="not a dictionary of its three string keys"):
        decode_inputs(body, "application/x-npy")


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 10**6))
def test_fuzz_mutated_npy_and_npz_decode_or_are_refused(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    body = bytearray(seed)
    for at, value in flips:
        body[at % len(body)] = value  # headers, zip records and data alike
    _decode_or_refuse(bytes(body))
    _decode_or_refuse(bytes(body[: cut % (len(body) + 1)]))


@FUZZ
@given(st.lists(st.integers(-3, 2**62), max_size=5), st.sampled_from(["<f4", ">i8", "|b1", "<c8", "|O", "<U3", "|V8"]))
def test_fuzz_declared_npy_headers_decode_or_are_refused(shape: list[int], descr: str) -> None:
    _decode_or_refuse(_npy_header(tuple(shape), descr) + bytes(64))


def test_a_fifo_as_the_predict_input_is_refused_at_once(tmp_path, make_board) -> None:
    """`predict --input` and `command FILE` read through one bounded reader that refuses a FIFO
    (which would otherwise block with no writer) instead of waiting on it."""
    import os
    import subprocess
    import sys

    from tests.conftest import PASSPHRASE

    board = make_board()
    fifo = tmp_path / "input.npy"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWARD_")}
    env["EDGEWARD_DEVICE_PASSPHRASE"] = PASSPHRASE.decode()
    for argv in (["predict", "--input", str(fifo)], ["command", str(fifo), "--result", str(tmp_path / "r")]):
        r = subprocess.run([sys.executable, "-m", "device_agent.cli", *argv, "--data-dir", str(board.data_dir)],
                           capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, env=env)
        assert r.returncode == 3 and "not a regular file" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("value", "have", "want"),
    [(1e39, np.float64, np.float32), (7e4, np.float32, np.float16), (300, np.int64, np.uint8),
     (-1, np.int32, np.uint8), (2**40, np.int64, np.int32)],
)
def test_a_value_outside_the_models_dtype_is_refused_not_cast_to_inf_or_wrapped(
    value: float, have: Any, want: Any
) -> None:
    from device_agent.runtime.output import _coerce
    from device_agent.runtime.runners import TensorSpec

    x = np.array([[0, value]], dtype=have)
    with pytest.raises(FormatError, match="range"):
        _coerce(x, TensorSpec("x", want, (None, 2)), "input 0")
    ok, _ = _coerce(np.array([[0, 1]], dtype=have), TensorSpec("x", want, (None, 2)), "input 0")
    assert ok.dtype == np.dtype(want)
