"""What :class:`~service.client.Client` and :class:`~service.client.AsyncClient` share: each
endpoint's request and how its answer is read (:class:`Call`), and one call's attempts
(:class:`Attempts`: headers, timeouts, the retry decisions). Only sending and sleeping
differ between the two."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote

import httpx

from service import __version__
from service.client.errors import (
    DeadlineExceeded,
    IncompleteBatch,
    NlpserveError,
    ServerError,
    TransportError,
    error_for,
)
from service.client.retry import RetryPolicy
from service.client.types import (
    Answer,
    DetectResult,
    Explanation,
    Health,
    ModelInfo,
    Models,
    PolarityResult,
    PosResult,
    QAResult,
    Ready,
    ResponseMeta,
    _known,
    server_timing,
)

T = TypeVar("T")
R = TypeVar("R")

# The service's headers (service/api/deps.py, service/api/auth.py, docs/deploy.md).
REQUEST_ID_HEADER = "X-Request-ID"
DEADLINE_HEADER = "X-Deadline-Ms"
PRIORITY_HEADER = "X-Priority"
API_KEY_HEADER = "X-API-Key"  # checked before Authorization: a gateway may use that one
USER_AGENT = f"nlpserve-client/{__version__}"
# An attempt under a deadline waits this much past it: the server's own 504 (which says
# what happened) arrives rather than the client's timeout.
DEADLINE_GRACE_S = 1.0
# Probes report on now: one attempt.
NO_RETRY = RetryPolicy(retries=0)


class ClientOptions(TypedDict, total=False):
    """A client's settings (:class:`~service.client.Client` says what each does)."""

    api_key: str | None
    timeout: float
    retry: RetryPolicy | None
    priority: str | None
    deadline_ms: float | None
    headers: dict[str, str] | None


class CallOptions(TypedDict, total=False):
    """Per call: ``request_id`` (default: a new one per call, the same for its retries),
    ``deadline_ms`` (overrides the client's) and, for predictions, ``priority``
    (``interactive`` or ``batch``; overrides the client's)."""

    request_id: str
    deadline_ms: float | None
    priority: str | None


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    body: Any = None
    params: dict[str, str] | None = None
    prediction: bool = False  # sends X-Priority
    probe: bool = False  # no retries, no deadline


def _model(model: str | None) -> dict[str, str] | None:
    return None if model is None else {"model": model}


def _one(cls: type[T]) -> Callable[[Any], T]:
    return lambda doc: _known(cls, doc)


def _many(cls: type[T]) -> Callable[[Any], list[T]]:
    return lambda doc: [_known(cls, d) for d in doc["outputs"]]


def _batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"inputs": list(items)}


def _pos_item(item: str | Sequence[str], scores: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"text": item} if isinstance(item, str) else {"tokens": list(item)}
    if scores:
        body["scores"] = True
    return body


def pos(
    text: str | None, tokens: Sequence[str] | None, model: str | None, scores: bool = False
) -> Call[PosResult]:
    if (text is None) == (tokens is None):
        raise ValueError("give exactly one of text or tokens")
    body = _pos_item(text if text is not None else tokens or (), scores)
    return Call("POST", "/v1/pos", _one(PosResult), body, _model(model), prediction=True)


def pos_batch(
    items: Sequence[str | Sequence[str]], model: str | None, scores: bool = False
) -> Call[list[PosResult]]:
    body = _batch([_pos_item(i, scores) for i in items])
    return Call("POST", "/v1/pos", _many(PosResult), body, _model(model), prediction=True)


def polarity(text: str, model: str | None) -> Call[PolarityResult]:
    return Call("POST", "/v1/polarity", _one(PolarityResult), {"text": text}, _model(model), True)


def polarity_batch(texts: Sequence[str], model: str | None) -> Call[list[PolarityResult]]:
    body = _batch([{"text": t} for t in texts])
    return Call("POST", "/v1/polarity", _many(PolarityResult), body, _model(model), prediction=True)


