"""The model card: a CycloneDX 1.6 ML-BOM that tracks the model as an asset (NCSC 2.5, 2.6).

One ``machine-learning-model`` component carries the shipped model's hash, its lineage (the
input model as a pedigree ancestor, with its own hash), the hardening parameters, accuracy before
and after, parameter count against training-set size, intended use and limitations, and its
lifespan: end of life, retention and the destruction method the boards apply.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from device_agent.wire import format_time

DESTRUCTION = (
    "crypto-shred: the device key that unseals the model is destroyed "
    "(NIST SP 800-88 cryptographic erase)"
)


@dataclass(frozen=True)
class CardFacts:
    """What hardening (or plain packing) learnt about a model, for its card."""

    input_sha256: str
    input_name: str
    input_bytes: int
    output_sha256: str
    output_bytes: int
    model_format: str
    task: str
    scores: str | None = None  # a classifier's output: "probabilities" or "logits" (packager.scores)
    parameters_before: int | None = None
    parameters_after: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    hardening: dict[str, str] = field(default_factory=dict)
    training_samples: int | None = None
    training_data: str | None = None
    intended_use: str = "on-device inference through the EdgeWard agent"
    limitations: tuple[str, ...] = ()
    retention: str = "until end of life or decommissioning, whichever comes first"


def capacity_note(parameters: int | None, samples: int | None) -> str | None:
    """NCSC 2.6: a model with far more parameters than training samples can memorise them."""
    if not parameters or not samples:
        return None
    ratio = parameters / samples
    verdict = "high: able to memorise training samples" if ratio > 10 else "proportionate"
    return f"{parameters} parameters for {samples} training samples ({ratio:.1f} each): {verdict}"


def build(
    facts: CardFacts,
    *,
    model_id: str,
    model_version: int | None,
    profile: str,
    runtime: str,
    created: datetime,
    tool_version: str,
    end_of_life: datetime | None = None,
    expires: datetime | None = None,
) -> dict[str, Any]:
    """The CycloneDX 1.6 document, as a JSON-ready dict."""
    version = str(model_version) if model_version is not None else "unversioned"
    props = [
        {"name": "edgeward:profile", "value": profile},
        {"name": "edgeward:runtime", "value": runtime},
        {"name": "edgeward:retention", "value": facts.retention},
        {"name": "edgeward:destruction_method", "value": DESTRUCTION},
        {
            "name": "edgeward:end_of_life",
            "value": format_time(end_of_life) if end_of_life else "not set",
        },
        {"name": "edgeward:input_size_bytes", "value": str(facts.input_bytes)},
        {"name": "edgeward:output_size_bytes", "value": str(facts.output_bytes)},
    ]
    if model_version is not None:
        props.append({"name": "edgeward:model_version", "value": version})
    if facts.scores is not None:
        props.append({"name": "edgeward:scores", "value": facts.scores})
    if expires:
        props.append({"name": "edgeward:bundle_expires", "value": format_time(expires)})
    props += [
        {"name": f"edgeward:hardening:{k}", "value": v} for k, v in sorted(facts.hardening.items())
    ]
    for key, value in (
        ("parameters_before", facts.parameters_before),
        ("parameters_after", facts.parameters_after),
        ("training_samples", facts.training_samples),
    ):
        if value is not None:
            props.append({"name": f"edgeward:{key}", "value": str(value)})
    metrics = [
        {"type": "accuracy", "value": f"{acc:.4f}", "slice": f"validation, {which} hardening"}
        for which, acc in (("before", facts.accuracy_before), ("after", facts.accuracy_after))
        if acc is not None
    ]
    limitations = list(facts.limitations)
    capacity = capacity_note(facts.parameters_after, facts.training_samples)
    if capacity:
        limitations.append(f"capacity: {capacity}")
    if facts.accuracy_before is None:
        limitations.append("accuracy after hardening was not measured (no --validation data)")
    considerations: dict[str, Any] = {"useCases": [facts.intended_use]}
    if limitations:
        considerations["technicalLimitations"] = limitations
    model_ref = f"model:{model_id}@{version}"
    params: dict[str, Any] = {"task": facts.task, "modelArchitecture": facts.model_format}
    components: list[dict[str, Any]] = []
    if facts.training_data:
        params["datasets"] = [{"ref": "data:training"}]
        components.append(
            {
                "type": "data",
                "bom-ref": "data:training",
                "name": facts.training_data,
                "data": [{"type": "dataset", "name": facts.training_data}],
            }
        )
    card: dict[str, Any] = {
        "bom-ref": f"{model_ref}:card",
        "modelParameters": params,
        "considerations": considerations,
    }
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    model = {
        "type": "machine-learning-model",
        "bom-ref": model_ref,
        "name": model_id,
        "version": version,
        "hashes": [{"alg": "SHA-256", "content": facts.output_sha256}],
        "pedigree": {
            "ancestors": [
                {
                    "type": "machine-learning-model",
                    "bom-ref": f"{model_ref}:input",
                    "name": facts.input_name,
                    "hashes": [{"alg": "SHA-256", "content": facts.input_sha256}],
                }
            ],
            "notes": "hardened by edgeward: "
            + (
                ", ".join(f"{k}={v}" for k, v in sorted(facts.hardening.items()))
                or "packed unchanged"
            ),
        },
        "modelCard": card,
        "properties": props,
    }
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": format_time(created),
            "tools": {
                "components": [{"type": "application", "name": "edgeward", "version": tool_version}]
            },
            "component": {
                "type": "machine-learning-model",
                "bom-ref": f"{model_ref}:meta",
                "name": model_id,
                "version": version,
            },
        },
        "components": [model, *components],
    }
