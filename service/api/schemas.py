"""Request and response bodies of the HTTP API (pydantic: validation + the /docs page).

Every prediction endpoint accepts one item or ``{"inputs": [item, ...]}``; the two shapes are
told apart by the presence of ``inputs`` (a callable discriminator), so a validation error
talks about the shape the client actually sent.
"""

from __future__ import annotations

import functools
import operator
import unicodedata
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from service.config import MAX_LIST_ITEMS

# QA's per-request options: the most spans `answers` lists (the decoder pairs each window's
# 20 best starts and ends), and the longest answer one may ask for (no window is longer).
MAX_TOP_K = 20
MAX_ANSWER_TOKENS = 4096


def _has_visible(v: str) -> bool:
    """True when ``v`` holds a character other than whitespace, control (Cc) and format (Cf)
    characters: "\u200b" or "\x00" alone would reach the model as no tokens at all."""
    for ch in v:  # almost always decided by the first character
        if ch.isspace():
            continue
        if ch.isascii():
            if ch.isprintable():
                return True
        elif unicodedata.category(ch) not in ("Cc", "Cf"):
            return True
    return False


def valid_unicode(v: str) -> str:
    """``v``, refused when it is not valid Unicode (it could be neither tokenized nor
    written back in a UTF-8 answer)."""
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # JSON "\\ud800" escapes decode to lone surrogates
            raise PydanticCustomError(
                "invalid_text", "contains an unpaired surrogate: not valid Unicode text"
            ) from None
    return v


def _not_blank(v: str) -> str:
    if not _has_visible(v):
        raise PydanticCustomError(
            "empty_text",
            "must contain some visible text (not only whitespace, control or format characters)",
        )
    return valid_unicode(v)


# What /openapi.json says of a text field: never empty, and (TEXT_MARK: service/api/openapi.py
# puts this server's NLPSERVE_MAX_TEXT_CHARS there) not over the limit. The validators above
# say more than a JSON Schema can (visible text, valid Unicode): their own 422 codes.
TEXT_MARK = "x-nlpserve-text"
Text = Annotated[
    str, AfterValidator(_not_blank), Field(json_schema_extra={"minLength": 1, TEXT_MARK: True})
]
# A word of `tokens`: the limit applies to the words joined, not to each one.
Token = Annotated[str, AfterValidator(_not_blank), Field(json_schema_extra={"minLength": 1})]


class _Item(BaseModel):
    # Unknown fields are errors: a typo ("txt") must not pass as an empty request.
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # a field left out, never null: no default to show


# exclude_if, not a model serializer: pydantic-core calls this C function, where a wrap
# serializer ran Python for every answer dumped on the event loop (~0.8 us each, twice a
# plain dump: tests/test_task_boundaries.py)
_UNASKED = functools.partial(operator.is_, None)


def _asked(description: str) -> Any:
    """A response field a request option asks for: left out, not null, when not asked, so
    answers of requests without the option are as they were before it existed."""
    return Field(None, description=description, exclude_if=_UNASKED, json_schema_extra=_no_default)


# ---------------------------------------------------------------------------- errors
class ErrorLimit(BaseModel):
    name: str = Field(
        description="Which limit (docs/service.md, Errors): `max_batch_items` (items in one "
        "request), `max_in_flight` (the client's items admitted and not yet answered), "
        "`burst` (the client's items in one request, its rate limit's), `rate` (the client's "
        "items a second), `max_body_bytes` (bytes of the body), `max_request_sequences` (model "
        "sequences one request may need: QA windows, detect windows, one per item elsewhere). "
        "Other names may come: ignore those you do not know.",
        examples=["max_in_flight"],
    )
    value: float = Field(
        description="The limit in force for this client: items, items a second (`rate`), "
        "bytes (`max_body_bytes`) or model sequences (`max_request_sequences`); a whole number "
        "but for `rate`.",
        examples=[3],
    )


