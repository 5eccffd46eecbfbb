"""Who may read the dashboard and /metrics: loopback by default; beyond it TLS and a fleet-CA
operator certificate or a bearer token, or the command refuses (exit 2). Real TLS (the fleet CA's
certificates), real HTTP requests."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.access import Access, authorised, listen_policy, read_token
from fleet.ca import FleetHome
from fleet.dashboard import make_server
from fleet.metrics import MonitorMetrics, metrics_server
from fleet.store import MonitorStore
from packager.cli import main as edgeward

TOKEN = "f" * 16 + "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("host", "access", "refusal"),
    [
        ("127.0.0.1", Access(), None),
        ("::1", Access(), None),
        ("localhost", Access(), None),
        ("0.0.0.0", Access(), "not a loopback address"),  # noqa: S104
        ("192.0.2.7", Access(), "not a loopback address"),
        ("dash.example", Access(), "not a loopback address"),
        ("0.0.0.0", Access(Path("c"), Path("k")), "TLS without authentication"),  # noqa: S104
        ("0.0.0.0", Access(token=TOKEN), "needs TLS"),  # noqa: S104
        ("0.0.0.0", Access(Path("c"), None, token=TOKEN), "go together"),  # noqa: S104
        ("0.0.0.0", Access(Path("c"), Path("k"), token=TOKEN), None),  # noqa: S104
        ("0.0.0.0", Access(Path("c"), Path("k"), client_certs=True), None),  # noqa: S104
    ],
)
def test_listen_policy(host: str, access: Access, refusal: str | None) -> None:
    from device_agent.errors import UsageError

    if refusal is None:
        listen_policy(host, access, "dashboard")
    else:
        with pytest.raises(UsageError, match=refusal):
            listen_policy(host, access, "dashboard")


def test_authorised() -> None:
    tls = Access(Path("c"), Path("k"), client_certs=True, token=TOKEN)
    assert authorised(Access(), None, None, [])  # loopback, plain HTTP
    assert not authorised(tls, None, None, ["ops"])
    assert authorised(tls, f"Bearer {TOKEN}", None, [])
    assert not authorised(tls, f"Bearer {TOKEN[:-1]}x", None, [])
    assert not authorised(tls, f"Basic {TOKEN}", None, [])
    assert authorised(tls, None, "ops", ["ops"])
    assert not authorised(tls, None, "pi-001", ["ops"])  # a board's certificate from the same CA
    assert not authorised(Access(Path("c"), Path("k"), token=TOKEN), None, "ops", ["ops"])


def test_token_files_are_bounded_and_must_be_long(tmp_path: Path) -> None:
    from device_agent.errors import UsageError

    f = tmp_path / "t"
    f.write_text(TOKEN + "\n")
    assert read_token(f) == TOKEN
    for bad, why in ((b"short", "at least"), (b"x" * 5000, "more than"), (b"\xff" * 40, "ASCII")):
        f.write_bytes(bad)
        with pytest.raises(UsageError, match=why):
            read_token(f)


@pytest.mark.parametrize("command", [
    ["dashboard", "--listen", "0.0.0.0:8080"],
    ["monitor", "--broker", "127.0.0.1:1", "--metrics-listen", "0.0.0.0:9100"],
    ["dashboard", "--listen", "0.0.0.0:8080", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
])
def test_serving_beyond_loopback_without_tls_and_auth_is_refused(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    code = edgeward(["fleet", *command, "--fleet-dir", str(home.path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("loopback" in err or "authentication" in err) and "--token-file" in err
    assert not home.monitor_db.exists()  # nothing was opened or made


@pytest.fixture
def tls_fleet(tmp_path: Path) -> Iterator[tuple[FleetHome, MonitorStore, Path, Path]]:
    home = FleetHome(tmp_path / "fleet-home")
    home.init_ca(unencrypted=True)
    home.enrol_operator("ops")
    server = home.issue_server(["127.0.0.1"], tmp_path / "server")
    store = MonitorStore(home.monitor_db)
    yield home, store, server.cert, server.key
    store.close()


def running(server: Any) -> Iterator[str]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str, home: FleetHome, cert: str | None = None, token: str | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(home.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(home.certs / f"{cert}.crt"), str(home.certs / f"{cert}.key"))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_dashboard_over_tls_takes_an_operator_certificate_or_the_token(
    tls_fleet: tuple[FleetHome, MonitorStore, Path, Path], make_board: Any
) -> None:
    home, store, cert, key = tls_fleet
    home.enrol_device(make_board("pi-001").enrolment.read_bytes(), "pi-001")
    access = Access(cert, key, client_certs=True, token=TOKEN)
    for base in running(make_server(home, store, "127.0.0.1", 0, 90.0, access)):
        status, body = get(base + "/api/devices", home)
        assert status == 401 and b"authentication required" in body
        assert get(base + "/", home, token="wrong" * 10)[0] == 401
        assert get(base + "/api/devices", home, cert="pi-001")[0] == 401  # a board is not an operator
        status, body = get(base + "/api/devices", home, token=TOKEN)
        assert status == 200 and [d["device_id"] for d in json.loads(body)] == ["pi-001"]
        status, body = get(base + "/api/summary", home, cert="ops")
        assert status == 200 and json.loads(body)["total"] == 1
        # Plain HTTP to the TLS port gets nothing.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(base.replace("https", "http") + "/api/devices", timeout=5)  # noqa: S310


def test_metrics_over_tls_take_the_token(tls_fleet: tuple[FleetHome, MonitorStore, Path, Path]) -> None:
    home, store, cert, key = tls_fleet
    access = Access(cert, key, token=TOKEN)
    server = metrics_server(home, store, MonitorMetrics("m1"), "127.0.0.1", 0, access, 90.0)
    for base in running(server):
        assert get(base + "/metrics", home)[0] == 401
        assert get(base + "/metrics", home, cert="ops")[0] == 401  # certificates not accepted here
        status, body = get(base + "/metrics", home, token=TOKEN)
        assert status == 200 and b'edgeward_fleet_boards{state="online"} 0.0' in body
