"""``edgeward``: the host command line (keys, pack, inspect, profiles).

Exit codes: 0 ok, 1 refused for security, 2 usage, 3 malformed input, 4 environment, 70 internal.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.cliutil import Parser, add_version, emit, run
from device_agent.errors import UsageError

from .harden.cli import add_options as add_hardening_options
from .harden.cli import model_for_pack, register_harden
from .harden.pipeline import summary

if TYPE_CHECKING:
    from .profiles import Profile
    from .signers import Signer

PROG = "edgeward"


def cmd_keys(args: argparse.Namespace) -> int:
    from .keys import generate, generate_in_token

    if args.pkcs11:
        if args.insecure_unencrypted_key:
            raise UsageError("--insecure-unencrypted-key is for key files; a --pkcs11 key never leaves its token")
        made = generate_in_token(args.kind, args.pkcs11, Path(args.out), force=args.force)
        emit(
            args,
            {"uri": made.uri, "public": str(made.public), "fingerprint": made.fingerprint, "private": None},
            lambda d: f"generated {args.kind} key {d['uri']} inside the token (sensitive, not extractable)\n"
            f"wrote {d['public']}\nfingerprint {d['fingerprint']}",
        )
        return 0
    files = generate(args.kind, Path(args.out), force=args.force, unencrypted=args.insecure_unencrypted_key)
    doc = {
        "private": str(files.private),
        "public": str(files.public),
        "fingerprint": files.fingerprint,
        "encrypted": files.encrypted,
    }
    emit(
        args,
        doc,
        lambda d: f"wrote {d['private']} (0600, "
        + ("passphrase-encrypted" if d["encrypted"] else "NOT encrypted: --insecure-unencrypted-key")
        + f")\nwrote {d['public']}\nfingerprint {d['fingerprint']}",
    )
    return 0


def _labels(path: str | None) -> list[str] | None:
    if path is None:
        return None
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        labels = json.loads(text)
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not all(isinstance(x, str) for x in labels) or not labels:
        raise UsageError(f"--labels {path}: expected a JSON list of strings or one label per line")
    return labels


def _progress(args: argparse.Namespace, *, streamed: bool = False) -> Callable[[Iterable[Any]], Iterable[Any]]:
    """A progress bar over the devices; ``streamed`` counts them as they come (no total known
    in advance, nothing held per device)."""
    if args.json or args.quiet:
        return lambda it: it
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda it: it

    def bar(it: Iterable[Any]) -> Iterable[Any]:
        items = it if streamed else list(it)
        return tqdm(items, desc="packing", unit="device", disable=None, file=sys.stderr)

    return bar


def cmd_pack(args: argparse.Namespace) -> int:
    from .profiles import load_profile
    from .signers import open_signer

    profile = load_profile(args.profile)
    with open_signer(args.publisher_key, option="--publisher-key") as signer:
        return _pack_with(args, profile, signer)


def _pack_with(args: argparse.Namespace, profile: Profile, signer: Signer) -> int:
    from .pack import PackOptions, build_policy, discover_devices, load_enrolments, pack, parse_cli_time

    v2 = args.layout != "v1"
    if v2:  # read one at a time while packing: memory flat in the device count
        from .release import iter_devices

        device_paths = iter_devices(args.device, args.devices_dir)
    else:
        devices = load_enrolments(discover_devices(args.device, args.devices_dir))
    task: dict[str, Any] = {}
    if args.task:
        task["kind"] = args.task
    if args.threshold is not None:
        task["threshold"] = args.threshold
    if args.output_index is not None:
        task["output"] = args.output_index
    if args.scores:
        task["scores"] = args.scores
    labels = _labels(args.labels)
    if labels:
        task["labels"] = labels
    model, task, extra = model_for_pack(args, profile, task)
    policy = build_policy(args.policy, args.calibrate_ood, args.sensor_noise)
    if args.learnable:
        from .learnable import apply as make_learnable

        model, policy = make_learnable(model, task, extra, policy, args.learnable)
    elif "learning" in policy:
        raise UsageError("--policy sets learning bounds but the model is not packed with --learnable")
    opts = PackOptions(
        model_id=args.model_id,
        model_version=args.model_version,
        expires=parse_cli_time(args.expires, "--expires"),
        end_of_life=parse_cli_time(args.end_of_life, "--end-of-life"),
        task=task,
        policy=policy,
        compression="none" if args.no_compress else args.compression,
        **extra,
    )
    if v2:
        from .release import pack_release

        r = pack_release(model, profile, signer, device_paths, opts, Path(args.out), layout=args.layout,
                         progress=_progress(args, streamed=True)).report
        if args.json:  # report.json itself, per-device records included, copied rather than held
            with (Path(args.out) / "report.json").open(encoding="ascii") as f:
                for line in f:
                    sys.stdout.write(line)
            return 0
        rel = r["release"]
        sizes = (
            f"payload.ewp {rel['payload_bytes']} bytes, shared; {rel['bytes_per_device']} bytes per device "
            "(its envelope)"
            if r["layout"] == "shared"
            else f"{rel['bytes_per_device']} bytes per device (its single file: envelope and payload)"
        )
        print(
            (summary(r["hardening"]) + "\n" if r["hardening"] else "")
            + f"packed {r['model']['id']} v{r['model']['version']} ({r['model']['size_bytes']} bytes, "
            f"{r['model']['compression']}) as release {rel['release_id']} for "
            f"{rel['devices']} device(s) with {r['cipher']}, signed once; {sizes}\n"
            + (f"payload.ewp, envelopes/, release.json, model-card.cdx.json and report.json in {args.out}"
               if r["layout"] == "shared" else f"single files, model-card.cdx.json and report.json in {args.out}")
            + " (report.json: the asset record, one entry per device)"
        )
        return 0
    result = pack(model, profile, signer, devices, opts, Path(args.out), progress=_progress(args))
    r = result.report
    emit(
        args,
        r,
        lambda d: (summary(d["hardening"]) + "\n" if d["hardening"] else "")
        + f"packed {d['model']['id']} v{d['model']['version']} ({d['model']['size_bytes']} bytes, "
        f"{d['model']['compression']}) for {len(d['bundles'])} device(s) with {d['cipher']}\n"
        f"bundles, model-card.cdx.json and report.json in {args.out}",
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from device_agent.bundle.keyfiles import load_public_key_file

    from .inspect import describe, text

    publishers = [load_public_key_file(Path(args.publisher_pub))] if args.publisher_pub else None
    doc, code = describe(Path(args.bundle), Path(args.payload) if args.payload else None, publishers)
    emit(args, doc, text)
    return code


def _runtimes(p: dict[str, Any]) -> str:
    """The board's runtimes, the preferred one first and starred."""
    rest = [r for r in p["runtimes"] if r != p["preferred_runtime"]]
    return ",".join([p["preferred_runtime"] + "*", *rest])


