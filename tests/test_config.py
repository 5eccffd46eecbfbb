"""The board's one configuration object: every field read, every bad value refused, no limit
defined anywhere else, and the object really passed down."""

from __future__ import annotations

import ast
import importlib
import math
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import (
    DEFAULT_CONFIG,
    DEFAULT_LIMITS,
    AgentConfig,
    BundleLimits,
    DetectConfig,
    ServeConfig,
    ThrottleConfig,
)
from device_agent.errors import FormatError, UsageError
from packager.limits import HOST_LIMITS, HostLimits
from tests.fixtures.serve import SimClock

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("device_agent", "packager", "fleet")


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every field of a config, recursively, groups included."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        here = f"{path}.{f.name}" if path else f.name
        yield here, value
        if is_dataclass(value):
            yield from _leaves(value, here)


def _with(config: Any, path: str, value: Any) -> Any:
    """``config`` with the field at dotted ``path`` set to ``value`` (every group re-made)."""
    head, _, rest = path.partition(".")
    if not rest:
        return replace(config, **{head: value})
    return replace(config, **{head: _with(getattr(config, head), rest, value)})


def _product_source(skip: set[Path]) -> str:
    return "\n".join(
        p.read_text() for pkg in PRODUCT for p in sorted((ROOT / pkg).rglob("*.py")) if p not in skip
    )


CONFIG_PATHS = [p for p, _ in _leaves(DEFAULT_CONFIG)]
NUMBER_PATHS = [p for p, v in _leaves(DEFAULT_CONFIG) if isinstance(v, int | float) and not isinstance(v, bool)]


def test_every_config_field_is_read_somewhere_in_the_product() -> None:
    source = _product_source({ROOT / "device_agent" / "config.py", ROOT / "packager" / "limits.py"})
    names = {p.rsplit(".", 1)[-1] for p in CONFIG_PATHS} | {f.name for f in fields(HostLimits)}
    unread = sorted(n for n in names if not re.search(rf"\.{n}\b", source))
    assert not unread, f"config fields nobody reads: {unread}"


def test_defaults_are_the_bounds_the_board_had() -> None:
    """The values that were module constants before they moved here: never loosened by a move."""
    c = DEFAULT_CONFIG
    assert (c.serve.http.read_timeout, c.serve.http.drain_factor) == (30.0, 16)
    assert (c.serve.http.max_header_line, c.serve.http.max_headers) == (8192, 64)
    r = c.telemetry.report
    assert (r.max_report_bytes, r.max_depth, r.max_list_items, r.max_string, r.max_key_chars) == (
        16 * 1024, 5, 64, 512, 64,
    )  # fmt: skip
    assert (c.documents.max_enrolment_bytes, c.documents.max_key_file_bytes) == (16 * 1024, 16 * 1024)
    assert c.documents.max_string_field == 256
    assert c.serve.max_evidence_bytes == 4096
    assert c.telemetry.keepalive_s == 30
    assert DEFAULT_LIMITS is c.bundle and c.bundle == BundleLimits()
    assert (HOST_LIMITS.max_json_bytes, HOST_LIMITS.max_model_bytes) == (16 * 1024**2, 2**31 - 1)