def _detect_item(text: str, windows: bool) -> dict[str, Any]:
    return {"text": text, "windows": True} if windows else {"text": text}


def detect(text: str, model: str | None, windows: bool = False) -> Call[DetectResult]:
    body = _detect_item(text, windows)
    return Call("POST", "/v1/detect", _one(DetectResult), body, _model(model), prediction=True)


def detect_batch(
    texts: Sequence[str], model: str | None, windows: bool = False
) -> Call[list[DetectResult]]:
    body = _batch([_detect_item(t, windows) for t in texts])
    return Call("POST", "/v1/detect", _many(DetectResult), body, _model(model), prediction=True)


def _qa_item(
    question: str, context: str, top_k: int | None, max_answer_length: int | None
) -> dict[str, Any]:
    item: dict[str, Any] = {"question": question, "context": context}
    if top_k is not None:
        item["top_k"] = top_k
    if max_answer_length is not None:
        item["max_answer_length"] = max_answer_length
    return item


def qa(
    question: str,
    context: str,
    model: str | None,
    top_k: int | None = None,
    max_answer_length: int | None = None,
) -> Call[QAResult]:
    body = _qa_item(question, context, top_k, max_answer_length)
    return Call("POST", "/v1/qa", _one(QAResult), body, _model(model), prediction=True)


def qa_batch(
    pairs: Sequence[tuple[str, str]],
    model: str | None,
    top_k: int | None = None,
    max_answer_length: int | None = None,
) -> Call[list[QAResult]]:
    body = _batch([_qa_item(q, c, top_k, max_answer_length) for q, c in pairs])
    return Call("POST", "/v1/qa", _many(QAResult), body, _model(model), prediction=True)


def explain(task: str, text: str, max_evals: int | None, model: str | None) -> Call[Explanation]:
    body: dict[str, Any] = {"text": text}
    if max_evals is not None:
        body["max_evals"] = max_evals
    return Call("POST", f"/v1/{task}/explain", Explanation.from_json, body, _model(model))


def models() -> Call[Models]:
    return Call("GET", "/v1/models", Models.from_json)


def model_info(name: str) -> Call[ModelInfo]:
    # quoted: a name is one path segment, whatever it holds
    return Call("GET", f"/v1/models/{quote(name, safe='')}", _one(ModelInfo))


def healthz() -> Call[Health]:
    return Call("GET", "/healthz", _one(Health), probe=True)


def readyz() -> Call[Ready]:
    return Call("GET", "/readyz", _one(Ready), probe=True)


def batch_limit() -> Call[int | None]:
    """The batch limit this server announces in ``GET /v1/models``: ``batch.max_items``
    (NLPSERVE_MAX_BATCH_ITEMS, or less where the queue holds fewer), of every batch path; None
    from a server older than the field (:func:`openapi` then says it)."""
    return Call("GET", "/v1/models", _max_items)


def _max_items(doc: Any) -> int | None:
    batch = doc.get("batch") if isinstance(doc, dict) else None
    limit = batch.get("max_items") if isinstance(batch, dict) else None
    # bool is an int to Python, never a limit
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1 else None


def openapi() -> Call[dict[str, int]]:
    """The batch limits this server announces in its OpenAPI document (~200 KB: read only
    where ``/v1/models`` lacks them): the ``maxItems`` of each ``POST /v1/<task>`` body's
    ``inputs``, by path."""
    return Call("GET", "/openapi.json", batch_limits)


def batch_limits(doc: Any) -> dict[str, int]:
    try:
        return _batch_limits(doc)
    except AttributeError as e:  # a part not an object: an answer this client cannot read
        raise TypeError(e) from None


def _batch_limits(doc: Any) -> dict[str, int]:
    schemas = doc.get("components", {}).get("schemas", {})
    limits = {}
    for path, item in doc["paths"].items():
        body = item.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        found = [n for s in _schemas(schema, schemas, set()) if (n := _max_inputs(s)) is not None]
        if found:
            limits[path] = min(found)
    return limits


