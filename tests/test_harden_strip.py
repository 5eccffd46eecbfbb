"""Stripping (NCSC 1.3, 3.3): no original name, doc string or metadata value survives in the
hardened bytes, and predictions are bit-for-bit unchanged. Real models only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime.runners import load_runner
from packager.harden.strip_onnx import strip_onnx
from packager.harden.strip_tflite import strip_tflite
from tests.fixtures.hardening import (
    digits_cnn,
    leaked,
    onnx_leaks,
    onnx_secrets,
    rapidocr_labels,
    rapidocr_rec_model,
    tflite_secrets,
)
from tests.fixtures.models import silero_vad_onnx


def _run_all(data: bytes, runtime: str, feeds: list[np.ndarray]) -> list[np.ndarray]:
    runner = load_runner(runtime, data)
    return runner.run({spec.name: x for spec, x in zip(runner.inputs, feeds, strict=True)})


def _silero_feeds() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((1, 512)).astype(np.float32),
        np.zeros((2, 1, 128), np.float32),
        np.array(16000, np.int64),
    ]


@pytest.mark.parametrize("which", ["digits-mlp", "digits-cnn", "silero-vad"])
def test_harden_strip_onnx_leaves_no_names_and_same_predictions(
    which: str, digits, digits_test
) -> None:
    x, _ = digits_test
    cnn = digits_cnn()
    cnn_x = (np.load(cnn.validation)["x"] / 16).astype(np.float32)[:, None]
    path, feeds = {
        "digits-mlp": (digits.onnx, [x]),
        "digits-cnn": (cnn.onnx, [cnn_x]),
        "silero-vad": (silero_vad_onnx(), _silero_feeds()),
    }[which]
    data = path.read_bytes()
    stripped = strip_onnx(data)
    assert len(onnx_secrets(data)) >= 5
    assert onnx_leaks(data, stripped) == []
    for before, after in zip(
        _run_all(data, "onnxruntime", feeds), _run_all(stripped, "onnxruntime", feeds), strict=True
    ):
        np.testing.assert_array_equal(before, after)


def test_harden_strip_tflite_leaves_no_names_metadata_or_trailer() -> None:
    cnn = digits_cnn()
    data = cnn.tflite.read_bytes() + b"PK\x03\x04appended-labels-archive"
    stripped = strip_tflite(data)
    secrets = tflite_secrets(data) | {"appended-labels-archive"}
    assert {"TFLITE_METADATA", "serving_default"} <= secrets
    assert leaked(secrets, stripped) == []
    x = (np.load(cnn.validation)["x"] / 16).astype(np.float32)[..., None]
    np.testing.assert_array_equal(
        _run_all(data, "litert", [x])[0], _run_all(stripped, "litert", [x])[0]
    )


def test_harden_strip_rapidocr_dictionary_is_gone_from_model_bytes() -> None:
    path = rapidocr_rec_model()
    data = path.read_bytes()
    dictionary = "\n".join(rapidocr_labels(path)[1:-1])
    assert dictionary[1000:1016].encode() in data  # the original carries it
    stripped = strip_onnx(data)
    windows = {dictionary[i : i + 16] for i in range(0, len(dictionary) - 16, 97)}
    assert not [w for w in windows if w.encode() in stripped]
    assert b"character" not in stripped
    assert onnx_leaks(data, stripped) == []


def test_harden_strip_is_idempotent_and_small(tmp_path: Path) -> None:
    data = digits_cnn().onnx.read_bytes()
    once = strip_onnx(data)
    assert strip_onnx(once) == once
    assert len(once) < len(data)


# --- F3: every place an ONNX model can carry a string ----------------------------------------

PROBE_SECRETS = (
    "jane.doe",
    "train_secret.py",
    "AcmeSecretNet",
    "SECRET_TENSOR_VALUE",
    "SECRET_GRAPH_VALUE",
    "SECRET_VI_VALUE",
    "SECRET_FN_VALUE",
    "AcmeSecretBlock",
    "com.acme.secret",
    "fn_in_acme",
    "acme_fn_softmax",
    "acme_quant_annotated_tensor",
    "acme_scale_name",
    "acme_fc_weight",
    "acme_fc_matmul",
    "pixels",
)


def probe_model() -> bytes:
    """A small classifier (IR 10) with identifying strings in every field the first stripper
    missed: metadata_props on node, graph, value-info, tensor and function, a model-local
    function (name, domain, inner names), and a quantisation annotation."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((64, 10)).astype(np.float32), "acme_fc_weight")
    b = nh.from_array(np.zeros(10, np.float32), "acme_fc_bias")
    b.metadata_props.add(key="SECRET_TENSOR_KEY", value="SECRET_TENSOR_VALUE")
    mm = h.make_node("MatMul", ["pixels", "acme_fc_weight"], ["mm_out"], name="acme_fc_matmul")
    mm.metadata_props.add(
        key="pkg.torch.onnx.stack_trace",
        value='File "/home/jane.doe/acme/train_secret.py", line 42, in forward',
    )
    mm.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['AcmeSecretNet', 'acme_fc']")
    fn = h.make_function(
        "com.acme.secret",
        "AcmeSecretBlock",
        ["fn_in_acme"],
        ["fn_out_acme"],
        [h.make_node("Softmax", ["fn_in_acme"], ["fn_out_acme"], name="acme_fn_softmax", axis=-1)],
        [h.make_opsetid("", 17)],
    )
    fn.metadata_props.add(key="SECRET_FN_KEY", value="SECRET_FN_VALUE")
    add = h.make_node("Add", ["mm_out", "acme_fc_bias"], ["logits_acme"], name="acme_add")
    block = h.make_node(
        "AcmeSecretBlock", ["logits_acme"], ["probabilities"], domain="com.acme.secret"
    )
    g = h.make_graph(
        [mm, add, block],
        "acme_graph",
        [h.make_tensor_value_info("pixels", T.FLOAT, ["batch", 64])],
        [h.make_tensor_value_info("probabilities", T.FLOAT, ["batch", 10])],
        [w, b],
    )
    g.metadata_props.add(key="SECRET_GRAPH_KEY", value="SECRET_GRAPH_VALUE")
    g.input[0].metadata_props.add(key="SECRET_VI_KEY", value="SECRET_VI_VALUE")
    qa = g.quantization_annotation.add()
    qa.tensor_name = "acme_quant_annotated_tensor"
    kv = qa.quant_parameter_tensor_names.add()
    kv.key, kv.value = "SCALE_TENSOR", "acme_scale_name"
    m = h.make_model(
        g,
        opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.acme.secret", 1)],
        functions=[fn],
    )
    m.ir_version = 10
    return m.SerializeToString()


