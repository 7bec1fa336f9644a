"""The V2 protocol's tensors to and from the tasks' own requests and results.

No task logic here: an input tensor of N texts becomes N of the task's request items (the
/v1 items, validated by the same models), and each item's result (the task's own ``decode``)
becomes one row of every output tensor. Input names are the /v1 fields (``text``;
``question`` and ``context``), each ``BYTES`` of shape ``[N]``, as MLServer's HuggingFace
runtime takes text. Outputs:

* detect, polarity: ``label`` (BYTES), ``probability`` (FP32, the label's), ``probabilities``
  (FP32 ``[N, C]``, in the order of the metadata's ``parameters.labels``), ``truncated`` (BOOL);
* pos: ``tokens`` and ``tags`` (BYTES), each element a JSON list of strings, aligned;
* qa: ``answer`` (BYTES), ``score`` (FP32), ``start`` and ``end`` (INT64, character offsets).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
from pydantic import BaseModel, ValidationError

from service.api.deps import clip_name
from service.api.errors import BINARY_UNSUPPORTED, ApiError, too_many_items, validation_error
from service.api.schemas import DetectRequest, PolarityRequest, PosRequest, QARequest
from service.api.v2_schemas import V2InferenceRequest, V2ModelMetadata, V2TensorMetadata
from service.tasks.base import InputError, Outputs, Prepared, Task

PLATFORM = "onnxruntime_onnx"
TEXT_DATATYPE = "BYTES"

Row = dict[str, Any]  # one request item's value of each output


class _Classifier(Protocol):
    labels: list[str]

    def probabilities(self, outputs: Outputs) -> np.ndarray: ...


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    columns: bool = False  # [N, C]: a row of C values per item (C: the model's labels)


@dataclass(frozen=True)
class TaskTensors:
    """What one model takes and gives as V2 tensors, and how its results become rows."""

    model: str
    inputs: tuple[str, ...]  # BYTES [N] each, the request item's fields of the same names
    outputs: tuple[Output, ...]
    request: type[BaseModel]
    decode: Callable[[Prepared, Outputs], Row]
    labels: tuple[str, ...] = ()

    def takes(self) -> str:
        return " and ".join(repr(n) for n in self.inputs) + f" ({TEXT_DATATYPE}, shape [N])"

    def gives(self) -> str:
        return ", ".join(repr(o.name) for o in self.outputs)


_CLASSIFY_OUTPUTS = (
    Output("label", "BYTES"),
    Output("probability", "FP32"),
    Output("probabilities", "FP32", columns=True),
    Output("truncated", "BOOL"),
)


def tensors_of(task: Task) -> TaskTensors:
    """The V2 view of ``task``'s model."""
    if task.task in ("detect", "polarity"):
        classifier = cast(_Classifier, task)
        labels = classifier.labels

        def classify(prepared: Prepared, outputs: Outputs) -> Row:
            # the label is the most probable one, as the task's own decode picks it; the
            # probabilities are computed once (decode would compute them again)
            probs = classifier.probabilities(outputs)
            k = int(np.argmax(probs))
            return {
                "label": labels[k],
                "probability": float(probs[k]),
                "probabilities": probs.tolist(),
                "truncated": prepared.truncated,
            }

        request = DetectRequest if task.task == "detect" else PolarityRequest
        return TaskTensors(
            task.name, ("text",), _CLASSIFY_OUTPUTS, request, classify, tuple(labels)
        )
    if task.task == "pos":

        def tag(prepared: Prepared, outputs: Outputs) -> Row:
            result = task.decode(prepared, outputs).model_dump()
            return {k: json.dumps(result[k], ensure_ascii=False) for k in ("tokens", "tags")}

        tagged = (Output("tokens", "BYTES"), Output("tags", "BYTES"))
        return TaskTensors(task.name, ("text",), tagged, PosRequest, tag)
    if task.task == "qa":

        def answer(prepared: Prepared, outputs: Outputs) -> Row:
            return task.decode(prepared, outputs).model_dump()

        answered = (
            Output("answer", "BYTES"),
            Output("score", "FP32"),
            Output("start", "INT64"),
            Output("end", "INT64"),
        )
        return TaskTensors(task.name, ("question", "context"), answered, QARequest, answer)
    raise AssertionError(f"no V2 tensors for the {task.task!r} task")  # every task has them