def _schemas(node: Any, schemas: dict[str, Any], seen: set[str]) -> list[dict[str, Any]]:
    """``node`` and the schemas it names (``$ref``, ``anyOf``...), each once."""
    if isinstance(node, list):
        return [s for n in node for s in _schemas(n, schemas, seen)]
    if not isinstance(node, dict):
        return []
    if isinstance(ref := node.get("$ref"), str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _schemas(schemas.get(name), schemas, seen)
    found = [node]
    for key in ("anyOf", "oneOf", "allOf"):
        found += _schemas(node.get(key), schemas, seen)
    return found


def _max_inputs(schema: dict[str, Any]) -> int | None:
    limit = schema.get("properties", {}).get("inputs", {}).get("maxItems")
    return limit if isinstance(limit, int) and limit >= 1 else None


# The limits of a 422 too_many_items's ``limit`` that count items in one request (the API's
# names: service/api/errors.py): the most a request may hold.
_IN_FLIGHT_LIMIT = "max_in_flight"
_ITEM_LIMITS = frozenset({"max_batch_items", _IN_FLIGHT_LIMIT, "burst"})
# The limit of a 422 input_too_long over the model sequences (QA windows, detect's windows) of
# a request as a whole: its value counts sequences, not items, and what fewer items need
# depends on their texts
_SEQUENCES_LIMIT = "max_request_sequences"

# What a server without ``limit`` in its errors (before it came) says of the limit in the
# words of its 422 too_many_items (service/api/errors.py, client_quota.py, client_rate.py;
# tests/api/test_python_client.py checks them on a live server): read only without the field,
# as a rolling upgrade may put such a server behind the same address as a newer one.
_IN_FLIGHT = re.compile(r"at most (\d+) in flight")
_LIMITS = (_IN_FLIGHT, re.compile(r"at most (\d+) at once"), re.compile(r"the limit is (\d+)"))


def _over_sequences(error: NlpserveError) -> bool:
    """A 422 ``input_too_long`` for the model sequences of the request as a whole (its
    ``limit`` names them); an ``input_too_long`` without it is one text's, which no split fixes."""
    limit = error.limit
    return (
        (error.status, error.code) == (422, "input_too_long")
        and limit is not None
        and limit.name == _SEQUENCES_LIMIT
    )


@dataclass
class PathLimits:
    """What a client learned of one path's limit in its ``*_many`` calls: the most items one
    request may have, and whether a request of that size has been accepted."""

    size: int | None  # None: unknown (none announced), till a request is refused
    settled: bool = False


class Learned:
    """What a client learned of the server's limits, shared by all its ``*_many`` calls (and
    the threads of each): every change and every decision that reads it is made under the
    client's one lock (:class:`Split`'s methods), so that two calls at once neither undo
    what the other learned nor together exceed it."""

    def __init__(self) -> None:
        # the batch limit the server announces: of every path (/v1/models), or by path (an
        # older server's OpenAPI document); None: not read yet
        self.announced: int | dict[str, int] | None = None
        self.paths: dict[str, PathLimits] = {}
        # the client's in-flight limit, once a 422 named it: the server counts a key's items
        # across every model, so it bounds the items of all the client's requests at once
        self.in_flight: int | None = None
        self.busy = 0  # items of the client's *_many requests under way, every call's
        # the calls waiting for room under the in-flight limit, first come first served: a
        # thread whose request ended takes the lock again before the ones it woke, and would
        # otherwise refill the room its call just freed every time
        self.waiting: list[Split[Any]] = []

    def path(self, path: str) -> PathLimits:
        if (limits := self.paths.get(path)) is None:
            announced = self.announced
            size = announced if isinstance(announced, int) else (announced or {}).get(path)
            limits = self.paths[path] = PathLimits(size)
        return limits


class Split(Generic[R]):
    """A ``*_many`` call's plan: its ``n`` items cut into requests of at most ``size()``
    (lowered when the server refuses a request's size: 422 ``too_many_items``, 413, or a 422
    ``input_too_long`` over its model sequences), whose results land in input order; the
    first other failure stops it (:class:`IncompleteBatch`).
    Until a request of the size has been accepted, one runs at a time: a refusal then costs
    one request, not one per request under way. Made, and its methods called, under the lock
    of the client's :class:`Learned` (which every call's plan shares), or in one event loop
    with no await between."""

    def __init__(self, n: int, learned: Learned, path: str, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be 1 or more, not {chunk_size}")
        self.shared = learned  # the client's: what one call learns, the next (or another) knows
        self.learned = learned.path(path)
        self.chunk_size = chunk_size
        self.texts_cap: int | None = None  # this call's texts' cap: too many model sequences
        self.results: list[R | None] = [None] * n
        self.pending = [range(n)]  # the items not sent (or refused), in order
        self.failed: tuple[range, NlpserveError] | None = None
        self.in_flight = 0  # items of this call's requests under way

    def take(self) -> range | None:
        """The items of the next request; None when there is none (all sent, or stopped)."""
        if self.failed is not None or not self.pending:
            return None
        first = self.pending[0]
        chunk = range(first.start, min(first.stop, first.start + self.size()))
        if chunk.stop == first.stop:
            self.pending.pop(0)
        else:
            self.pending[0] = range(chunk.stop, first.stop)
        return chunk

    def begin(self) -> range | None:
        """:meth:`take`, its items counted in flight (the call's and the client's) till
        :meth:`end`."""
        if (chunk := self.take()) is not None:
            self.in_flight += len(chunk)
            self.shared.busy += len(chunk)
        return chunk

    def end(self, chunk: range, outcome: list[R] | NlpserveError) -> None:
        """A request of :meth:`begin`'s ended: its results, or its error."""
        self.in_flight -= len(chunk)
        self.shared.busy -= len(chunk)
        if isinstance(outcome, NlpserveError):
            self.refused(chunk, outcome)
        else:
            self.answered(chunk, outcome)

    def stop(self, chunk: range) -> None:
        """A request of :meth:`begin`'s ended by something else than an answer (an exception
        of the caller's, an interrupt): no request starts after it; the caller raises it."""
        self.in_flight -= len(chunk)
        self.shared.busy -= len(chunk)
        self.pending = []
        self.leave()

    def leave(self) -> None:
        """Out of the calls waiting for room (stopped, or its wait cancelled): the next one
        may take it. The caller wakes the waiters."""
        if self in self.shared.waiting:
            self.shared.waiting.remove(self)

    def size(self) -> int:
        """The most items of a request now (unknown: all there are)."""
        caps = (self.learned.size, self.chunk_size, self.texts_cap, self.shared.in_flight)
        known = [s for s in caps if s is not None]
        return min(known, default=len(self.results))

    def fits(self) -> bool:
        """Whether the next request may start beside those under way: one of this call's
        alone always, beside others once its size is settled; and, once a 422 named the
        client's in-flight limit, within it counting every call's requests (more would be
        429s, a second's wait each). Once the call has stopped, the waiting ends (to start
        nothing)."""
        if self.failed is not None or not self.pending:
            self.leave()
            return self.failed is not None or self.in_flight == 0 or self.learned.settled
        cap, busy, waiting = self.shared.in_flight, self.shared.busy, self.shared.waiting
        if cap is not None:
            # the room the next request needs: its own items (fewer than size() at the end)
            need = min(self.size(), len(self.pending[0]))
            if (busy > 0 and busy + need > cap) or (waiting and waiting[0] is not self):
                if self not in waiting:
                    waiting.append(self)
                return False
            self.leave()  # its turn
        return self.in_flight == 0 or self.learned.settled

    def answered(self, chunk: range, results: list[R]) -> None:
        if len(results) != len(chunk):
            message = f"{len(results)} outputs for {len(chunk)} inputs"
            self.refused(chunk, ServerError(message, status=200))
            return
        if len(chunk) >= self.size():
            self.learned.settled = True
        for i, result in zip(chunk, results, strict=True):
            self.results[i] = result

    def refused(self, chunk: range, error: NlpserveError) -> None:
        """A request's error: its items sent again in smaller requests when the server
        refused their number or size, else the call stops at it."""
        smaller = self._smaller(len(chunk), error)
        if smaller is None:
            if self.failed is None:
                self.failed = (chunk, error)
            return
        if _over_sequences(error):  # these texts' windows: not the path's size for later calls
            self.texts_cap = min(self.texts_cap or smaller, smaller)
        else:
            self.learned.size = min(self.learned.size or smaller, smaller)
        self.learned.settled = False
        # back with the items not sent, merged with a neighbour: ranges stay as few as can be
        ranges = sorted([*self.pending, chunk], key=lambda r: r.start)
        self.pending = [ranges[0]]
        for r in ranges[1:]:
            last = self.pending[-1]
            if last.stop == r.start:
                self.pending[-1] = range(last.start, r.stop)
            else:
                self.pending.append(r)

    def _smaller(self, n: int, error: NlpserveError) -> int | None:
        if n <= 1:
            return None
        if error.status == 413:  # body_too_large: fewer texts are fewer bytes
            return n // 2
        if _over_sequences(error):  # fewer items are fewer sequences: how many fewer, unknown
            return n // 2
        if error.status != 422 or error.code != "too_many_items":
            return None
        if error.limit is not None:  # the number, as the server gives it
            name, value = error.limit.name, error.limit.value
            if name in _ITEM_LIMITS and math.isfinite(value) and 1 <= value < n:
                limit = int(value)
                if name == _IN_FLIGHT_LIMIT:
                    self.shared.in_flight = limit
                return limit
            return n // 2  # a limit this client does not know, or a value of no use
        for pattern in _LIMITS:
            if (m := pattern.search(error.message)) and 1 <= (limit := int(m[1])) < n:
                if pattern is _IN_FLIGHT:
                    self.shared.in_flight = limit
                return limit
        return n // 2

    def chunk_options(self, opts: CallOptions, chunk: range) -> CallOptions:
        """A request's own id: the caller's ``request_id`` and the items', ``id.0-63``."""
        if (rid := opts.get("request_id")) is None:
            return opts
        return {**opts, "request_id": f"{rid}.{chunk.start}-{chunk.stop - 1}"}

    def result(self) -> list[R]:
        """The results in input order, or :class:`IncompleteBatch`."""
        if self.failed is not None:
            chunk, error = self.failed
            unanswered = [i for i, r in enumerate(self.results) if r is None]
            raise IncompleteBatch(error, chunk, list(self.results), unanswered) from error
        return [r for r in self.results if r is not None]


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Retry:
    wait_s: float


class Attempts(Generic[T]):
    """One call's attempts: every attempt sends the same ``X-Request-ID`` (the logs of the
    gateway and the replicas then show a call's retries under one id) and, under a deadline,
    ``X-Deadline-Ms`` as the time left of it, so the server's deadline is the caller's."""

    def __init__(
        self,
        call: Call[T],
        policy: RetryPolicy,
        timeout_s: float,
        deadline_ms: float | None,
        priority: str | None,
        request_id: str | None,
    ) -> None:
        self.call = call
        self.policy = NO_RETRY if call.probe else policy
        self.timeout_s = timeout_s
        self.request_id = request_id or new_request_id()
        self.priority = priority if call.prediction else None
        self.start = time.monotonic()
        self.budget_s = None if call.probe or deadline_ms is None else deadline_ms / 1000.0
        self.attempt = 0  # the attempts made so far, less one
        body = call.body
        self.content = None if body is None else json.dumps(body, ensure_ascii=False).encode()

    def _left_s(self) -> float | None:
        if self.budget_s is None:
            return None
        return self.budget_s - (time.monotonic() - self.start)

    def request(self) -> dict[str, Any]:
        """The keyword arguments of the next attempt's ``httpx`` request."""
        headers = {REQUEST_ID_HEADER: self.request_id}
        timeout = self.timeout_s
        if (left := self._left_s()) is not None:
            if left <= 0:  # next_delay keeps retries inside the budget: the first only
                raise self._deadline(None)
            headers[DEADLINE_HEADER] = str(max(1, math.ceil(left * 1000)))
            timeout = min(timeout, left + DEADLINE_GRACE_S)
        if self.priority is not None:
            headers[PRIORITY_HEADER] = self.priority
        if self.content is not None:
            headers["Content-Type"] = "application/json"
        return {
            "method": self.call.method,
            "url": self.call.path,
            "params": self.call.params,
            "content": self.content,
            "headers": headers,
            "timeout": timeout,
        }

    def _next(self, status: int | None, retry_after: str | None) -> float | None:
        elapsed = time.monotonic() - self.start
        return self.policy.next_delay(self.attempt, status, retry_after, elapsed, self.budget_s)

    def _deadline(self, cause: Exception | None) -> DeadlineExceeded:
        what = f"no answer before the call's deadline of {self.budget_s:g} s"
        if cause is not None:
            what += f" ({type(cause).__name__}: {cause})"
        return DeadlineExceeded(what, request_id=self.request_id, attempts=self.attempt + 1)

    def no_answer(self, error: httpx.TransportError) -> float:
        """The wait before the next attempt after ``error``; raises when there is none."""
        if (wait := self._next(None, None)) is None:
            left = self._left_s()
            if left is not None and left <= 0:
                raise self._deadline(error) from error
            raise TransportError(
                f"{type(error).__name__}: {error}".rstrip(": "),
                code=type(error).__name__,
                request_id=self.request_id,
                attempts=self.attempt + 1,
            ) from error
        self.attempt += 1
        return wait

    def answered(self, r: httpx.Response) -> T | Retry:
        """The result of a success; :class:`Retry` (the wait) before a retry; raises the
        answer's error when it is not retried."""
        if r.status_code < 400:
            try:
                result = self.call.parse(r.json())
            except (ValueError, KeyError, TypeError) as e:
                raise self.unreadable(e, r) from None
            meta = self._meta(r)
            for answer in result if isinstance(result, list) else [result]:
                if isinstance(answer, Answer):
                    answer.meta = meta  # each item of a batch: its request's
            return result
        retry_after = r.headers.get("retry-after")
        if (wait := self._next(r.status_code, retry_after)) is None:
            raise self.error(r, retry_after)
        self.attempt += 1
        return Retry(wait)

    def unreadable(self, error: Exception, r: httpx.Response | None = None) -> ServerError:
        """An answer this client cannot read: a body that is not the endpoint's, or one httpx
        cannot decode (``httpx.DecodingError``: a broken ``Content-Encoding``, whose answer
        and status httpx keeps to itself). Not retried: the same answer would come again."""
        return ServerError(
            f"{self.call.method} {self.call.path}: an answer this client cannot read "
            f"({type(error).__name__}: {error})",
            status=None if r is None else r.status_code,
            code=None if r is not None else type(error).__name__,
            request_id=self.request_id if r is None else self._answer_id(r),
            attempts=self.attempt + 1,
        )

    def _meta(self, r: httpx.Response) -> ResponseMeta:
        stages, cache = server_timing(r.headers.get("server-timing"))
        return ResponseMeta(
            request_id=self._answer_id(r),
            status=r.status_code,
            attempts=self.attempt + 1,
            elapsed_s=time.monotonic() - self.start,
            server_timing=stages,
            cache=cache,
        )

    def _answer_id(self, r: httpx.Response) -> str:
        # the server keeps a well-formed id; it mints one for an id it refuses
        return r.headers.get(REQUEST_ID_HEADER.lower()) or self.request_id

    def error(self, r: httpx.Response, retry_after: str | None) -> NlpserveError:
        return error_for(
            r.status_code,
            r.content,
            request_id=self._answer_id(r),
            retry_after=retry_after,
            attempts=self.attempt + 1,
            retry_statuses=self.policy.retry_statuses,
        )
