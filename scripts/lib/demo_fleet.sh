# Fleet telemetry part of the demo (sourced by scripts/demo.sh, not run on its own).
#
#   source scripts/lib/demo_fleet.sh
#   demo_fleet            # uses WORK, PY, BOARD_DIR, ENROLMENT and EDGEWARD_DEVICE_PASSPHRASE
#
# Needs: WORK (scratch dir), PY (.venv/bin/python), BOARD_DIR (a provisioned board data dir),
# ENROLMENT (that board's enrolment JSON), EDGEWARD_DEVICE_PASSPHRASE exported (or
# EDGEWARD_DEVICE_KEK_FILE), and WORK/batch.npy (digit inputs). Starts a private mosquitto from
# the generated configuration on a free loopback port (a plain process), a monitor and the
# board's guarded service with telemetry; queries the service, whose OoD detector flags the
# noise, and shows that detection arriving, verified, at the monitor. With OFFLINE_BOARD_DIR,
# OFFLINE_ENROLMENT and OPERATOR_KEY set, it then decommissions that board while it is off, starts
# it, and shows the board obeying its retained command queue and the fleet verifying its signed
# wipe attestation. With RELEASE_DIR (a pack of the next version for both boards, version 1 bundles
# or a shared release) as well, it
# first serves that directory over HTTPS (a certificate from the fleet CA) and rolls it out in two
# stages with 'fleet deploy': the switched-off board stays pending, the rollout carries on past
# the stage timeout, and the board installs the update when it returns, before its decommission.
# Everything it starts is stopped when the function returns.

demo_fleet() {
  local fleet="$WORK/fleet-home" broker="$WORK/broker" port device mosq pids=() i
  : "${WORK:?WORK must be set}" "${PY:?PY must be set}" "${BOARD_DIR:?BOARD_DIR must be set}" "${ENROLMENT:?ENROLMENT must be set}"
  mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  [ -x "$mosq" ] || { echo "demo_fleet: mosquitto is not installed (scripts/lib/env.sh ensure_mosquitto)" >&2; return 4; }
  device="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$ENROLMENT")"
  port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local ew=("$PY" -m packager.cli fleet) agent=("$PY" -m device_agent.cli)

  _demo_fleet_stop() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  }

  ew_log "fleet: CA, client certificates (CN = device id / operator id), broker configuration"
  [ -f "$fleet/ca.crt" ] || "${ew[@]}" ca init --fleet-dir "$fleet"
  "${ew[@]}" enrol --fleet-dir "$fleet" --operator operator
  "${ew[@]}" enrol --fleet-dir "$fleet" "$ENROLMENT"
  "${ew[@]}" broker-config --fleet-dir "$fleet" --out "$broker" --listen "127.0.0.1:$port"

  ew_log "fleet: private mosquitto on 127.0.0.1:$port (TLS, client certificates, per-device ACLs)"
  "$mosq" -c "$broker/mosquitto.conf" 2>"$WORK/mosquitto.log" &
  pids+=($!)
  for i in $(seq 50); do
    "$PY" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null && break
    sleep 0.1
  done

  ew_log "fleet: monitor (verifies every signature) and the board's guarded service with telemetry"
  "${ew[@]}" monitor --fleet-dir "$fleet" --broker "127.0.0.1:$port" --operator operator --exclusive \
    > >(tee "$WORK/monitor.out") &
  pids+=($!)
  for i in $(seq 150); do  # the monitor subscribes before the board reports anything worth seeing
    grep -q '^monitoring' "$WORK/monitor.out" 2>/dev/null && break
    sleep 0.1
  done
  local token
  token="$("${agent[@]}" token add --data-dir "$BOARD_DIR" --role user --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
  "${agent[@]}" serve --data-dir "$BOARD_DIR" --socket "$WORK/agent.sock" --broker "127.0.0.1:$port" \
    --ca "$fleet/ca.crt" --cert "$fleet/certs/$device.crt" --key "$fleet/certs/$device.key" --heartbeat 2 \
    --update-ca "$fleet/ca.crt" &
  pids+=($!)

  ew_log "fleet: an application queries the local API; then someone sends noise (an extraction attempt)"
  EW_TOKEN="$token" "$PY" - "$WORK/agent.sock" "$WORK/batch.npy" <<'PYEOF'
import http.client, json, os, socket, sys, time
import numpy as np

class AgentConnection(http.client.HTTPConnection):
    """The standard library's HTTP client, over the agent's Unix socket."""
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)

def call(conn, method, path, token=None, inputs=None):
    headers, body = {}, None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if inputs is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps({"inputs": inputs.tolist()}).encode()
    conn.request(method, path, body, headers)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else None

sock, batch = sys.argv[1], np.load(sys.argv[2])
for _ in range(100):  # wait for the service to answer
    probe = AgentConnection(sock)
    try:
        call(probe, "GET", "/v1/health"); break
    except OSError:
        time.sleep(0.1)
    finally:
        probe.close()
conn, token = AgentConnection(sock), os.environ["EW_TOKEN"]
for row in batch[:3]:
    status, body = call(conn, "POST", "/v1/predict", token, row)
    print(f"  digit query -> {status} {json.dumps(body)}")