class ErrorBody(BaseModel):
    code: str = Field(
        description="Stable machine-readable error code (docs/service.md lists them).",
        examples=["empty_text"],
    )
    message: str = Field(
        description="What went wrong, for people (wording may change: match on `code`).",
        examples=["text: must contain some visible text"],
    )
    limit: ErrorLimit | SkipJsonSchema[None] = Field(
        None,
        description="Only where a limit refused the request (`too_many_items`, "
        "`client_quota`, `client_rate`, `body_too_large`): which limit, and its value for "
        "this client.",
        json_schema_extra=_no_default,
    )


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of this service."""

    error: ErrorBody


# ---------------------------------------------------------------------------- POS
class PosRequest(_Item):
    text: Text | None = Field(
        None,
        description="Raw English text; split into words by the model's tokenizer.",
        examples=["The quick brown fox jumps over the lazy dog."],
    )
    tokens: list[Token] | None = Field(
        None,
        max_length=MAX_LIST_ITEMS,
        description="Already split words (instead of `text`): tagged as given (no more than "
        "the model reads: its `max_length`, see GET /v1/models).",
        examples=[["The", "dog", "barks", "."]],
    )
    scores: bool = Field(
        False,
        strict=True,
        description="Also answer `scores`: each tag's probability (the model's confidence in "
        "it), aligned with `tags`.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> PosRequest:
        if (self.text is None) == (self.tokens is None):
            raise PydanticCustomError("text_or_tokens", "give exactly one of 'text' or 'tokens'")
        if self.tokens is not None and not self.tokens:
            raise PydanticCustomError("empty_text", "'tokens' must not be empty")
        return self


class PosResponse(_Out):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tokens": ["She", "likes", "red", "cars", "."],
                    "tags": ["PRP", "VBZ", "JJ", "NNS", "."],
                }
            ]
        }
    )

    tokens: list[str] = Field(description="The words that were tagged.")
    tags: list[str] = Field(description="One part-of-speech tag per token (Penn Treebank set).")
    scores: list[float] | SkipJsonSchema[None] = _asked(
        "Only when the request set `scores`: each tag's probability, 0 to 1 "
        "(softmax over the tag set), aligned with `tags`."
    )


# ---------------------------------------------------------------------------- polarity
class PolarityRequest(_Item):
    text: Text = Field(
        description="An English sentence or short review.",
        examples=["A charming, funny and moving film."],
    )


class PolarityResponse(_Out):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"label": "positive", "positive_probability": 0.9925, "truncated": False}]
        }
    )

    label: str = Field(description="`positive` or `negative`.", examples=["positive"])
    positive_probability: float = Field(description="P(positive), 0 to 1.", examples=[0.9925])
    truncated: bool = Field(
        description="True when the text was longer than the model's max length and only its "
        "first max_length tokens were read."
    )


# ---------------------------------------------------------------------------- detect
# Examples of the English detector's requests (/docs): the first as ChatGPT answers, the second
# as people do; tests/test_manifest.py checks that the committed model labels them so.
DETECT_EXAMPLES = (
    "There are several reasons why the sky appears blue. Sunlight is made up of many different "
    "colors of light, and when it enters the Earth's atmosphere, the shorter blue wavelengths "
    "are scattered more than the other colors. This is known as Rayleigh scattering.",
    "Because the light from the sun gets scattered by the air, and blue gets scattered the "
    "most. That's why it looks blue most of the day, and red at sunset.",
)


class DetectRequest(_Item):
    text: Text = Field(
        description="The text to classify as human- or machine-written (the served "
        "`detector-en` reads English).",
        examples=[DETECT_EXAMPLES[0]],
    )
    windows: bool = Field(
        False,
        strict=True,
        description="Read the whole text, in consecutive windows of the model's max length, "
        "instead of its head: the answer is the windows' mean log-odds, weighted by their "
        "tokens, and `windows` lists each one's (where a document mixes human and machine "
        "text).",
    )


class DetectWindow(BaseModel):
    start: int = Field(
        description="Offset of the window's text in `text` (inclusive), code points; the "
        "windows' spans are consecutive and trimmed of whitespace."
    )
    end: int = Field(description="Offset of its end (exclusive).")
    label: str = Field(description="This window's label, `human` or `machine`.")
    machine_probability: float = Field(description="P(machine) of this window alone.")


class DetectResponse(_Out):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"label": "machine", "machine_probability": 0.9864, "truncated": False}]
        }
    )

    label: str = Field(description="`human` or `machine`.", examples=["machine"])
    machine_probability: float = Field(description="P(machine), 0 to 1.", examples=[0.9864])
    truncated: bool = Field(
        description="True when the text was longer than the model's max length and only its "
        "head was read (never with `windows`)."
    )
    windows: list[DetectWindow] | SkipJsonSchema[None] = _asked(
        "Only when the request set `windows`: every window read, in text order "
        "(one for a text within the max length)."
    )


# ---------------------------------------------------------------------------- QA
class QARequest(_Item):
    question: Text = Field(description="The question.", examples=["长城有多长？"])
    context: Text = Field(
        description="The passage holding the answer. Long passages are read in overlapping "
        "windows; the best span over all windows wins.",
        examples=["长城是中国古代的军事防御工程，总长度超过两万千米。"],
    )
    top_k: int | None = Field(
        None,
        ge=1,
        le=MAX_TOP_K,
        strict=True,  # true would be read as 1, "3" as 3
        description="Also list the `top_k` best distinct spans, best first, as `answers` "
        "(left out: no `answers`).",
        examples=[3],
    )
    max_answer_length: int | None = Field(
        None,
        ge=1,
        le=MAX_ANSWER_TOKENS,
        strict=True,
        description="Longest answer, in model tokens (about one per Chinese character; an "
        "English word may take several). Left out: the model's own (`GET /v1/models`: "
        "`max_answer_length`).",
        examples=[30],
    )


class QASpan(BaseModel):
    answer: str = Field(description="The span: exactly `context[start:end]`.")
    start: int = Field(description="Offset of the span in `context` (inclusive), code points.")
    end: int = Field(description="Offset of the span end in `context` (exclusive).")
    score: float = Field(
        description="Probability of this span among all candidate spans of all windows."
    )


class QAResponse(_Out):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"answer": "两万千米", "start": 7, "end": 11, "score": 0.4387}]
        }
    )

    answer: str = Field(description="The answer span: exactly `context[start:end]`.")
    start: int = Field(
        description="Offset of the answer in `context` (inclusive), in Unicode code points "
        "(not UTF-16 units: JavaScript must index `Array.from(context)`)."
    )
    end: int = Field(description="Offset of the answer end in `context` (exclusive), likewise.")
    score: float = Field(
        description="Probability of this span among all candidate spans of all windows "
        "(softmax of start+end logits), 0 to 1; 0 with an empty answer."
    )
    answers: list[QASpan] | SkipJsonSchema[None] = _asked(
        "Only when the request gave `top_k`: up to `top_k` distinct spans, best "
        "first (`answers[0]` is `answer`); fewer when fewer are valid, none with an empty "
        "answer. Their scores are each span's own probability, so they add up to at most 1."
    )


# ---------------------------------------------------------------------------- batches
def _shape(v: Any) -> str:
    return "batch" if isinstance(v, dict) and "inputs" in v else "item"


_INPUTS_DOC = (
    "Several items; `outputs` answers them in the same order. At most NLPSERVE_MAX_BATCH_ITEMS."
)
_OUTPUTS_DOC = "One result per input, in input order."


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PosBatchRequest(BatchRequest):
    inputs: list[PosRequest] = Field(
        min_length=1, max_length=MAX_LIST_ITEMS, description=_INPUTS_DOC
    )


class PolarityBatchRequest(BatchRequest):
    inputs: list[PolarityRequest] = Field(
        min_length=1, max_length=MAX_LIST_ITEMS, description=_INPUTS_DOC
    )


class DetectBatchRequest(BatchRequest):
    inputs: list[DetectRequest] = Field(
        min_length=1, max_length=MAX_LIST_ITEMS, description=_INPUTS_DOC
    )


class QABatchRequest(BatchRequest):
    inputs: list[QARequest] = Field(
        min_length=1, max_length=MAX_LIST_ITEMS, description=_INPUTS_DOC
    )


class PosBatchResponse(BaseModel):
    outputs: list[PosResponse] = Field(description=_OUTPUTS_DOC)


class PolarityBatchResponse(BaseModel):
    outputs: list[PolarityResponse] = Field(description=_OUTPUTS_DOC)


class DetectBatchResponse(BaseModel):
    outputs: list[DetectResponse] = Field(description=_OUTPUTS_DOC)


class QABatchResponse(BaseModel):
    outputs: list[QAResponse] = Field(description=_OUTPUTS_DOC)


def _body(item: type[BaseModel], batch: type[BaseModel]) -> Any:
    return Annotated[
        Annotated[item, Tag("item")] | Annotated[batch, Tag("batch")],
        Discriminator(_shape),
    ]


PosBody = _body(PosRequest, PosBatchRequest)
PolarityBody = _body(PolarityRequest, PolarityBatchRequest)
DetectBody = _body(DetectRequest, DetectBatchRequest)
QABody = _body(QARequest, QABatchRequest)


# ---------------------------------------------------------------------------- ops
class ModelInfo(BaseModel):
    name: str = Field(description="Model name (the `model` query parameter picks it).")
    version: str = Field(description="The version this server loaded.")
    task: str = Field(description="`pos`, `polarity`, `detect` or `qa`: its endpoint.")
    architecture: str = Field(description="The network, as its manifest names it.")
    description: str = Field(description="What it was trained on and how (manifest).")
    labels: list[str] = Field(description="Its output labels (tags, classes).")
    max_length: int = Field(description="Most tokens the model reads per input (window).")
    buckets: list[int] = Field(description="Upper token-length edges of the batching buckets.")
    metrics: dict[str, float] = Field(
        description="Held-out evaluation metrics of the fp32 export (manifest)."
    )
    variant_metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The same metrics measured on each other variant's own file (e.g. int8), "
        "where the manifest records them.",
    )
    variants: list[str] = Field(description="The variants the version holds (fp32, int8...).")
    variant: str | None = Field(description="The variant this process runs (null: remote).")
    provider: str | None = Field(
        description="The execution provider the model ACTUALLY runs on (null: runs on remote "
        "workers)."
    )
    requested_provider: str | None = Field(
        None, description="The execution provider asked for (null: remote workers)."
    )
    fallback: bool = Field(False, description="True when it fell back from the wanted provider.")
    batches_at_once: int | None = Field(
        None,
        description="Batches of this model this process may run at the same time "
        "(NLPSERVE_INFERENCE_THREADS; null: runs on remote workers).",
    )
    intra_op_threads: int | None = Field(
        None,
        description="ONNX Runtime threads inside one batch (0: ORT's default, all cores; "
        "null: runs on remote workers).",
    )
    min_padding_efficiency: float | None = Field(
        None,
        description="The padding floor this model's batches are formed with "
        "(NLPSERVE_MIN_PADDING_EFFICIENCY, or its default for the provider and the token cost; "
        "null: runs on remote workers).",
    )
    token_cost_us: float | None = Field(
        None,
        description="Microseconds per padded token, measured at warm-up on CPU (null: not "
        "measured: CUDA, warm-up off, or remote workers).",
    )
    queue_depth: int = Field(
        0, description="Sequences of this model waiting in this process's queue now."
    )
    max_answer_length: int | None = Field(
        None,
        description="QA: the longest answer in model tokens when a request gives no "
        "`max_answer_length` (null for other tasks).",
    )


class ExplainLimits(BaseModel):
    max_evals_default: int = Field(description="SHAP evaluations when a request does not say.")
    max_evals_limit: int = Field(description="Most SHAP evaluations a request may ask for.")


class HealthResponse(BaseModel):
    status: str = Field(description="Always `ok`.", examples=["ok"])


class ReadyResponse(BaseModel):
    model_config = ConfigDict(
        # `model_workers`: pydantic < 2.10 reserves the whole `model_` prefix (a warning line
        # at every start, outside the log format)
        protected_namespaces=(),
        json_schema_extra={
            "examples": [{"status": "ready", "models": ["detector-en", "polarity-en"]}]
        },
    )

    status: str = Field(description="Always `ready` (not ready: 503).", examples=["ready"])
    models: list[str] = Field(description="The loaded models' names.")
    # Present in Redis mode only (never null): SkipJsonSchema keeps "null" out of the schema.
    workers: int | SkipJsonSchema[None] = Field(
        None, description="Redis mode only: live inference workers."
    )
    model_workers: dict[str, int] | SkipJsonSchema[None] = Field(
        None,
        description="Redis mode only: per model, the live workers that serve this replica's "
        "version and buckets of it.",
    )


class BatchLimits(BaseModel):
    max_items: int = Field(
        description='Most items one `{"inputs": [...]}` request may have: '
        "NLPSERVE_MAX_BATCH_ITEMS, or NLPSERVE_MAX_QUEUE_DEPTH where lower (each batch body's "
        "`maxItems` in /openapi.json)."
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    explain: ExplainLimits = Field(
        description="This server's limits for /v1/detect/explain and /v1/polarity/explain."
    )
    # What a client splitting many items needs, without reading /openapi.json (~200 KB)
    batch: BatchLimits = Field(
        description="This server's limit of a batch request to /v1/pos, /v1/polarity, "
        "/v1/detect and /v1/qa."
    )
