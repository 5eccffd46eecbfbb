#!/usr/bin/env bash
# The EdgeWard lifecycle on this machine, end to end, with real keys, a real model and real
# runtimes. Installs what it needs into .venv on first run. Artefacts go to $EDGEWARD_DEMO_DIR
# (default: a fresh temporary directory, printed at the end).
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
ensure_venv

WORK="${EDGEWARD_DEMO_DIR:-$(mktemp -d -t edgeward-demo.XXXXXX)}"
mkdir -p "$WORK"
PY="$EW_PY"
BIN="$EW_VENV/bin"
export EDGEWARD_PASSPHRASE="demo publisher passphrase"      # wraps the publisher key
export EDGEWARD_DEVICE_PASSPHRASE="demo board passphrase"   # wraps each board's keys
cd "$WORK"

step() { printf '\n\033[1;34m### %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
refused() {  # run a command that must be refused; show its one-line reason and exit code
  printf '\033[2m$ %s\033[0m\n' "$*"
  set +e; "$@"; local rc=$?; set -e
  if [ "$rc" -eq 0 ]; then echo "!! expected a refusal but the command succeeded" >&2; exit 1; fi
  printf '\033[33m-> refused with exit code %s\033[0m\n' "$rc"
}

step "1. A real model: an MLP trained on scikit-learn's bundled digits data, exported to ONNX"
(cd "$EW_ROOT" && "$PY" -m tests.fixtures.models "$WORK/model")
"$PY" - <<PY
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
z = np.load("$WORK/model/digits_test.npz")
np.save("$WORK/sample.npy", z["x"][0]); np.save("$WORK/batch.npy", z["x"][:8])
x, y = load_digits(return_X_y=True)   # the training split calibrates the board's OoD detector
x_train, _, _, _ = train_test_split((x / 16.0).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
np.savez("$WORK/validation.npz", x=x_train)
print("true labels of the batch:", z["y"][:8].tolist())
PY

step "2. The publisher's signing key and the security officer's operator key (Ed25519, 0600, passphrase-encrypted)"
show "$BIN/edgeward" keys publisher --out keys
show "$BIN/edgeward" keys operator --out keys

step "3. Two boards provision themselves: keys made on the board, public enrolment exported"
mkdir -p enrolments
for dev in pi-kitchen pi-garage; do
  show "$BIN/edgeward-agent" provision --data-dir "boards/$dev" --device-id "$dev" \
       --publisher-pub keys/publisher.pub --operator-pub keys/operator.pub --export "enrolments/$dev.json"
done

step "4. Pack: one signed bundle per board, each encrypted to that board's key; v3 as a shared release
    (the model encrypted once in payload.ewp, a small signed envelope per board) for the rollout in step 10"
printf '%s\n' zero one two three four five six seven eight nine > labels.txt
for v in 1 2 3; do
  layout=v1; [ "$v" = 3 ] && layout=shared
  show "$BIN/edgeward" pack model/digits_mlp.onnx --profile rpi4b --publisher-key keys/publisher.key \
       --devices-dir enrolments --model-id digits --model-version "$v" --labels labels.txt \
       --calibrate-ood validation.npz --end-of-life 2030-01-01T00:00:00Z --layout "$layout" --out "release-v$v" --quiet
done
ls -l release-v2
ls -l release-v3 release-v3/envelopes

step "5. Anyone can read the clear header; it names no labels, shapes or framework"
show "$BIN/edgeward" inspect release-v2/pi-kitchen.ewb --publisher-pub keys/publisher.pub

step "6. The board installs v2 (verify, check, decrypt in memory, store still encrypted)"
show "$BIN/edgeward-agent" install release-v2/pi-kitchen.ewb --data-dir boards/pi-kitchen

step "7. Predictions: a label by default, scores only for the admin role"
show "$BIN/edgeward-agent" predict --data-dir boards/pi-kitchen --input sample.npy
show "$BIN/edgeward-agent" predict --data-dir boards/pi-kitchen --input sample.npy --role engineer
show "$BIN/edgeward-agent" predict --data-dir boards/pi-kitchen --input sample.npy --role admin
show "$BIN/edgeward-agent" predict --data-dir boards/pi-kitchen --input batch.npy

step "8. Refusals: each one exits non-zero, says why in one line, and changes nothing"
"$PY" - <<PY
data = bytearray(open("release-v2/pi-kitchen.ewb", "rb").read())
data[200] ^= 0x01                       # one flipped bit inside the signed manifest
open("tampered.ewb", "wb").write(data)
PY
refused "$BIN/edgeward-agent" install tampered.ewb --data-dir boards/pi-kitchen
refused "$BIN/edgeward-agent" install release-v1/pi-kitchen.ewb --data-dir boards/pi-kitchen
refused "$BIN/edgeward-agent" install release-v2/pi-garage.ewb --data-dir boards/pi-kitchen
head -c 4000 release-v2/pi-kitchen.ewb > truncated.ewb
refused "$BIN/edgeward-agent" install truncated.ewb --data-dir boards/pi-kitchen

step "9. The board still serves v2, exactly as before"
show "$BIN/edgeward-agent" status --data-dir boards/pi-kitchen
show "$BIN/edgeward-agent" predict --data-dir boards/pi-kitchen --input sample.npy

show "$BIN/edgeward-agent" install release-v2/pi-garage.ewb --data-dir boards/pi-garage

step "10. Fleet: a private mosquitto, the guarded service reporting to it, a real detection arriving;
    a staged over-the-air rollout of v3 from an HTTPS file server (pi-garage is switched off: pending);
    then a remote decommission of pi-garage, ordered while it is off, obeyed when it returns"
ensure_mosquitto
source "$EW_ROOT/scripts/lib/demo_fleet.sh"
BOARD_DIR="$WORK/boards/pi-kitchen" ENROLMENT="$WORK/enrolments/pi-kitchen.json" \
  OFFLINE_BOARD_DIR="$WORK/boards/pi-garage" OFFLINE_ENROLMENT="$WORK/enrolments/pi-garage.json" \
  OPERATOR_KEY="$WORK/keys/operator.key" RELEASE_DIR="$WORK/release-v3" demo_fleet

step "11. End of life: pi-garage crypto-shredded its keys and models and signed an attestation"
"$PY" - <<PY
import json
doc = json.load(open("boards/pi-garage/wipe-attestation.json"))
body, by = doc["body"], doc["body"]["by"]
print("wipe attestation of", body.get("device_id", "pi-garage"), "(its signature was verified above by 'fleet verify-attestation')")
print("  bundles destroyed:", ", ".join(body["bundles_destroyed"]))
print(f"  ordered by command #{by['command_seq']} (command sha256 {by['command_sha256'][:16]}...) of operator key {by['operator'][:23]}...")
PY
show "$BIN/edgeward-agent" status --data-dir boards/pi-garage
refused "$BIN/edgeward-agent" predict --data-dir boards/pi-garage --input sample.npy

step "12. Local learning on a third board: the camera drifts (brightness +0.3), trusted lines send labelled
    feedback, one update recovers; a poisoner's wrong labels are held, and when a careless review lets
    them through, the gate rejects the update"
(cd "$EW_ROOT" && PYTHONPATH="$EW_ROOT" "$PY" - "$WORK" <<'PY'
import sys
import numpy as np
from tests.fixtures.learning import drift, scenario
work = sys.argv[1]
sc = scenario(0)
sc.learning_data(f"{work}/publisher-learning.npz")          # gate set, replay set (sealed in the bundle)
np.save(f"{work}/drifted-test.npy", drift(sc.test_x)); np.save(f"{work}/test.npy", sc.test_x)
np.save(f"{work}/test-labels.npy", sc.test_y)
for s, (x, y) in sc.feedback(("line-a", "line-b", "line-c")).items():
    np.savez(f"{work}/feedback-{s}.npz", x=x, y=y)
threes = drift(sc.replay_x[sc.replay_y == 3])
np.savez(f"{work}/feedback-mallory.npz", x=threes, y=np.full(len(threes), 8))   # every 3 labelled 8
PY
)
accuracy() {  # accuracy of what the board serves on an input file, against the true labels
  "$BIN/edgeward-agent" predict --data-dir boards/pi-line --input "$1" | "$PY" -c "
import json, sys, numpy as np
names = open('labels.txt').read().split()
got = [names.index(p['label']) for p in json.load(sys.stdin)['predictions']]
print(f'$2: {np.mean(np.array(got) == np.load(\"test-labels.npy\")):.3f}')"
}
show "$BIN/edgeward-agent" provision --data-dir boards/pi-line --device-id pi-line \
     --publisher-pub keys/publisher.pub --operator-pub keys/operator.pub --export enrolments-line.json
show "$BIN/edgeward" pack model/digits_mlp.onnx --profile rpi4b --publisher-key keys/publisher.key \
     --device enrolments-line.json --model-id digits --model-version 1 --labels labels.txt \
     --calibrate-ood validation.npz --learnable publisher-learning.npz --out release-line --quiet
show "$BIN/edgeward-agent" install release-line/pi-line.ewb --data-dir boards/pi-line
accuracy test.npy "accuracy on the original test split"
accuracy drifted-test.npy "accuracy on the drifted test split"
for s in line-a line-b line-c; do
  show "$BIN/edgeward-agent" feedback --data-dir boards/pi-line --input "feedback-$s.npz" --source "$s"
done
show "$BIN/edgeward-agent" learn --data-dir boards/pi-line | tee learn-1.json
accuracy test.npy "accuracy on the original test split, local version 1"
accuracy drifted-test.npy "accuracy on the drifted test split, local version 1"
show "$BIN/edgeward-agent" feedback --data-dir boards/pi-line --input feedback-mallory.npz --source mallory
"$BIN/edgeward-agent" learn --data-dir boards/pi-line > learn-2.json
"$PY" -c "
import json
r = json.load(open('learn-2.json')); m = r['examples']['by_source']['local:mallory']
words = {'use': 'learnt from', 'held': 'held for review', 'rejected': 'rejected', 'deferred': 'deferred'}
print(\"mallory's examples:\", ', '.join(f'{n} {words.get(k, k)}' for k, n in m.items() if n))
print('update accepted:', 'yes' if r['accepted'] else 'no', '| local version', r['local_version'])"
HELD=$("$BIN/edgeward-agent" feedback --data-dir boards/pi-line --json | "$PY" -c "
import json, sys; print(' '.join('--accept ' + e['id'] for e in json.load(sys.stdin) if e['source'] == 'local:mallory'))")
echo "a careless review accepts all of mallory's held examples"
"$BIN/edgeward-agent" feedback --data-dir boards/pi-line $HELD
"$BIN/edgeward-agent" learn --data-dir boards/pi-line > learn-3.json
"$PY" -c "
import json
r = json.load(open('learn-3.json'))
print('update accepted:', 'yes' if r['accepted'] else 'no, the validation gate refused it:')
for reason in r['reasons']:
    print('  -', reason)"
show "$BIN/edgeward-agent" events --data-dir boards/pi-line --kind learning
accuracy test.npy "accuracy on the original test split, the last accepted version still serving"

printf '\n\033[1;32mDemo complete.\033[0m Artefacts in %s\n' "$WORK"