def test_harden_strip_onnx_probe_model_every_string_field() -> None:
    data = probe_model()
    assert all(s.encode() in data for s in PROBE_SECRETS)
    stripped = strip_onnx(data)
    assert [s for s in PROBE_SECRETS if s.encode() in stripped] == []
    assert onnx_leaks(data, stripped) == []
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        _run_all(data, "onnxruntime", [x])[0], _run_all(stripped, "onnxruntime", [x])[0]
    )


def test_harden_strip_leak_checker_is_generic() -> None:
    """The test's checker finds strings in fields it was never told about."""
    import onnx

    m = onnx.load_from_string(probe_model())
    m.graph.node[0].attribute.add(name="acme_custom_attr_note", type=onnx.AttributeProto.STRING)
    assert "acme_custom_attr_note" in onnx_secrets(m.SerializeToString())
    assert "SECRET_FN_VALUE" in onnx_secrets(m.SerializeToString())


def test_harden_strip_self_check_refuses_what_it_cannot_remove() -> None:
    """A string stripping cannot remove without changing the model (here a LabelEncoder's
    keys) is refused with one clear line, exit 3, never shipped."""
    from onnx import TensorProto as T
    from onnx import helper as h

    from packager.harden.strip_onnx import Unstrippable

    enc = h.make_node(
        "LabelEncoder",
        ["x"],
        ["y"],
        domain="ai.onnx.ml",
        keys_strings=["acme_secret_part_a", "acme_secret_part_b"],
        values_int64s=[0, 1],
        default_int64=-1,
    )
    g = h.make_graph(
        [enc],
        "g",
        [h.make_tensor_value_info("x", T.STRING, [None])],
        [h.make_tensor_value_info("y", T.INT64, [None])],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)])
    with pytest.raises(Unstrippable, match="survives stripping") as e:
        strip_onnx(m.SerializeToString())
    assert e.value.exit_code == 3 and "acme" not in str(e.value)


def test_harden_strip_corrupt_onnx_is_format_error() -> None:
    from device_agent.errors import FormatError

    with pytest.raises(FormatError, match="not a valid ONNX"):
        strip_onnx(b"\x08\x07\x12\xff\xff\xff garbage")


