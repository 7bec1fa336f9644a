"""The API contract (docs/openapi.json) is what the service serves, and the comparison of two
documents (tests/openapi_contract.py) tells each kind of breaking change from additive ones."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pytest

from tests.openapi_contract import DOCUMENT, ROOT, compare, live_document, main, render

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def live() -> Doc:
    return live_document()


# What writes the document besides the service's code: another release may word it otherwise.
SCHEMA_MAKERS = ("fastapi", "pydantic", "pydantic-core", "starlette")


def _unpinned_schema_makers() -> list[str]:
    """Those installed here at another version than the images' pins (deploy/constraints.txt:
    what `make install` installs; `make test-newest` and `make test-lowest` do not)."""
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    return [
        f"{name} {metadata.version(name)} (pinned {pins.get(name)})"
        for name in SCHEMA_MAKERS
        if pins.get(name) != metadata.version(name)
    ]


def test_the_committed_contract_is_the_served_api(live):
    committed = DOCUMENT.read_text("utf-8") if DOCUMENT.exists() else "{}"
    if committed != render(live):
        changes = compare(json.loads(committed), live)
        if unpinned := _unpinned_schema_makers():
            why = f"the contract is written under the pins, not {', '.join(unpinned)}"
            pytest.skip(f"{why}:\n{changes.report()}")
        pytest.fail(
            "docs/openapi.json is not the API the service serves: run `make openapi` to "
            "regenerate it, and review `git diff docs/openapi.json` before committing. A "
            "BREAKING change fails existing clients: avoid it, or announce it (a new route or "
            f"API version).\n{changes.report()}",
            pytrace=False,
        )


def test_the_contract_ignores_the_shells_settings(live, monkeypatch):
    """/openapi.json announces a server's limits; the contract is the default settings'."""
    monkeypatch.setenv("NLPSERVE_MAX_TEXT_CHARS", "100")
    monkeypatch.setenv("NLPSERVE_MAX_BATCH_ITEMS", "2")
    assert live_document() == live


def test_the_checker_exits_non_zero_when_the_document_is_stale(live, tmp_path, monkeypatch):
    stale = copy.deepcopy(live)
    del stale["paths"]["/v1/pos"]
    doc = tmp_path / "openapi.json"
    doc.write_text(render(stale))
    monkeypatch.setattr("tests.openapi_contract.DOCUMENT", doc)
    monkeypatch.setattr("tests.openapi_contract.ROOT", tmp_path)
    assert main([]) == 1
    assert main(["--write"]) == 0
    assert doc.read_text("utf-8") == render(live)
    assert main([]) == 0


def _schemas(doc: Doc) -> dict[str, Any]:
    schemas: dict[str, Any] = doc["components"]["schemas"]
    return schemas


def _op_removed(old: Doc, new: Doc) -> None:
    del new["paths"]["/v1/qa"]["post"]


def _path_removed(old: Doc, new: Doc) -> None:
    del new["paths"]["/v1/models/{name}"]


def _response_field_removed(old: Doc, new: Doc) -> None:
    del _schemas(new)["QAResponse"]["properties"]["score"]


def _response_field_optional(old: Doc, new: Doc) -> None:
    _schemas(new)["PolarityResponse"]["required"].remove("truncated")


def _required_request_field_added(old: Doc, new: Doc) -> None:
    qa = _schemas(new)["QARequest"]
    qa["properties"]["lang"] = {"type": "string"}
    qa["required"].append("lang")


def _request_field_now_required(old: Doc, new: Doc) -> None:
    _schemas(new)["ExplainRequest"]["required"].append("max_evals")


def _request_field_removed(old: Doc, new: Doc) -> None:
    del _schemas(new)["ExplainRequest"]["properties"]["max_evals"]


def _enum_value_removed(old: Doc, new: Doc) -> None:
    _schemas(old)["PolarityResponse"]["properties"]["label"]["enum"] = ["negative", "positive"]
    _schemas(new)["PolarityResponse"]["properties"]["label"]["enum"] = ["positive"]


def _request_enum_value_removed(old: Doc, new: Doc) -> None:
    old_dt = _schemas(old)["V2RequestInput"]["properties"]["datatype"]
    new_dt = _schemas(new)["V2RequestInput"]["properties"]["datatype"]
    old_dt["enum"], new_dt["enum"] = ["BYTES", "FP32"], ["BYTES"]


def _response_enum_value_added(old: Doc, new: Doc) -> None:
    _schemas(old)["PolarityResponse"]["properties"]["label"]["enum"] = ["negative", "positive"]
    _schemas(new)["PolarityResponse"]["properties"]["label"]["enum"] = ["negative", "neutral"] + [
        "positive"
    ]


def _request_type_changed(old: Doc, new: Doc) -> None:
    _schemas(new)["QARequest"]["properties"]["question"]["type"] = "integer"


def _response_type_changed(old: Doc, new: Doc) -> None:
    _schemas(new)["QAResponse"]["properties"]["score"]["type"] = "string"


def _limit_tightened(old: Doc, new: Doc) -> None:
    _schemas(new)["QARequest"]["properties"]["context"]["maxLength"] = 100


def _required_parameter_added(old: Doc, new: Doc) -> None:
    op = new["paths"]["/v1/pos"]["post"]
    op.setdefault("parameters", []).append(
        {"name": "X-Api-Version", "in": "header", "required": True, "schema": {"type": "string"}}
    )


def _required_header_dropped(old: Doc, new: Doc) -> None:
    del new["paths"]["/v1/pos"]["post"]["responses"]["200"]["headers"]["X-Request-ID"]


def _success_answer_removed(old: Doc, new: Doc) -> None:
    del new["paths"]["/healthz"]["get"]["responses"]["200"]


def _unknown_fields_refused(old: Doc, new: Doc) -> None:
    _schemas(old)["V2InferenceRequest"]["additionalProperties"] = True
    _schemas(new)["V2InferenceRequest"]["additionalProperties"] = False


def _body_choice_removed(old: Doc, new: Doc) -> None:
    _schemas(new)["QABody"]["oneOf"].pop()  # no more batches


BREAKING: dict[str, tuple[Callable[[Doc, Doc], None], str]] = {
    "operation removed": (_op_removed, "POST /v1/qa: operation removed"),
    "path removed": (_path_removed, "GET /v1/models/{name}: operation removed"),
    "response field removed": (_response_field_removed, "QAResponse: field 'score' removed"),
    "response field optional": (
        _response_field_optional,
        "PolarityResponse: field 'truncated' no longer always there",
    ),
    "required request field added": (
        _required_request_field_added,
        "request QARequest: new required field 'lang'",
    ),
    "request field now required": (
        _request_field_now_required,
        "request ExplainRequest: field 'max_evals' now required",
    ),
    "request field removed": (_request_field_removed, "ExplainRequest: field 'max_evals' removed"),
    "response enum value removed": (_enum_value_removed, "enum value 'negative' removed"),
    "request enum value removed": (
        _request_enum_value_removed,
        "request V2RequestInput.datatype: enum value 'FP32' removed",
    ),
    "response enum value added": (_response_enum_value_added, "new enum value 'neutral'"),
    "request type changed": (
        _request_type_changed,
        "request QARequest.question: type string -> integer",
    ),
    "response type changed": (
        _response_type_changed,
        "response QAResponse.score: type number -> string",
    ),
    "limit tightened": (
        _limit_tightened,
        "request QARequest.context: maxLength 20000 -> 100",
    ),
    "required parameter added": (
        _required_parameter_added,
        "POST /v1/pos: new required header parameter X-Api-Version",
    ),
    "required header dropped": (_required_header_dropped, "header X-Request-ID removed"),
    "success answer removed": (_success_answer_removed, "GET /healthz: answer 200 removed"),
    "unknown fields refused": (
        _unknown_fields_refused,
        "V2InferenceRequest: fields it does not know are now refused",
    ),
    "batch body removed": (_body_choice_removed, "request QABody: choice QABatchRequest removed"),
}


@pytest.mark.parametrize("kind", sorted(BREAKING))
def test_each_kind_of_breaking_change_is_caught(live, kind):
    change, expected = BREAKING[kind]
    old, new = copy.deepcopy(live), copy.deepcopy(live)
    change(old, new)
    changes = compare(old, new)
    assert [b for b in changes.breaking if expected in b], changes.report()
    assert changes.breaking == sorted(changes.breaking)


def test_additive_changes_break_nothing(live):
    old, new = copy.deepcopy(live), copy.deepcopy(live)
    schemas = _schemas(new)
    new["paths"]["/v1/ner"] = copy.deepcopy(new["paths"]["/v1/pos"])
    schemas["QARequest"]["properties"]["lang"] = {"type": "string"}  # optional
    schemas["QAResponse"]["properties"]["model"] = {"type": "string"}
    schemas["QAResponse"]["required"].append("model")
    schemas["QARequest"]["properties"]["context"]["maxLength"] = 50_000
    schemas["QARequest"]["properties"]["question"]["type"] = ["string", "null"]  # widened
    _schemas(old)["V2RequestInput"]["properties"]["datatype"]["enum"] = ["BYTES"]
    schemas["V2RequestInput"]["properties"]["datatype"]["enum"] = ["BYTES", "FP32"]
    new["paths"]["/v1/pos"]["post"]["responses"]["200"]["headers"]["X-Model"] = {
        "schema": {"type": "string"}
    }
    new["paths"]["/v1/pos"]["post"].setdefault("parameters", []).append(
        {"name": "X-Trace", "in": "header", "required": False, "schema": {"type": "string"}}
    )
    new["info"]["description"] = "reworded"
    schemas["QARequest"]["properties"]["question"]["description"] = "reworded"

    changes = compare(old, new)
    assert changes.breaking == [], changes.report()
    assert changes.additive == [
        "POST /v1/ner: new operation",
        "POST /v1/pos answer 200: new header X-Model",
        "POST /v1/pos: new optional header parameter X-Trace",
        "request QARequest.context: maxLength 20000 -> 50000",
        "request QARequest.question: type string -> null|string",
        "request QARequest: new optional field 'lang'",
        "request V2RequestInput.datatype: new enum value 'FP32'",
        "response QAResponse: new field 'model'",
    ]


def test_an_unchanged_document_has_no_changes(live):
    changes = compare(live, copy.deepcopy(live))
    assert (changes.breaking, changes.additive, changes.other) == ([], [], [])