@pytest.mark.parametrize("path", NUMBER_PATHS)
@pytest.mark.parametrize("bad", [-1, "8", None, True, math.nan])
def test_a_bad_value_is_refused_naming_its_field(path: str, bad: Any) -> None:
    with pytest.raises(UsageError, match=rf"^{re.escape(path)} must be "):
        _with(DEFAULT_CONFIG, path, bad)


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("bundle.min_chunk_bytes", DEFAULT_LIMITS.max_chunk_bytes + 1, "bundle.min_chunk_bytes"),
        ("bundle.max_input_bytes", 3, "bundle.max_input_bytes"),
        ("bundle.max_manifest_bytes", 2**32, "bundle.max_manifest_bytes"),
        ("serve.detect.ood_count", DetectConfig().window + 1, "serve.detect.ood_count"),
        ("serve.detect.prada_min", DetectConfig().prada_window + 1, "serve.detect.prada_min"),
        ("serve.detect.prada_w", 1.5, "serve.detect.prada_w"),
        ("serve.max_rows", 0, "serve.max_rows"),
        ("serve.throttle", {"daily_budget": 0}, "serve.throttle"),
        ("serve.throttle", {"nope": 1}, "serve.throttle"),
        ("serve.throttle", [], "serve.throttle"),
        ("serve.http", {}, "serve.http"),
        ("telemetry.backoff", (30, 1), "telemetry.backoff"),
        ("telemetry.backoff", (0, 30), "telemetry.backoff"),
        ("telemetry.backoff", [1, 30], "telemetry.backoff"),
        ("telemetry.report.max_depth", 0, "telemetry.report.max_depth"),
        ("throttle.anomaly_slowdown", 0, "throttle.anomaly_slowdown"),
        ("bundle", DEFAULT_CONFIG.documents, "config.bundle"),
    ],
)
def test_out_of_range_and_inconsistent_values_are_refused(path: str, value: Any, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        _with(DEFAULT_CONFIG, path, value)


def test_zero_is_sane_where_it_means_never() -> None:
    cfg = _with(_with(DEFAULT_CONFIG, "serve.http.drain_factor", 0), "serve.detect.cooldown", 0)
    assert (cfg.serve.http.drain_factor, cfg.serve.detect.cooldown) == (0, 0)
    assert _with(DEFAULT_CONFIG, "telemetry.drain_s", 0).telemetry.drain_s == 0


def test_host_limits_refuse_bad_values() -> None:
    with pytest.raises(UsageError, match="host.max_json_bytes"):
        HostLimits(max_json_bytes=0)


def test_documents_keep_their_own_error_class() -> None:
    """A sealed policy or a local --config file is a document: malformed is exit 3 as before;
    settings the local file may not name, or that are out of range, are usage errors."""
    with pytest.raises(FormatError, match="throttle.client_rate"):
        ThrottleConfig.from_json({"client_rate": 0})
    with pytest.raises(FormatError, match="unknown throttle limits"):
        ThrottleConfig.from_json({"nope": 1})
    with pytest.raises(FormatError):
        ServeConfig.from_json({"throttle": {"daily_budget": -1}})
    with pytest.raises(UsageError, match="serve.detect.window"):
        ServeConfig.from_json({"detect": {"window": 0}})
    with pytest.raises(UsageError, match="unknown service settings: http"):
        ServeConfig.from_json({"http": {}})
    base = ThrottleConfig(daily_budget=7)
    assert ThrottleConfig.from_json({"client_rate": 1}, base) == replace(base, client_rate=1)


# --- no limit defined anywhere else ----------------------------------------------------------

LIMIT_NAME = re.compile(r"^(MAX_\w+|MIN_\w+|\w+_TIMEOUT|\w+_LIMIT|\w+_BYTES)$")
# Genuine format constants: part of a format's definition, the same on every board.
FORMAT_CONSTANTS = {
    ("device_agent.crypto", "KEY_BYTES"): "X25519/Ed25519/AEAD key size",
    ("device_agent.crypto", "TAG_BYTES"): "AEAD tag size",
    ("device_agent.crypto", "SIGNATURE_BYTES"): "Ed25519 signature size",
    ("device_agent.crypto", "KEY_ID_BYTES"): "key id size in the bundle header",
    ("device_agent.bundle.format", "HEADER_BYTES"): "size of the fixed bundle header struct",
    ("device_agent.crypto", "HASH_BYTES"): "SHA-256 size: a Merkle leaf, node and proof entry",
    ("device_agent.crypto", "SEALED_KEY_BYTES"): "a content key in a libsodium sealed box",
    ("device_agent.bundle.release", "PREFIX_BYTES"): "size of the v2 files' fixed magic/version/flags/length",
    ("device_agent.bundle.release", "PAYLOAD_HEADER_BYTES"): "size of the fixed payload.ewp header struct",
    ("device_agent.bundle.release", "ENVELOPE_MIN_BYTES"): "the smallest well-formed envelope (its fixed fields)",
    ("device_agent.telemetry.report", "DIGEST_BYTES"): "SHA-256 size of a report's prev field",
    ("device_agent.telemetry.report", "MAX_SEQ"): "2**53, the JSON integer range every reader holds exactly",
    ("device_agent.wire", "MAX_VERSION"): "2**53, the JSON integer range every reader holds exactly",
    ("device_agent.store.keys", "SECRET_BYTES"): "the layout of the secret keys.wrapped encrypts (three 32-byte keys)",
    ("device_agent.store.keys", "SECRET_V1_BYTES"): "the same layout as release 0.1 wrote it (two keys)",
    ("device_agent.service.detect", "MAX_DIMS"): "length of edgeward.ood/1 calibration vectors; "
    "the packager's calibrate() and the board must agree",
}


def _module_level_limits() -> Iterator[tuple[str, str]]:
    for path in sorted((ROOT / "device_agent").rglob("*.py")):
        if path.name == "config.py" and path.parent.name == "device_agent":
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            names |= {t.id for t in targets if isinstance(t, ast.Name) and LIMIT_NAME.match(t.id)}
        if names:
            mod = importlib.import_module(module)
            for name in sorted(names):
                value = getattr(mod, name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    yield module, name


def test_no_module_level_limit_constants_outside_config() -> None:
    found = set(_module_level_limits())
    assert found - set(FORMAT_CONSTANTS) == set(), "limits belong in device_agent/config.py"
    assert set(FORMAT_CONSTANTS) - found == set(), "allow-list entries that no longer exist"


def test_device_agent_has_no_limits_module() -> None:
    assert not (ROOT / "device_agent" / "limits.py").exists()
    users = [
        p.relative_to(ROOT)
        for d in (*PRODUCT, "tests", "benchmarks", "scripts")
        for p in (ROOT / d).rglob("*.py")
        if p != Path(__file__).resolve()
        and re.search(r"device_agent\.limits\b|from device_agent import limits", p.read_text())
    ]
    assert users == []


# --- passed down -------------------------------------------------------------------------------


def _raw_request(sock: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(data)
        return s.recv(4096)


def test_the_agents_config_reaches_the_service_and_its_http_adapter(make_board: Callable[..., Any]) -> None:
    from device_agent.service.http import Server
    from device_agent.service.service import Service

    tight = _with(_with(DEFAULT_CONFIG, "serve.http.max_headers", 2), "serve.max_request_bytes", 100)
    tight = _with(tight, "serve.max_evidence_bytes", 128)
    service = Service(make_board().agent(config=tight))
    assert service.config is tight.serve and service.events.max_evidence_bytes == 128
    sock = service.agent.store.path / "agent.sock"
    with Server(service, sock):
        three = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\n\r\n"
        assert _raw_request(sock, three).startswith(b"HTTP/1.1 431")
        token = service.tokens.add("user", _now())[1]
        big = f"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 101\r\n\r\n"
        assert _raw_request(sock, big.encode() + b"x" * 101).startswith(b"HTTP/1.1 413")


def test_the_boards_throttle_applies_where_the_sealed_policy_is_silent(
    make_board: Callable[..., Any], pack_for: Callable[..., Path], digits: Any, digits_test: Any
) -> None:
    from device_agent.service.http import Server
    from device_agent.service.service import Service
    from tests.fixtures.http import UnixConnection, predict

    board = make_board()
    out = pack_for(digits.onnx, [board], policy={"throttle": {"client_rate": 100, "client_burst": 100}})
    board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    config = replace(DEFAULT_CONFIG, throttle=ThrottleConfig(daily_budget=2))
    service = Service(board.agent(config=config), clock=SimClock())
    sock = board.data_dir / "agent.sock"
    with Server(service, sock):
        token = service.tokens.add("user", _now())[1]
        conn = UnixConnection(sock)
        assert [predict(conn, token, digits_test[0][0])[0] for _ in range(3)] == [200, 200, 429]
        conn.close()


def _now() -> Any:
    from device_agent.store.datadir import utcnow

    return utcnow()


def test_agent_config_is_one_frozen_object() -> None:
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        DEFAULT_CONFIG.bundle = BundleLimits()  # type: ignore[misc]
    assert isinstance(AgentConfig().serve, ServeConfig)
