"""A version 2 release on the publisher's side: checked before it ships (`edgeward inspect` on a
release directory, an envelope with its payload, a payload alone), recorded as an asset record
(report.json: which file went to which device and device key), with real keys, real boards and
the project's digits model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main as host_main
from packager.pack import read_enrolment


def _pack(digits: Any, boards: list[Any], publisher: Path, out: Path, layout: str, capsys: Any,
          *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["pack", str(digits.onnx), "--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
            "--model-id", "digits", "--model-version", "1", "--out", str(out), "--layout", layout, "--quiet"]
    for b in boards:
        argv += ["--device", str(b.enrolment)]
    code = host_main([*argv, *extra])
    return code, capsys.readouterr().out


def _inspect(capsys: Any, *argv: str) -> tuple[int, Any, str]:
    capsys.readouterr()
    code = host_main(["inspect", *argv, "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out) if out.strip() else None
    capsys.readouterr()
    host_main(["inspect", *argv])
    return code, doc, capsys.readouterr().out


def _text_shows_every_field(doc: dict[str, Any], text: str) -> None:
    """The text form names every field the JSON form has, with the same value."""
    lines = {ln.split(None, 1)[0]: (ln.split(None, 1) + [""])[1] for ln in text.splitlines()[1:]}
    for k, v in doc["manifest"].items():
        assert k in lines, (k, text)
        if k != "sealed_key":
            assert lines[k] == str(v), (k, lines[k], v)
    for k in ("kind", "format_version", "publisher_key_id", "file_bytes"):
        assert lines[k] == str(doc[k])


RELEASE_FIELDS = {"schema", "release_id", "model_id", "model_version", "created", "expires", "end_of_life",
                  "publisher", "profile", "runtime", "cipher", "compression", "chunk_size", "sealed_length",
                  "payload_length", "payload_sha256", "tags_sha256", "devices", "merkle_root"}
DEVICE_FIELDS = {"device_id", "device_key", "leaf_index", "sealed_key"}


def test_a_shared_release_is_checked_before_it_ships(digits, make_board, publisher, tmp_path, capsys) -> None:
    """`edgeward inspect DIR`, `inspect ENVELOPE --payload payload.ewp` and `inspect payload.ewp`
    verify a shared release with the publisher's public key and show every signed field, in text
    as in JSON; the same fields unverified without --publisher-pub."""
    boards = [make_board(f"pi-00{i}") for i in range(3)]
    out = tmp_path / "rel"
    assert _pack(digits, boards, publisher, out, "shared", capsys)[0] == 0
    pub = ["--publisher-pub", str(publisher / "publisher.pub")]
    release_id = json.loads((out / "release.json").read_text())["release_id"]

    code, doc, text = _inspect(capsys, str(out), *pub)
    assert code == 0 and doc["verified"] is True and doc["kind"] == "release", doc
    assert doc["envelopes"] == 3 and doc["manifest"]["devices"] == 3 and doc["manifest"]["release_id"] == release_id
    assert set(doc["manifest"]) == RELEASE_FIELDS and text.startswith(f"{out}: VERIFIED")
    _text_shows_every_field(doc, text)

    env = out / "envelopes" / "pi-001.ewe"
    code, doc, text = _inspect(capsys, str(env), "--payload", str(out / "payload.ewp"), *pub)
    assert code == 0 and doc["verified"] is True and doc["kind"] == "envelope" and doc["format_version"] == 2
    assert set(doc["manifest"]) == RELEASE_FIELDS | DEVICE_FIELDS
    m = doc["manifest"]
    assert (m["device_id"], m["release_id"]) == ("pi-001", release_id)
    assert m["device_key"] == read_enrolment(boards[1].enrolment).box_fingerprint
    assert "bundle_id" not in text and "VERIFIED" in text
    _text_shows_every_field(doc, text)
    unverified = _inspect(capsys, str(env), "--payload", str(out / "payload.ewp"))
    assert unverified[0] == 0 and unverified[1]["verified"] is None
    assert unverified[1]["manifest"] == doc["manifest"]  # the same fields, not yet trusted

    code, doc, text = _inspect(capsys, str(out / "payload.ewp"), *pub)
    assert code == 0 and doc["verified"] is True and doc["kind"] == "payload"
    assert set(doc["manifest"]) == RELEASE_FIELDS and doc["manifest"]["merkle_root"] in text
    _text_shows_every_field(doc, text)

    # An envelope alone names the command that checks it, for the publisher (not the board's).
    capsys.readouterr()
    assert host_main(["inspect", str(env), *pub]) == 2
    assert "edgeward inspect" in capsys.readouterr().err


def test_a_release_check_refuses_what_a_board_would_refuse(digits, make_board, publisher, tmp_path, capsys) -> None:
    """A changed proof, a changed ciphertext byte, a missing or misnamed envelope, an envelope of
    another release, an index that lists other bytes, another publisher's key: each refused with
    the documented exit code and the file named."""
    import shutil

    from packager.keys import generate

    boards = [make_board(f"pi-00{i}") for i in range(3)]
    clean = tmp_path / "clean"
    assert _pack(digits, boards, publisher, clean, "shared", capsys)[0] == 0
    other_release = tmp_path / "other-release"
    assert _pack(digits, boards, publisher, other_release, "shared", capsys)[0] == 0
    pub = ["--publisher-pub", str(publisher / "publisher.pub")]

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(clean, d)
        return d

    d = broken("proof")
    e = d / "envelopes" / "pi-002.ewe"
    data = bytearray(e.read_bytes())
    data[-1] ^= 1
    e.write_bytes(bytes(data))
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 1 and doc["verified"] is False and "envelopes/pi-002.ewe" in doc["error"], doc

    d = broken("cipher")
    p = d / "payload.ewp"
    data = bytearray(p.read_bytes())
    data[-5] ^= 1
    p.write_bytes(bytes(data))
    for argv in ([str(d)], [str(p)], [str(d / "envelopes" / "pi-000.ewe"), "--payload", str(p)]):
        code, doc, _ = _inspect(capsys, *argv, *pub)
        assert code == 1 and "payload_sha256" in doc["error"], (argv, doc)

    d = broken("missing")
    (d / "envelopes" / "pi-001.ewe").unlink()
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "2 of the release's 3" in doc["error"], doc

    d = broken("misnamed")
    (d / "envelopes" / "pi-001.ewe").rename(d / "envelopes" / "pi-009.ewe")
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "misnamed" in doc["error"], doc

    d = broken("mixed")
    shutil.copy(other_release / "envelopes" / "pi-001.ewe", d / "envelopes" / "pi-001.ewe")
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 1 and "envelopes/pi-001.ewe" in doc["error"] and "release" in doc["error"], doc

    d = broken("index")
    index = json.loads((d / "release.json").read_text())
    index["devices"]["pi-000"]["sha256"] = "0" * 64
    (d / "release.json").write_text(json.dumps(index))
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "release.json" in doc["error"], doc

    keys = tmp_path / "other-key"
    generate("publisher", keys, unencrypted=True)
    code, doc, text = _inspect(capsys, str(clean), "--publisher-pub", str(keys / "publisher.pub"))
    assert code == 1 and doc["verified"] is False and "REFUSED" in text
    # Nothing was changed by any check, and the clean release still passes.
    assert _inspect(capsys, str(clean), *pub)[0] == 0
    capsys.readouterr()
    assert host_main(["inspect", str(clean)]) == 2  # a release check needs the key
    assert "--publisher-pub" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["shared", "single-v2"])
def test_report_json_is_the_asset_record_of_a_v2_release(digits, make_board, publisher, tmp_path, capsys,
                                                          layout: str) -> None:
    """report.json records, for each device, its device key's fingerprint, the file it is given,
    that file's length and SHA-256 and its leaf; the sizes reported are the files' real sizes;
    `pack --json` prints report.json itself."""
    boards = [make_board(f"pi-00{i}") for i in range(3)]
    out = tmp_path / "rel"
    code, printed = _pack(digits, boards, publisher, out, layout, capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    records = {r["device_id"]: r for r in report["bundles"]}
    assert sorted(records) == [b.device_id for b in boards]
    sizes = []
    for b in boards:
        r = records[b.device_id]
        f = out / r["file"]
        assert r["file"] == (f"envelopes/{b.device_id}.ewe" if layout == "shared" else f"{b.device_id}.ewb")
        assert r["device_key"] == read_enrolment(b.enrolment).box_fingerprint
        assert (r["size"], r["sha256"]) == (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
        assert r["bundle_id"] == report["release"]["release_id"]
        sizes.append(f.stat().st_size)
    assert sorted(r["leaf_index"] for r in records.values()) == [0, 1, 2]
    rel = report["release"]
    payload_file = (out / "payload.ewp") if layout == "shared" else None
    if payload_file is not None:
        assert rel["payload_bytes"] == payload_file.stat().st_size
        assert rel["output_bytes"] == sum(sizes) + rel["payload_bytes"]
    else:  # the payload each single file carries
        assert sum(sizes) == 3 * rel["payload_bytes"] + rel["envelope_bytes"] and rel["payload_bytes"] > 1000
        assert rel["output_bytes"] == sum(sizes)
    assert rel["bytes_per_device"] == round(sum(sizes) / 3, 1)
    assert f"{rel['bytes_per_device']} bytes per device" in printed
    # --json prints report.json, the device records included.
    code, printed = _pack(digits, boards, publisher, tmp_path / "again", layout, capsys, "--json")
    assert code == 0 and json.loads(printed) == json.loads((tmp_path / "again" / "report.json").read_text())


def test_help_describes_the_layouts_and_install_json(capsys) -> None:
    from device_agent.cli import main as agent_main

    with pytest.raises(SystemExit):
        host_main(["pack", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "payload.ewp" in text and "single-v2" in text and "envelopes/<device-id>.ewe" in text
    assert "asset record" in text
    with pytest.raises(SystemExit):
        agent_main(["install", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--json print what was installed as JSON" in text
    with pytest.raises(SystemExit):
        host_main(["inspect", "--help"])
    assert "--payload" in capsys.readouterr().out


def test_inspect_text_and_json_show_the_same_fields_for_every_format(digits, make_board, publisher, tmp_path,
                                                                      capsys) -> None:
    """A v2 single file shows its release id, format version, devices, Merkle root, leaf and payload
    digest in text as in JSON (and its sealed key in JSON as in text); a v1 bundle its bundle id."""
    board = make_board("pi-001")
    pub = ["--publisher-pub", str(publisher / "publisher.pub")]
    assert _pack(digits, [board], publisher, tmp_path / "single", "single-v2", capsys)[0] == 0
    for argv in ([str(tmp_path / "single" / "pi-001.ewb"), *pub], [str(tmp_path / "single" / "pi-001.ewb")]):
        code, doc, text = _inspect(capsys, *argv)
        assert code == 0 and doc["format_version"] == 2 and doc["kind"] == "single"
        assert set(doc["manifest"]) == RELEASE_FIELDS | DEVICE_FIELDS and "bundle_id" not in text
        _text_shows_every_field(doc, text)
    assert _pack(digits, [board], publisher, tmp_path / "v1", "v1", capsys)[0] == 0
    code, doc, text = _inspect(capsys, str(tmp_path / "v1" / "pi-001.ewb"), *pub)
    assert code == 0 and doc["format_version"] == 1 and {"bundle_id", "sealed_key"} <= set(doc["manifest"])
    _text_shows_every_field(doc, text)


def test_a_release_check_reads_only_what_the_release_directory_itself_holds(
    digits, make_board, publisher, tmp_path, capsys
) -> None:
    """`release.json` is read bounded, and only as a regular file of the directory: a FIFO, a link
    to /dev/zero or to another file is refused at once (exit 3), not waited on or read whole;
    `envelopes/` must be a directory, not a link to one (an upload that does not follow links
    would publish something else); a file name with control characters is named escaped."""
    import os
    import shutil

    boards = [make_board(f"pi-00{i}") for i in range(2)]
    clean = tmp_path / "clean"
    assert _pack(digits, boards, publisher, clean, "shared", capsys)[0] == 0
    pub = ["--publisher-pub", str(publisher / "publisher.pub")]

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(clean, d)
        return d

    d = broken("fifo")
    (d / "release.json").unlink()
    os.mkfifo(d / "release.json")  # no writer: reading it would wait for ever
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "release.json is not a regular file" in doc["error"], doc

    d = broken("zero")
    (d / "release.json").unlink()
    (d / "release.json").symlink_to("/dev/zero")  # followed, it would be read until memory ran out
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "release.json is a symbolic link" in doc["error"], doc

    d = broken("linked-index")
    (d / "release.json").rename(tmp_path / "elsewhere.json")
    (d / "release.json").symlink_to(tmp_path / "elsewhere.json")
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "release.json is a symbolic link" in doc["error"], doc

    d = broken("linked-envelopes")
    (d / "envelopes").rename(tmp_path / "other-envelopes")
    (d / "envelopes").symlink_to(tmp_path / "other-envelopes")
    code, doc, _ = _inspect(capsys, str(d), *pub)
    assert code == 3 and "envelopes is a symbolic link" in doc["error"], doc

    d = broken("hostile-name")
    hostile = "pi-000.ewe\x1b[1A\x1b[2K\rVERIFIED\n"
    shutil.copy(d / "envelopes" / "pi-000.ewe", d / "envelopes" / hostile)
    capsys.readouterr()
    assert host_main(["inspect", str(d), *pub]) == 3
    out, err = capsys.readouterr()
    for stream in (out, err):
        assert "\x1b" not in stream and "\r" not in stream, stream
    first, *rest = out.splitlines()  # the verdict on one line, then the fields, each indented
    assert first.startswith(f"{d}: REFUSED: envelopes/pi-000.ewe\\x1b[1A\\x1b[2K\\x0dVERIFIED\\x0a is not a "
                            "device's envelope"), out
    assert rest and all(ln.startswith("  ") for ln in rest), out
    assert _inspect(capsys, str(clean), *pub)[0] == 0  # the clean release still passes