def test_harden_strip_ml_classifier_string_labels_move_to_sidecar() -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from packager.harden.strip_onnx import onnx_class_labels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    names = np.array(["acme_defect_crack", "acme_defect_rust", "acme_ok"])
    y = names[rng.integers(0, 3, 60)]
    for zipmap in (False, True):
        m = to_onnx(
            LogisticRegression().fit(x, y),
            x[:1],
            options={"zipmap": zipmap},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        data = m.SerializeToString()
        assert onnx_class_labels(data) == list(names)
        stripped = strip_onnx(data)
        assert [n for n in names if n.encode() in stripped] == []
        assert onnx_leaks(data, stripped) == []
        before = _run_all(data, "onnxruntime", [x])
        after = _run_all(stripped, "onnxruntime", [x])
        assert [names[i] for i in after[0]] == list(before[0])  # labels now indices
        if not zipmap:
            np.testing.assert_array_equal(before[1], after[1])


def test_harden_strip_tflite_self_check_catches_survivors() -> None:
    from packager.harden.strip_onnx import Unstrippable
    from packager.harden.strip_tflite import check_stripped

    data = digits_cnn().tflite.read_bytes()
    with pytest.raises(Unstrippable, match="survives stripping"):
        check_stripped(data, data)  # the unstripped model fails its own check
    check_stripped(data, strip_tflite(data))


def test_harden_strip_corrupt_tflite_is_format_error() -> None:
    from device_agent.errors import FormatError

    data = bytearray(digits_cnn().tflite.read_bytes()[:64])
    with pytest.raises(FormatError):
        strip_tflite(bytes(data))


VENDOR_BLOB = (
    b"\x00\x01/home/vendor-ci/build/acme_meter_reader_v3/export\x00converter_flags=--optimize=latency"
    b" --target=armv8\x00model_name=acme-secret-meter-net\x00"
)


def _with_unreferenced_buffer(data: bytes, blob: bytes) -> bytes:
    """The model with one more buffer that no tensor and no metadata entry references."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    from packager.harden.tflite_util import read_tflite

    model = read_tflite(data)
    extra = s.BufferT()
    extra.data = np.frombuffer(blob, np.uint8)
    model.buffers.append(extra)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_harden_strip_tflite_drops_buffers_no_tensor_references() -> None:
    from packager.harden.tflite_util import read_tflite

    cnn = digits_cnn()
    data = _with_unreferenced_buffer(cnn.tflite.read_bytes(), VENDOR_BLOB)
    assert b"acme-secret-meter-net" in data
    stripped = strip_tflite(data)
    for needle in (b"/home/vendor-ci/build", b"converter_flags", b"acme-secret-meter-net", b"acme_meter"):
        assert needle not in stripped
    model = read_tflite(stripped)
    used = {t.buffer for sub in model.subgraphs for t in sub.tensors}
    assert set(range(1, len(model.buffers))) <= used  # every buffer but the empty one is used
    x = (np.load(cnn.validation)["x"] / 16).astype(np.float32)[..., None]
    np.testing.assert_array_equal(
        _run_all(cnn.tflite.read_bytes(), "litert", [x[:1]])[0], _run_all(stripped, "litert", [x[:1]])[0]
    )


def test_harden_strip_tflite_self_check_scans_every_byte_of_the_output() -> None:
    """A result that kept the unreferenced vendor buffer (what removing metadata entries alone
    leaves) is refused by the self-check: it looks at the bytes, not only at the strings the
    schema knows."""
    from ai_edge_litert.tools import flatbuffer_utils

    from packager.harden.strip_onnx import Unstrippable
    from packager.harden.strip_tflite import check_stripped
    from packager.harden.tflite_util import read_tflite

    data = _with_unreferenced_buffer(digits_cnn().tflite.read_bytes(), VENDOR_BLOB)
    model = read_tflite(data)
    model.description = model.metadata = model.metadataBuffer = model.signatureDefs = None
    for sub in model.subgraphs:
        sub.name = None
        for i, t in enumerate(sub.tensors):
            t.name = f"t{i}"
    kept_blob = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    assert b"acme-secret-meter-net" in kept_blob
    with pytest.raises(Unstrippable, match="printable string of the original"):
        check_stripped(data, kept_blob)
    check_stripped(data, strip_tflite(data))