def metadata(task: Task) -> V2ModelMetadata:
    tt = tensors_of(task)
    return V2ModelMetadata(
        name=task.name,
        versions=[task.manifest.version],
        platform=PLATFORM,
        inputs=[V2TensorMetadata(name=n, datatype=TEXT_DATATYPE, shape=[-1]) for n in tt.inputs],
        outputs=[
            V2TensorMetadata(
                name=o.name,
                datatype=o.datatype,
                shape=[-1, len(tt.labels)] if o.columns else [-1],
                parameters={"labels": list(tt.labels)} if o.columns else None,
            )
            for o in tt.outputs
        ],
    )


def find_model(tasks: Mapping[str, Task], name: str, version: str | None = None) -> Task:
    """The model ``name`` (at ``version``, when one is asked for), else a 404."""
    task = tasks.get(name)
    if task is None:
        raise ApiError(
            404,
            "model_not_found",
            f"no model named {clip_name(name)} is loaded "
            f"(loaded: {', '.join(sorted(tasks)) or 'none'})",
        )
    if version is not None and version != task.manifest.version:
        raise ApiError(
            404,
            "model_not_found",
            f"model {name!r} is not served at version {clip_name(version)}: this server "
            f"serves version {task.manifest.version!r}",
        )
    return task


# ---------------------------------------------------------------------------- requests
def invalid(message: str) -> ApiError:
    """A V2 envelope that is not what the model takes: 400, as the protocol answers."""
    return ApiError(400, "invalid_tensor", message)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _flatten(data: list[Any], name: str) -> list[str]:
    """The strings of ``data``, flat or nested, in row-major order (iterative: any depth)."""
    out: list[str] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise invalid(
                    f"input {name!r}: element {len(out)} is {_kind(value)}, not a string "
                    f"({TEXT_DATATYPE} data are JSON strings)"
                )
            out.append(value)
        else:
            stack.pop()
    return out


def read_items(
    tt: TaskTensors, body: V2InferenceRequest, max_items: int, task: Task
) -> list[BaseModel]:
    """The task's request items of ``body``'s input tensors (item i: element i of each)."""
    given = {}
    for tensor in body.inputs:
        if tensor.name not in tt.inputs:
            raise invalid(f"unknown input {clip_name(tensor.name)}; {tt.model} takes {tt.takes()}")
        if tensor.name in given:
            raise invalid(f"input {tensor.name!r} is given twice")
        given[tensor.name] = tensor
    for name in tt.inputs:
        if name not in given:
            raise invalid(f"missing input {name!r}; {tt.model} takes {tt.takes()}")
    n = None
    for name in tt.inputs:
        tensor = given[name]
        if "binary_data_size" in (tensor.parameters or {}):
            raise invalid(BINARY_UNSUPPORTED)
        if tensor.datatype != TEXT_DATATYPE:
            raise invalid(
                f"input {name!r} has datatype {clip_name(tensor.datatype)}; text inputs are "
                f"{TEXT_DATATYPE} (UTF-8 strings in JSON)"
            )
        if len(tensor.shape) != 1:
            raise invalid(
                f"input {name!r} has shape {tensor.shape}; text inputs have shape [N]: one "
                "dimension, N texts"
            )
        if n is not None and tensor.shape[0] != n:
            raise invalid(
                f"inputs {tt.inputs[0]!r} and {name!r} have shapes [{n}] and "
                f"{tensor.shape}; they must hold the same number of texts"
            )
        n = tensor.shape[0]
    assert n is not None  # every task takes an input
    columns = {}
    for name in tt.inputs:
        columns[name] = _flatten(given[name].data, name)
        if len(columns[name]) != n:
            raise invalid(f"input {name!r} has shape [{n}] but {len(columns[name])} data elements")
    # what /v1 refuses of a batch too, with its status
    if n == 0:
        raise ApiError(
            422, "empty_inputs", f"input {tt.inputs[0]!r} holds no text (shape [0]): send one"
        )
    if n > max_items:
        raise too_many_items(n, max_items, noun=f"texts (shape [{n}])")
    items = []
    for i in range(n):
        fields = {name: columns[name][i] for name in tt.inputs}
        try:
            items.append(tt.request.model_validate(fields))
        except ValidationError as e:
            errors = e.errors()
            status, code, _ = validation_error([dict(err) for err in errors])
            where = [f"{err['loc'][0]}[{i}]" if err["loc"] else f"item {i}" for err in errors]
            messages = [f"{w}: {err['msg']}" for w, err in zip(where, errors, strict=True)]
            raise ApiError(status, code, "; ".join(messages)) from None
        for name, text in fields.items():  # /v1's character limit, named the V2 way
            task.check_length(text, field=f"{name}[{i}]")
    return items


