"""Scores of scikit-learn classifiers exported with skl2onnx: the agent shows what onnxruntime
computes, never a second softmax over probabilities (packager/scores.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.errors import UsageError
from packager.modelfile import infer_task, read_model
from tests.conftest import Board

ROLE_POLICY = {"roles": {"user": "label", "engineer": "band", "admin": "scores"}}


def _classifiers(binary: bool) -> Iterator[tuple[str, Any]]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    yield "logreg", LogisticRegression(max_iter=500)
    yield "forest", RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0)
    yield "boosting", GradientBoostingClassifier(n_estimators=5, max_depth=2, random_state=0)
    yield "svc", SVC(probability=True, random_state=0)
    yield "mlp", MLPClassifier((8,), max_iter=300, random_state=0)


@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Tiny iris classifiers (multi-class and binary), exported with zipmap=False: name -> (file,
    the last op before the probability output)."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    d = tmp_path_factory.mktemp("sklearn")
    out = {}
    for binary in (False, True):
        target = (y == 1).astype(np.int64) if binary else y
        for name, clf in _classifiers(binary):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                clf.fit(x, target)
                model = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}},
                                target_opset={"": 17, "ai.onnx.ml": 3})
            producer = next(n.op_type for n in model.graph.node if model.graph.output[1].name in n.output)
            key = f"{name}-{'binary' if binary else 'multi'}"
            path = d / f"{key}.onnx"
            path.write_bytes(model.SerializeToString())
            out[key] = (path, producer)
    return out


def _iris() -> np.ndarray:
    from sklearn.datasets import load_iris

    x, _ = load_iris(return_X_y=True)
    return x.astype(np.float32)[::10]


def test_the_exports_end_in_the_ops_that_made_the_scores_wrong(sklearn_models: dict[str, tuple[Path, str]]) -> None:
    ends = {k: v[1] for k, v in sklearn_models.items()}
    assert ends["logreg-multi"] == "Normalizer"
    assert ends["forest-multi"] == "TreeEnsembleClassifier"
    assert ends["svc-multi"] == "Cast"
    assert ends["mlp-binary"] == "Concat"


def test_every_sklearn_classifier_output_is_recognised_as_probabilities(
    sklearn_models: dict[str, tuple[Path, str]],
) -> None:
    for name, (path, _) in sklearn_models.items():
        task = infer_task(read_model(path), {})
        assert (task["kind"], task["scores"]) == ("classifier", "probabilities"), name


def test_admin_scores_match_onnxruntime_for_sklearn_classifiers(
    sklearn_models: dict[str, tuple[Path, str]], make_board: Callable[..., Board], pack_for: Callable[..., Path]
) -> None:
    import onnxruntime as ort

    board = make_board()
    x = _iris()
    chosen = {k: v for k, v in sklearn_models.items() if k.endswith("-multi") or k == "mlp-binary"}
    for name, (path, _) in chosen.items():
        out = pack_for(path, [board], model_id=name, policy=ROLE_POLICY)
        board.agent().install((out / f"{board.device_id}.ewb").read_bytes())
    agent = board.agent()
    for name, (path, _) in chosen.items():
        session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
        labels, probs = session.run(None, {session.get_inputs()[0].name: x})
        answer = agent.predict(x, role="admin", model_id=name)
        got = np.array([row["scores"] for row in answer["predictions"]])
        np.testing.assert_allclose(got, np.round(probs, 4), atol=1e-4, err_msg=name)
        assert [row["label"] for row in answer["predictions"]] == labels.tolist(), name
        # The bands follow onnxruntime's confidence (high >= 0.9, medium >= 0.6): a second softmax
        # banded every answer "low".
        want = ["high" if p >= 0.9 else "medium" if p >= 0.6 else "low" for p in probs.max(axis=1)]
        assert [row["confidence"] for row in answer["predictions"]] == want, name


def test_scores_option_is_sealed_and_on_the_model_card(
    sklearn_models: dict[str, tuple[Path, str]], make_board: Callable[..., Board], publisher: Path, tmp_path: Path
) -> None:
    from packager.cli import main

    board = make_board()
    path = sklearn_models["svc-multi"][0]
    out = tmp_path / "out"
    code = main([
        "pack", str(path), "--profile", "rpi4b", "--publisher-key", str(publisher / "publisher.key"),
        "--device", str(board.enrolment), "--model-version", "1", "--out", str(out), "--quiet",
        "--scores", "logits",
    ])
    assert code == 0
    card = json.loads((out / "model-card.cdx.json").read_text())
    props = {p["name"]: p["value"] for p in card["components"][0]["properties"]}
    assert props["edgeward:scores"] == "logits"
    agent = board.agent()
    agent.install((out / f"{board.device_id}.ewb").read_bytes())
    assert agent.model().sidecar.task["scores"] == "logits"
    # The explicit choice is what the agent applies: a softmax over the probabilities.
    import onnxruntime as ort

    x = _iris()
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    probs = session.run(None, {session.get_inputs()[0].name: x})[1].astype(np.float64)
    soft = np.exp(probs - probs.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    got = np.array([r["scores"] for r in agent.predict(x, role="admin")["predictions"]])
    np.testing.assert_allclose(got, np.round(soft, 4), atol=1e-4)


def test_scores_option_only_for_classifiers(sklearn_models: dict[str, tuple[Path, str]]) -> None:
    model = read_model(sklearn_models["logreg-multi"][0])
    with pytest.raises(UsageError, match="--scores applies to classifiers"):
        infer_task(model, {"kind": "raw", "scores": "logits"})
    assert infer_task(model, {"scores": "logits"})["scores"] == "logits"


def test_tflite_softmax_output_is_probabilities() -> None:
    from tests.fixtures.hardening import digits_cnn

    task = infer_task(read_model(digits_cnn().tflite), {})
    assert task["scores"] == "probabilities"
