"""The API's answers as plain dataclasses (the service's pydantic schemas need the server's
imports; a client needs only these). Fields are the JSON's, names and order included, so
``dataclasses.asdict(result)`` is the answer's body; fields a newer server adds are ignored."""

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


@dataclass
class PosResult:
    tokens: list[str]
    tags: list[str]  # one Penn Treebank tag per token


@dataclass
class PolarityResult:
    label: str  # positive or negative
    positive_probability: float
    truncated: bool


@dataclass
class DetectResult:
    label: str  # human or machine
    machine_probability: float
    truncated: bool


@dataclass
class QAResult:
    answer: str  # context[start:end]
    start: int  # code points
    end: int
    score: float


@dataclass
class Explanation:
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
class ModelInfo:
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


@dataclass
class ExplainLimits:
    max_evals_default: int
    max_evals_limit: int


@dataclass
class Models:
    models: list[ModelInfo]
    explain: ExplainLimits

    @classmethod
    def from_json(cls, doc: Any) -> Models:
        return cls(
            models=[_known(ModelInfo, m) for m in doc["models"]],
            explain=_known(ExplainLimits, doc["explain"]),
        )


@dataclass
class Health:
    status: str


@dataclass
class Ready:
    status: str
    models: list[str]
    # Redis mode only: live workers, in all and per model (None in-process)
    workers: int | None = None
    model_workers: dict[str, int] | None = field(default=None)
