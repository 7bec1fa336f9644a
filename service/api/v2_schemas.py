"""Bodies of the Open Inference Protocol (KServe "V2") REST endpoints (routes/v2.py).

As the protocol writes them (kserve/open-inference-protocol, ``inference_rest.md``), with
unknown fields refused as everywhere in this API: a typo ("input") must not pass.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from service.api.schemas import valid_unicode

# Bounds that no valid request comes near (a model takes at most two inputs; texts are a
# tensor's elements, not tensors), so that a 1 MB body of tiny tensors is refused before
# each is validated.
MAX_TENSORS = 16
MAX_RANK = 8
UINT64_MAX = 2**64 - 1

Dimension = Annotated[int, Field(strict=True, ge=0, le=UINT64_MAX)]
Parameters = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V2ErrorResponse(BaseModel):
    """Every 4xx/5xx answer under /v2 (the protocol's error object)."""

    error: str = Field(
        description="What went wrong (the same message /v1 gives for the same cause).",
        examples=["input 'text' has datatype 'FP32'; text inputs are BYTES (UTF-8 strings)"],
    )


# ---------------------------------------------------------------------------- inference
class V2RequestInput(_Strict):
    name: str = Field(description="The input's name, as the model's metadata lists it.")
    shape: list[Dimension] = Field(
        max_length=MAX_RANK, description="`[N]`: N texts (one request item each)."
    )
    datatype: str = Field(description="`BYTES`: texts are UTF-8 strings.", examples=["BYTES"])
    parameters: Parameters | None = Field(
        None,
        description="Accepted and not read, but `binary_data_size` (the binary data "
        "extension, not supported: 400).",
    )
    data: list[Any] = Field(
        description="The N texts as JSON strings, flat or nested (row-major); their count "
        "must be the shape's."
    )


class V2RequestOutput(_Strict):
    name: str = Field(description="An output's name, as the model's metadata lists it.")
    parameters: Parameters | None = Field(
        None,
        description="Accepted and not read (`binary_data`: outputs are always JSON; "
        "`classification`: refused, not supported).",
    )


class V2InferenceRequest(_Strict):
    # echoed in the answer: a lone surrogate could not be written in it (it was a 500)
    id: Annotated[str, AfterValidator(valid_unicode)] | None = Field(
        None, description="Echoed in the response."
    )
    parameters: Parameters | None = Field(
        None, description="Accepted and not read (e.g. tritonclient's `binary_data_output`)."
    )
    inputs: list[V2RequestInput] = Field(
        max_length=MAX_TENSORS, description="One tensor per input the model takes."
    )
    outputs: list[V2RequestOutput] | None = Field(
        None,
        max_length=MAX_TENSORS,
        description="The outputs to return, in this order (default, or empty: all of them).",
    )


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int] = Field(description="`[N]`, or `[N, C]` for `probabilities`.")
    datatype: str = Field(description="`BYTES`, `FP32`, `INT64` or `BOOL`.")
    data: list[Any] = Field(description="The values, flat (row-major).")


class V2InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # model_name: the protocol's field

    model_name: str
    model_version: str
    id: str | SkipJsonSchema[None] = Field(
        None, description="The request's `id`, when it gave one."
    )
    outputs: list[V2ResponseOutput]


# ---------------------------------------------------------------------------- metadata
class V2ServerMetadata(BaseModel):
    name: str = Field(examples=["nlpserve"])
    version: str = Field(description="nlpserve's version.")
    extensions: list[str] = Field(description="None: only the protocol's core is served.")


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (N, the number of items).")
    parameters: Parameters | SkipJsonSchema[None] = Field(
        None, description="`probabilities` only: `labels`, the order of its C columns."
    )


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The one version this server loaded.")
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2Live(BaseModel):
    live: bool = Field(description="Always true (the process answers).")


class V2Ready(BaseModel):
    ready: bool = Field(description="Always true (not ready: 503).")


class V2ModelReady(BaseModel):
    name: str
    ready: bool = Field(description="Always true (not ready: 503).")
