"""What every task does: validate and encode requests into WorkItems, decode outputs.

Tasks are protocol-agnostic (no HTTP here): the API calls :func:`run_requests`, and anything
else that needs predictions through the batched path (explanations) can too.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
from pydantic import BaseModel

from service.batching import WorkItem, bucket_edges, bucket_index
from service.config import Settings
from service.queueing.base import InferenceQueue
from service.repository import Manifest, ModelEntry

# Above this many characters in one request, tokenization moves to a thread so a huge
# request cannot stall the event loop; below it the thread hop costs more than it saves.
OFFLOAD_CHARS = 20_000

R = TypeVar("R")


# The limit a request of too many model sequences names (/v1's ``limit``: service.api.errors)
LIMIT_REQUEST_SEQUENCES = "max_request_sequences"
# Items tokenized at once before their windows (QA, detect with windows) are counted against
# the request's limit; each next chunk is twice as many (one tokenizers batch call for the
# usual request of a few)
FIRST_CHUNK = 8


class InputError(ValueError):
    """A request the model cannot take (too long, nothing to tag...): a 4xx, never a 500.
    ``limit``: the (name, value) of the limit that refused it, where one did."""

    def __init__(
        self,
        code: str,
        message: str,
        status_code: int = 422,
        limit: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.limit = limit


@dataclass
class Prepared:
    """One request item turned into model sequences, plus what decoding needs."""

    items: list[WorkItem]
    meta: dict[str, Any] = field(default_factory=dict)
    # For nlpserve_input_tokens / nlpserve_input_truncated_total: the item's tokens as
    # tokenized, and whether the model reads it cut short (silently, with truncated: true).
    tokens: int = 0
    truncated: bool = False


class Task(abc.ABC):
    """One model's request/response logic. Subclasses set ``task`` and implement
    :meth:`encode` (a whole request batch at once: tokenizers batch-encode fast) and
    :meth:`decode`."""

    task: ClassVar[str]
    # nlpserve_predictions_total's label values for this model (none: not counted)
    outcomes: Sequence[str] = ()

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        self.entry = entry
        self.manifest: Manifest = entry.manifest
        self.name = entry.manifest.name
        self.settings = settings
        self.buckets = bucket_edges(self.manifest, settings)
        self.max_length = self.manifest.max_length
        self._feature_names = [
            t.name for t in self.manifest.inputs if t.name != "lengths"
        ]  # lengths are derived at batch time

    # ------------------------------------------------------------------ subclass API
    @abc.abstractmethod
    def texts(self, request: BaseModel) -> list[tuple[str, str]]:
        """The user text fields of ``request``, as (field name, text), for the character
        limit and its message."""

    @abc.abstractmethod
    def encode(
        self, requests: Sequence[BaseModel], deadline: float, lane: str
    ) -> list[Prepared]: ...

    def encode_request(
        self, requests: Sequence[BaseModel], deadline: float, lane: str
    ) -> list[Prepared]:
        """:meth:`encode` for the items of one client request, which may be refused for the
        request's own limits before all are encoded (``nlpserve predict`` encodes lines
        that are each a request of their own with :meth:`encode`)."""
        return self.encode(requests, deadline, lane)

    @abc.abstractmethod
    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> BaseModel: ...

    def outcome(self, result: Any) -> tuple[str, float | None]:
        """One answered item's ``(label, confidence)`` (None: no confidence to observe), from
        ``decode``'s result or the V2 protocol's row: only for a task with ``outcomes``."""
        raise NotImplementedError(f"the {self.task!r} task counts no predictions")

    # ------------------------------------------------------------------ helpers
    def item(
        self, features: dict[str, np.ndarray], length: int, deadline: float, lane: str
    ) -> WorkItem:
        feats = {k: features[k] for k in self._feature_names}
        return WorkItem(
            model=self.name,
            bucket=bucket_index(length, self.buckets),
            length=length,
            features=feats,
            deadline=deadline,
            lane=lane,
        )

    def check_limits(self, requests: Sequence[BaseModel]) -> None:
        for i, req in enumerate(requests):
            for name, text in self.texts(req):
                self.check_length(text, where(i, len(requests)), name)

    def check_length(self, text: str, prefix: str = "", field: str = "text") -> None:
        """422 ``text_too_long`` for a client text over NLPSERVE_MAX_TEXT_CHARS."""
        limit = self.settings.max_text_chars
        if len(text) > limit:
            has = "have" if field == "tokens" else "has"  # tokens: counted joined by spaces
            raise InputError(
                "text_too_long",
                f"{prefix}{field} {has} {len(text)} characters; "
                f"the limit is {limit} (NLPSERVE_MAX_TEXT_CHARS)",
            )

    def prepare(
        self,
        requests: Sequence[BaseModel],
        deadline: float,
        lane: str,
        enforce_limits: bool = True,
    ) -> list[Prepared]:
        if enforce_limits:
            self.check_limits(requests)
        try:
            if enforce_limits:
                return self.encode_request(requests, deadline, lane)
            return self.encode(requests, deadline, lane)
        except InputError:
            raise
        except (TypeError, ValueError, UnicodeError) as e:
            # Tokenizers reject some odd inputs; that is the input's fault, not a server error.
            raise InputError("invalid_text", f"the text could not be tokenized: {e}") from e


def where(i: int, n: int) -> str:
    """Message prefix naming the batch item at fault (nothing for a single request)."""
    return f"inputs[{i}]: " if n > 1 else ""


def check_sequences(task: Task, n: int, partial: bool = False) -> None:
    """422 ``input_too_long`` for a request of ``n`` model sequences, more than one request
    may queue: it would never be admitted, so a 429 "retry later" would be a lie.
    ``partial``: ``n`` counts only some of its items (the rest were not encoded)."""
    s = task.settings
    if n > s.max_request_sequences or n > s.max_queue_depth:
        limit, setting = min(
            (s.max_request_sequences, "NLPSERVE_MAX_REQUEST_SEQUENCES"),
            (s.max_queue_depth, "NLPSERVE_MAX_QUEUE_DEPTH"),
        )
        what = {
            "qa": "QA windows of its contexts",
            "detect": "one per item, or per window of an item with windows",
        }.get(task.task, "one per item")
        raise InputError(
            "input_too_long",
            f"this request needs {'at least ' if partial else ''}{n} model sequences ({what}); "
            "one request may need "
            f"at most {limit} ({setting}): send fewer or shorter texts",
            limit=(LIMIT_REQUEST_SEQUENCES, limit),
        )


T = TypeVar("T")


def encode_in_chunks(
    task: Task,
    requests: Sequence[Any],
    encode: Callable[[Sequence[Any]], list[T]],
    sequences: Callable[[T], int],
) -> list[T]:
    """``encode`` of ``requests`` in chunks of 8, 16, 32... items, refused
    (:func:`check_sequences`) as soon as those so far need more model sequences (each
    encoded item's ``sequences``) than a request may: the rest are never encoded (QA's and
    detect's windows, where a few long texts decide the 422 of a request of many)."""
    out: list[T] = []
    size, n = FIRST_CHUNK, 0
    while len(out) < len(requests):
        chunk = encode(requests[len(out) : len(out) + size])
        n += sum(sequences(e) for e in chunk)
        check_sequences(task, n, partial=len(out) + len(chunk) < len(requests))
        out += chunk
        size *= 2
    return out


Outputs = list[dict[str, np.ndarray]]  # one request item's sequences' model outputs


@overload
async def run_requests(
    task: Task,
    queue: InferenceQueue,
    requests: Sequence[BaseModel],
    deadline: float,
    lane: str = ...,
    enforce_limits: bool = ...,
    timing: dict[str, float] | None = ...,
    decode: None = ...,
    read: Callable[[list[Prepared]], None] | None = ...,
) -> list[BaseModel]: ...


@overload
async def run_requests(
    task: Task,
    queue: InferenceQueue,
    requests: Sequence[BaseModel],
    deadline: float,
    lane: str = ...,
    enforce_limits: bool = ...,
    timing: dict[str, float] | None = ...,
    *,
    decode: Callable[[Prepared, Outputs], R],
    read: Callable[[list[Prepared]], None] | None = ...,
) -> list[R]: ...


async def run_requests(
    task: Task,
    queue: InferenceQueue,
    requests: Sequence[BaseModel],
    deadline: float,
    lane: str = "predict",
    enforce_limits: bool = True,
    timing: dict[str, float] | None = None,
    decode: Callable[[Prepared, Outputs], Any] | None = None,
    read: Callable[[list[Prepared]], None] | None = None,
) -> list[Any]:
    """Encode ``requests``, submit all their sequences at once, decode in request order.

    ``enforce_limits=False`` skips the client-facing character limit, for texts the service
    builds itself (explanations' masked variants) from a client text already checked.
    ``timing`` receives where the request's time went, in seconds: ``tokenize``,
    ``inference`` (its slowest sequence's batch) and ``queue`` (the rest of the wait for the
    model: queued, waiting for company, handed between threads or processes).
    ``decode`` replaces ``task.decode`` where a caller needs more of the outputs than the
    task's response holds (the V2 protocol: every class's probability).
    ``read`` receives the items once all are decoded (the input series: a request refused
    or failed on the way records nothing).
    """
    # Refused for load (queue full, or its deadline nearer than the work queued ahead) before
    # the tokenizer runs: every request of an overload but those admitted ends here.
    if (refused := queue.refuse(task.name, 1, deadline, lane)) is not None:
        raise refused
    t0 = time.perf_counter()
    chars = sum(len(t) for r in requests for _, t in task.texts(r))
    if chars > OFFLOAD_CHARS:
        prepared = await asyncio.to_thread(task.prepare, requests, deadline, lane, enforce_limits)
    else:
        prepared = task.prepare(requests, deadline, lane, enforce_limits)
    flat = [it for p in prepared for it in p.items]
    check_sequences(task, len(flat))
    t1 = time.perf_counter()
    outputs = await queue.submit_many(flat)
    if timing is not None:
        waited = time.perf_counter() - t1
        run = max((it.run_s for it in flat), default=0.0)
        timing.update(tokenize=t1 - t0, queue=max(0.0, waited - run), inference=run)
    decode = decode or task.decode
    results = []
    k = 0
    for p in prepared:
        n = len(p.items)
        results.append(decode(p, outputs[k : k + n]))
        k += n
    if read is not None:
        read(prepared)
    return results