_ITEM_PREFIX = re.compile(r"^inputs\[(\d+)\]: ")


def renamed(error: InputError, tt: TaskTensors) -> InputError:
    """A task's error about item i ("inputs[i]: ...", /v1's batch field) named as element i
    of the input tensor ("text[i]: ...")."""
    if len(tt.inputs) != 1:
        return error
    message = _ITEM_PREFIX.sub(rf"{tt.inputs[0]}[\1]: ", error.message)
    return InputError(error.code, message, error.status_code, error.limit)


def chosen_outputs(tt: TaskTensors, body: V2InferenceRequest) -> list[Output]:
    """The outputs ``body`` asks for, in its order (none named: all of them)."""
    if not body.outputs:
        return list(tt.outputs)
    by_name = {o.name: o for o in tt.outputs}
    chosen: list[Output] = []
    for asked in body.outputs:
        output = by_name.get(asked.name)
        if output is None:
            raise invalid(f"unknown output {clip_name(asked.name)}; {tt.model} gives {tt.gives()}")
        if output in chosen:
            raise invalid(f"output {asked.name!r} is requested twice")
        if "classification" in (asked.parameters or {}):
            raise invalid(
                "the classification extension is not supported: read 'probabilities' (its "
                "columns are the labels of the model's metadata)"
            )
        chosen.append(output)
    return chosen


def output_tensors(chosen: list[Output], rows: list[Row]) -> list[dict[str, Any]]:
    """The chosen outputs of ``rows`` as V2 tensors, data flat (row-major)."""
    n = len(rows)
    tensors = []
    for o in chosen:
        if o.columns:
            data = [v for row in rows for v in row[o.name]]
            shape = [n, len(rows[0][o.name])]
        else:
            data = [row[o.name] for row in rows]
            shape = [n]
        tensors.append({"name": o.name, "datatype": o.datatype, "shape": shape, "data": data})
    return tensors


# How a protocol runs the items of an inference (REST: with its HTTP request's deadline and
# disconnect; gRPC: with its call's): rows, and where their time went.
RunItems = Callable[
    [list[BaseModel], Callable[[Prepared, Outputs], Row]],
    Awaitable[tuple[list[Row], dict[str, float]]],
]


async def infer(
    task: Task, body: V2InferenceRequest, max_items: int, run: RunItems
) -> tuple[dict[str, Any], dict[str, float]]:
    """An inference request to ``task``, over any transport: its answer (``model_name``,
    ``model_version``, ``id`` if given, ``outputs`` as :func:`output_tensors` writes them)
    and ``run``'s timing. Refusals are raised (ApiError, InputError, QueueError)."""
    tt = tensors_of(task)
    chosen = chosen_outputs(tt, body)  # refused before any work
    items = read_items(tt, body, max_items, task)
    try:
        rows, timing = await run(items, tt.decode)
    except InputError as e:
        raise renamed(e, tt) from None
    payload: dict[str, Any] = {"model_name": task.name, "model_version": task.manifest.version}
    if body.id is not None:
        payload["id"] = body.id
    payload["outputs"] = output_tensors(chosen, rows)
    return payload, timing
