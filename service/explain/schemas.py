"""Request and response bodies of the explanation endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.api.schemas import Text

if TYPE_CHECKING:
    from service.explain.engine import Explanation

# [start, end): pydantic writes a tuple as "prefixItems", which OpenAPI 3.0 tools and
# schemathesis' response validation read as the draft-4 "items" list, an invalid schema; two
# integers are as well said with plain "items".
Span = Annotated[
    tuple[int, int],
    WithJsonSchema({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}),
]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(
        description="The text to explain. Only the tokens the model reads are explained "
        "(a longer text is cut at the model's max length; `truncated` says so).",
    )
    max_evals: int | None = Field(
        None,
        ge=4,
        strict=True,  # true was read as 1 and "300" as 300
        description="SHAP model evaluations to spend (more: finer attributions, slower). "
        "Default NLPSERVE_EXPLAIN_MAX_EVALS_DEFAULT; at most NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT.",
        examples=[300],
    )


class ExplainResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "polarity-en", "version": "1",
                    "tokens": ["A", "charming", ",", "funny", "and", "moving", "film", "."],
                    "offsets": [[0, 1], [2, 10], [10, 11], [12, 17], [18, 21], [22, 28],
                                [29, 33], [33, 34]],
                    "values": [0.027, 0.2244, 0.0197, 0.0935, 0.0288, 0.1448, 0.0453, -0.0044],
                    "base_value": 0.4135, "output": 0.9925,
                    "output_name": "positive_probability", "label": "positive",
                    "max_evals": 300, "evals": 52, "truncated": False, "cached": False,
                    "seconds": 0.02,
                }
            ]
        }
    )  # fmt: skip

    model: str = Field(description="The model explained.")
    version: str = Field(description="Its version (part of the cache key).")
    tokens: list[str] = Field(description="The features: the text's tokens, as they appear in it.")
    offsets: list[Span] = Field(
        description="[start, end) of each token in `text`, in Unicode code points (not UTF-16 "
        "units: JavaScript must index `Array.from(text)`)."
    )
    values: list[float] = Field(
        description="SHAP value of each token, in PROBABILITY units of `output_name`: "
        "positive pushes towards the explained label, negative away from it."
    )
    base_value: float = Field(description="The output with every token masked.")
    output: float = Field(
        description="The model's output for the text (== base_value + sum(values), to 1e-3)."
    )
    output_name: str = Field(
        description="What is explained: `machine_probability` or `positive_probability`."
    )
    label: str = Field(description="The predicted label.")
    max_evals: int = Field(description="The evaluation budget used.")
    evals: int = Field(
        description="Model evaluations the explanation took (SHAP's partition explainer may "
        "go one past `max_evals`)."
    )
    truncated: bool = Field(description="True when the text's tail past max length was ignored.")
    cached: bool = Field(description="True when served from the explanation cache.")
    seconds: float = Field(description="Time spent computing it (when it was computed).")

    @classmethod
    def of(cls, exp: Explanation) -> ExplainResponse:
        """The body of an explanation (the endpoints' and ``nlpserve predict --explain``'s)."""
        return cls(
            model=exp.model,
            version=exp.version,
            tokens=exp.tokens,
            offsets=exp.offsets,
            values=exp.values,
            base_value=exp.base_value,
            output=exp.output,
            output_name=exp.output_name,
            label=exp.label,
            max_evals=exp.max_evals,
            evals=exp.evals,
            truncated=exp.truncated,
            cached=exp.cached,
            seconds=exp.seconds,
        )