rng = np.random.default_rng(0)
for _ in range(4):
    status, body = call(conn, "POST", "/v1/predict", token, rng.random(64).astype(np.float32))
    print(f"  noise query -> {status} {json.dumps(body)}")
conn.close()
PYEOF

  local ok=1
  for i in $(seq 100); do
    if "${ew[@]}" events --fleet-dir "$fleet" --json --since 1h 2>/dev/null | grep -q '"kind": "ood"'; then ok=0; break; fi
    sleep 0.2
  done
  sleep 2  # one more heartbeat so the status shows the board's models and counters
  ew_log "fleet: what the monitor stored (signatures verified against the enrolled identity key)"
  "${ew[@]}" status --fleet-dir "$fleet"
  "${ew[@]}" events --fleet-dir "$fleet" --since 1h
  [ "$ok" = 0 ] || { _demo_fleet_stop; echo "demo_fleet: the anomaly did not reach the monitor (see $WORK/mosquitto.log)" >&2; return 4; }
  ew_log "fleet: the detection arrived signed, verified and stored once"

  if [ -n "${OFFLINE_BOARD_DIR:-}" ]; then
    local offline
    offline="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$OFFLINE_ENROLMENT")"
    "${ew[@]}" enrol --fleet-dir "$fleet" "$OFFLINE_ENROLMENT" >/dev/null
    if [ -n "${RELEASE_DIR:-}" ]; then
      local web_port deploy=("${ew[@]}" deploy "$RELEASE_DIR" --fleet-dir "$fleet")
      web_port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
      ew_log "fleet: the release directory on a static HTTPS file server (any web server or object store does)"
      "$PY" - "$RELEASE_DIR" "$web_port" "$broker/edgeward-broker.crt" "$broker/edgeward-broker.key" <<'PYEOF' &
import functools, http.server, ssl, sys
root, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=root)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
PYEOF
      pids+=($!)
      ew_log "fleet: the rollout plan (boards in the order of SHA-256(release id, device id)), then the first stage"
      "${deploy[@]}" --base-url "https://127.0.0.1:$web_port/" --all --stages 50%,100% --stage-timeout 5s --dry-run
      "${deploy[@]}" --base-url "https://127.0.0.1:$web_port/" --all --stages 50%,100% --stage-timeout 5s \
        --operator-key "$OPERATOR_KEY" --broker "127.0.0.1:$port" --operator operator
      ew_log "fleet: --resume signs the next stage once this one is complete ($offline is off: pending after 5 s);
    the monitor marks the rollout done when the last stage's boards answered"
      local rolled=1
      for i in $(seq 60); do
        "${deploy[@]}" --resume --operator-key "$OPERATOR_KEY" --broker "127.0.0.1:$port" --operator operator --json \
          >"$WORK/deploy.json"
        if "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); r=d["rollouts"][0]["devices"]
sys.exit(0 if d["state"] == "done" and any(b["state"] == "updated" for b in r) else 1)' "$WORK/deploy.json"; then
          rolled=0; break
        fi
        sleep 0.5
      done
      "${ew[@]}" status --fleet-dir "$fleet"
      [ "$rolled" = 0 ] || { _demo_fleet_stop; echo "demo_fleet: the rollout did not complete" >&2; return 4; }
      ew_log "fleet: $device installed v3 over the air and kept serving throughout; $offline is pending"
    fi
    ew_log "fleet: $offline is switched off; the security officer orders its decommission anyway"
    "${ew[@]}" time --fleet-dir "$fleet" --operator-key "$OPERATOR_KEY" --broker "127.0.0.1:$port" --operator operator
    "${ew[@]}" decommission "$offline" --fleet-dir "$fleet" --operator-key "$OPERATOR_KEY" --broker-dir "$broker" \
      --broker "127.0.0.1:$port" --operator operator
    "${ew[@]}" commands "$offline" --fleet-dir "$fleet"
    ew_log "fleet: $offline comes back online; its retained command queue is waiting for it"
    "${agent[@]}" serve --data-dir "$OFFLINE_BOARD_DIR" --socket "$WORK/offline.sock" --broker "127.0.0.1:$port" \
      --ca "$fleet/ca.crt" --cert "$fleet/certs/$offline.crt" --key "$fleet/certs/$offline.key" --heartbeat 2 \
      --update-ca "$fleet/ca.crt" \
      || { _demo_fleet_stop; echo "demo_fleet: $offline did not obey the decommission" >&2; return 4; }
    local wiped=1
    for i in $(seq 100); do
      if "${ew[@]}" status --fleet-dir "$fleet" --json 2>/dev/null | grep -q '"liveness": "wiped"'; then wiped=0; break; fi
      sleep 0.2
    done
    ew_log "fleet: the board's signed results arrived: its update (queued first), then the wipe attestation"
    "${ew[@]}" status --fleet-dir "$fleet"
    "${ew[@]}" verify-attestation "$OFFLINE_BOARD_DIR/wipe-attestation.json" --fleet-dir "$fleet"
    [ "$wiped" = 0 ] || { _demo_fleet_stop; echo "demo_fleet: the fleet did not record $offline as wiped" >&2; return 4; }
  fi
  _demo_fleet_stop
  ew_log "fleet: broker, monitor and service stopped"
}
