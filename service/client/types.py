"""The API's answers as plain dataclasses (the service's pydantic schemas need the server's
imports; a client needs only these). Fields are the JSON's, names and order included, so
``dataclasses.asdict(result)`` is the answer's body (a field the answer left out, asked for
by an option not given, is None there); fields a newer server adds are ignored.
What the answer's headers said (its request id, Server-Timing) is each result's ``meta``, an
attribute outside the fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def _known(cls: type[T], doc: Any) -> T:
    """``cls`` from the JSON object ``doc``: its own fields only (a newer server may send
    more); a missing field is a TypeError, as a wrong body is."""
    if not isinstance(doc, dict):
        raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(doc).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass(frozen=True)
class ResponseMeta:
    """Of the HTTP answer a result came in: its ``request_id`` (``X-Request-ID``: the one to
    quote in a report; every item of a batch shares its request's), ``status``, the
    ``attempts`` the call made, ``elapsed_s`` (the call's time in this client, retries and
    their waits included), ``server_timing`` (``Server-Timing``'s milliseconds per stage:
    ``tokenize``, ``queue``, ``inference``, and ``cache``, the response cache's lookup; empty
    where the answer has none, as for the operations) and ``cache`` (the cache's ``desc``:
    ``hit``, ``partial``, ``miss``; None without the response cache)."""

    request_id: str
    status: int
    attempts: int
    elapsed_s: float
    server_timing: dict[str, float] = field(default_factory=dict)
    cache: str | None = None


def server_timing(header: str | None) -> tuple[dict[str, float], str | None]:
    """``tokenize;dur=0.174, queue;dur=0.702`` -> ``({"tokenize": 0.174, ...}, None)``; a
    ``cache;desc=hit;dur=0.05`` entry's desc is the second item. An entry without a readable
    ``dur`` is left out."""
    stages: dict[str, float] = {}
    cache = None
    for entry in (header or "").split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip()] = value.strip().strip('"')
        if name == "cache":
            cache = values.get("desc") or None
        try:
            stages[name] = float(values["dur"])
        except (KeyError, ValueError):
            continue
    return stages, cache


class Answer:
    """Base of the results: ``meta`` is set on what a call returns (None on a result built
    otherwise). A plain class attribute, not a dataclass field: ``asdict`` and ``==`` see
    the answer's fields alone."""

    meta: ResponseMeta | None = None


@dataclass
class PosResult(Answer):
    tokens: list[str]
    tags: list[str]  # one Penn Treebank tag per token
    scores: list[float] | None = None  # each tag's probability: only when the call set scores


@dataclass
class PolarityResult(Answer):
    label: str  # positive or negative
    positive_probability: float
    truncated: bool


@dataclass
class DetectWindow:
    start: int  # the window's text: text[start:end], code points
    end: int
    label: str
    machine_probability: float  # of this window alone


@dataclass
class DetectResult(Answer):
    label: str  # human or machine
    machine_probability: float
    truncated: bool
    # Only when the call set windows=True (None otherwise: the body had no `windows`): every
    # window of the text read whole, in text order.
    windows: list[DetectWindow] | None = None

    def __post_init__(self) -> None:
        if self.windows is not None:  # from the JSON body: objects into DetectWindows
            self.windows = [
                w if isinstance(w, DetectWindow) else _known(DetectWindow, w) for w in self.windows
            ]


@dataclass
class QASpan:
    answer: str  # context[start:end]
    start: int  # code points
    end: int
    score: float  # this span's probability among every candidate span


@dataclass
class QAResult(Answer):
    answer: str  # context[start:end]
    start: int  # code points
    end: int
    score: float
    # Only when the call gave top_k (None otherwise: the body had no `answers`): up to top_k
    # distinct spans, best first.
    answers: list[QASpan] | None = None

    def __post_init__(self) -> None:
        if self.answers is not None:  # from the JSON body: objects into QASpans
            self.answers = [a if isinstance(a, QASpan) else _known(QASpan, a) for a in self.answers]


@dataclass
class Explanation(Answer):
    model: str
    version: str
    tokens: list[str]
    offsets: list[tuple[int, int]]  # [start, end) of each token in the text, code points
    values: list[float]  # SHAP value of each token, probability units of output_name
    base_value: float
    output: float
    output_name: str
    label: str
    max_evals: int
    evals: int
    truncated: bool
    cached: bool
    seconds: float

    @classmethod
    def from_json(cls, doc: Any) -> Explanation:
        exp = _known(cls, doc)
        exp.offsets = [(int(a), int(b)) for a, b in exp.offsets]
        return exp


@dataclass
class ModelInfo(Answer):
    """One ``GET /v1/models`` entry (docs/service.md, "Endpoints", says what each means)."""

    name: str
    version: str
    task: str
    architecture: str
    description: str
    labels: list[str]
    max_length: int
    buckets: list[int]
    metrics: dict[str, float]
    variant_metrics: dict[str, dict[str, float]]
    variants: list[str]
    variant: str | None
    provider: str | None
    requested_provider: str | None = None
    fallback: bool = False
    batches_at_once: int | None = None
    intra_op_threads: int | None = None
    min_padding_efficiency: float | None = None
    token_cost_us: float | None = None
    queue_depth: int = 0
    max_answer_length: int | None = None  # QA only


@dataclass
class ExplainLimits:
    max_evals_default: int
    max_evals_limit: int


@dataclass
class BatchLimits:
    max_items: int


@dataclass
class Models(Answer):
    models: list[ModelInfo]
    explain: ExplainLimits
    batch: BatchLimits | None = None  # None: a server older than the field

    @classmethod
    def from_json(cls, doc: Any) -> Models:
        batch = doc.get("batch") if isinstance(doc, dict) else None
        return cls(
            models=[_known(ModelInfo, m) for m in doc["models"]],
            explain=_known(ExplainLimits, doc["explain"]),
            batch=None if batch is None else _known(BatchLimits, batch),
        )


@dataclass
class Health(Answer):
    status: str


@dataclass
class Ready(Answer):
    status: str
    models: list[str]
    # Redis mode only: live workers, in all and per model (None in-process)
    workers: int | None = None
    model_workers: dict[str, int] | None = field(default=None)