def cmd_profiles(args: argparse.Namespace) -> int:
    from .profiles import builtin_profiles

    profiles = builtin_profiles()
    doc = {name: p.to_json() | {"cipher": p.cipher} for name, p in sorted(profiles.items())}
    emit(
        args,
        doc,
        lambda d: "\n".join(
            f"{n:<16} {p['arch']:<8} {p['ram_mb']:>5} MB  {_runtimes(p):<20} {p['cipher']:<28} {p['description']}"
            for n, p in d.items()
        ),
    )
    return 0


# Commands whose modules are heavy to import (numpy and ART's attack code; the fleet's store, broker and
# web console): each is registered in full only when it is the command that runs (or for a parser of
# every command, as --help of the top level and the tests use), otherwise as a stub with the same help,
# so that `edgeward pack` does not pay for them. A test checks the stubs' help against the full ones.
LAZY_COMMANDS = {
    "redteam": ("packager.redteam", "run ART attacks against the agent and the bare model; write a report"),
    "fleet": ("fleet.cli", "fleet CA, broker set-up, telemetry monitor and dashboard"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The host CLI's parser; ``command`` names the one command about to run (None: every command in
    full), so that the heavy commands it does not name are registered as stubs."""
    p = Parser(
        prog=PROG, description="EdgeWard host tools: keys, packing signed per-device bundles, inspection."
    )
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser(
        "keys",
        help="create a publisher, operator, recovery or receipt Ed25519 key pair",
        description="publisher: signs bundles (edgeward pack). operator: signs fleet commands and time "
        "beacons (edgeward fleet ...). recovery: kept offline, the only key a board accepts to rotate its "
        "operator keys (edgeward fleet rotate-key --role operator --recovery-key). receipt: held by the fleet "
        "monitors (edgeward fleet monitor --receipt-key), signs only the receipts that let reports leave a "
        "board's outbox. Give the .pub files to edgeward-agent provision (--publisher-pub, --operator-pub, "
        "--recovery-pub, --receipt-pub).",
    )
    sp.add_argument("kind", choices=["publisher", "operator", "recovery", "receipt"])
    sp.add_argument(
        "--out", required=True, help="directory for KIND.key (0600) and KIND.pub (only KIND.pub with --pkcs11)"
    )
    sp.add_argument("--force", action="store_true", help="overwrite existing key files")
    sp.add_argument(
        "--pkcs11",
        metavar="URI",
        help="generate the key inside a PKCS#11 token (RFC 7512 URI, e.g. 'pkcs11:token=ci;object=publisher'; PIN "
        "from EDGEWARD_PKCS11_PIN or pin-source=file:PATH, module from module-path= or EDGEWARD_PKCS11_MODULE); "
        "only KIND.pub is written, and the URI is the key to sign with",
    )
    sp.add_argument(
        "--insecure-unencrypted-key",
        action="store_true",
        help="without EDGEWARD_PASSPHRASE, write KIND.key in the clear instead of refusing (test rigs, "
        "keys kept in a secret store that encrypts them)",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser(
        "pack",
        help="pack a model into one signed, encrypted bundle per device",
        description="Pack MODEL for every enrolled device into OUT, in one of three layouts (--layout): v1 "
        "(default), OUT/<device-id>.ewb, the model encrypted and signed per device; shared, one version 2 release "
        "encrypted and signed once, OUT/payload.ewp for every device plus a small OUT/envelopes/<device-id>.ewe "
        "each and the index OUT/release.json (edgeward fleet deploy reads it); single-v2, one version 2 single "
        "file OUT/<device-id>.ewb per device (envelope and payload in one, for installing without a network). "
        "Every layout writes OUT/model-card.cdx.json and OUT/report.json, the asset record: which file went to "
        "which device and device key, with its length and SHA-256. Check a release before shipping it with "
        "'edgeward inspect'. Nothing is written unless every device succeeds.",
    )
    sp.add_argument("model", help="model file (.onnx or .tflite) or an 'edgeward harden' output directory")
    sp.add_argument("--profile", required=True, help="board profile name (edgeward profiles) or a .toml file")
    sp.add_argument(
        "--publisher-key",
        required=True,
        metavar="SIGNER",
        help="publisher key: a key file or file:PATH (EDGEWARD_PASSPHRASE if encrypted), or a pkcs11: URI "
        "(docs/ci.md)",
    )
    sp.add_argument("--device", action="append", help="device enrolment JSON (repeatable)")
    sp.add_argument("--devices-dir", help="directory of device enrolment JSON files")
    sp.add_argument("--model-id", default="model", help="stable id of this model on the boards (default: model)")
    sp.add_argument("--model-version", required=True, type=int, help="integer; boards accept only increasing versions")
    sp.add_argument("--expires", help="last time the bundle may be installed (ISO 8601, e.g. 2027-01-31T00:00:00Z)")
    sp.add_argument("--end-of-life", help="time after which the model stops serving (ISO 8601)")
    sp.add_argument(
        "--task", choices=["classifier", "binary", "raw", "ctc"], help="how outputs become answers (default: detected)"
    )
    sp.add_argument("--threshold", type=float, help="decision threshold for --task binary")
    sp.add_argument(
        "--scores", choices=["probabilities", "logits"],
        help="a classifier's output is already probabilities, or logits the agent softmaxes "
        "(default: decided from the model's graph; sealed, and on the model card)",
    )
    sp.add_argument("--output-index", type=int, help="which model output carries the scores")
    sp.add_argument("--labels", help="class labels: JSON list or one per line (sealed, never in the clear)")
    sp.add_argument("--expect-sha256", help="refuse the model unless its SHA-256 is this")
    sp.add_argument("--policy", help="serving policy JSON to seal (roles, bands, throttle, audit)")
    sp.add_argument("--calibrate-ood", help="validation inputs (.npz, x) to calibrate OoD/probing")
    sp.add_argument(
        "--sensor-noise",
        type=float,
        metavar="SIGMA",
        help="the standard deviation of the sensor's read noise, in input units, as measured on the sensor: "
        "sealed with --calibrate-ood so that a re-read of a scene is not taken for probing or extraction",
    )
    sp.add_argument(
        "--learnable",
        metavar="DATA.npz",
        help="mark the final linear layer for local learning on the board and seal its gate set, canaries and "
        "replay set from DATA.npz (gate_x, gate_y, replay_x, optional canary_x); ONNX float classifiers only",
    )
    sp.add_argument(
        "--compression", choices=["auto", "zlib", "none"], default="auto",
        help="zlib the sealed payload before encryption: auto (default) when a sample shows it pays (saves 10%% "
        "or more; float32 weights save less), zlib whenever it saves 5%%, none never",
    )
    sp.add_argument("--no-compress", action="store_true", help="the same as --compression none")
    sp.add_argument("--out", required=True)
    sp.add_argument(
        "--layout", choices=["v1", "shared", "single-v2"], default="v1",
        help="v1 (default): OUT/<device-id>.ewb, the model encrypted per device; shared: one release in "
        "format v2, OUT/payload.ewp (encrypted once) + OUT/envelopes/<device-id>.ewe + OUT/release.json, "
        "signed once; single-v2: one v2 single file OUT/<device-id>.ewb per device (docs/bundle-format.md)",
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    add_hardening_options(sp, for_pack=True)
    sp.set_defaults(func=cmd_pack)

    register_harden(sub)

    sp = sub.add_parser(
        "inspect",
        help="show a bundle's or release's clear header and verify it",
        description="Show what a bundle or release says in the clear and, with --publisher-pub, verify it before "
        "it ships: a bundle (.ewb, version 1 or a version 2 single file, whose ciphertext digest is checked too); "
        "a device's envelope with --payload payload.ewp (signature and inclusion proof); payload.ewp alone (its "
        "signed release head and ciphertext digest); or a shared release directory (edgeward pack --layout "
        "shared --out DIR: the payload, every envelope's inclusion proof and release.json).",
    )
    sp.add_argument("bundle", metavar="PATH", help="a .ewb bundle, a .ewe envelope (with --payload), payload.ewp, "
                    "or a release directory")
    sp.add_argument("--payload", help="the release's payload.ewp, when PATH is a device's envelope (.ewe)")
    sp.add_argument("--publisher-pub", help="verify against this publisher public key")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("profiles", help="list the built-in board profiles")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_profiles)
    for name, (module, help_) in LAZY_COMMANDS.items():
        if command is None or command == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and not args[0].startswith("-") else None
    return run(build_parser(command), args, PROG)


if __name__ == "__main__":
    sys.exit(main())
