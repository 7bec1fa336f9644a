"""What a :mod:`service.client` call raises: one hierarchy under :class:`NlpserveError`.

- :class:`ClientError`: a 4xx other than 429, the request's own fault (never retried);
  :class:`AuthenticationError` for 401.
- :class:`DeadlineExceeded`: a 504, or no answer before the call's deadline.
- :class:`RetriesExhausted`: a retryable answer (429, 502, 503) was still the answer when
  the retry policy allowed no more attempts (retries or total time spent).
- :class:`ServerError`: another 5xx (500 ``internal_error``, 501 ``explain_unavailable``), or
  an answer the client cannot read (``httpx.DecodingError`` included).
- :class:`TransportError`: no HTTP answer at all (refused, reset, timed out), after the
  retries.
- :class:`IncompleteBatch`: a ``*_many`` call stopped by one of its requests' errors, with
  the results it had.

Each carries the HTTP ``status`` (None without an answer), the API's error ``code`` and
``message`` (docs/service.md, "Errors"), the ``limit`` that refused the request where the
answer names one (:class:`ErrorLimit`), the ``request_id`` to quote, ``retry_after`` (seconds,
from the last answer's ``Retry-After``) and how many ``attempts`` were made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorLimit:
    """The limit an error answer says refused the request (its ``limit``): ``name``
    (``max_batch_items``, ``max_in_flight``, ``burst``, ``rate``, ``max_body_bytes``; others
    may come) and its ``value`` for this client (items, items a second, bytes)."""

    name: str
    value: int | float


class NlpserveError(Exception):
    """Base of every error a client call raises."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
        limit: ErrorLimit | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.attempts = attempts
        self.limit = limit

    def __str__(self) -> str:
        head = f"{self.status} {self.code}" if self.status is not None else (self.code or "error")
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{head}: {self.message} (request {self.request_id}{tries})"


class ClientError(NlpserveError):
    """A 4xx answer other than 429: the request is at fault; repeating it cannot help."""


class AuthenticationError(ClientError):
    """401: no API key, or one the server's keys file does not hold."""


class DeadlineExceeded(NlpserveError):
    """504 (the request's deadline passed in the server or the gateway), or no answer before
    the call's own deadline (``status`` None)."""


class RetriesExhausted(NlpserveError):
    """A retryable answer (the policy's ``retry_statuses``: 429, 502, 503) after the last
    attempt the retry policy allowed; a 429 always (never the request's fault)."""


class ServerError(NlpserveError):
    """A 5xx the policy does not retry: a bug in the service (500) or a missing feature (501);
    or an answer this client cannot read (a body not the endpoint's; one httpx cannot decode,
    ``code`` ``DecodingError`` and ``status`` None)."""


class TransportError(NlpserveError):
    """No HTTP answer: the connection was refused or reset, or an attempt timed out."""


class IncompleteBatch(NlpserveError):
    """A ``*_many`` call stopped by a request that failed (after its retries; not a refusal of
    its size, which the client splits smaller): no request started after it, those already
    running were waited for. ``error`` is that request's exception (also ``__cause__``; its
    ``status``, ``code``, ``limit``, ``retry_after``, ``attempts`` and ``request_id`` are this
    one's too), ``failed`` the input indices it held (an item index in its message counts from
    ``failed.start``), ``results`` every input's result in input order, None where none came,
    and ``unanswered`` the indices of those, to send again."""

    def __init__(
        self, error: NlpserveError, failed: range, results: list[Any], unanswered: list[int]
    ) -> None:
        super().__init__(
            f"the request of items {failed.start}-{failed.stop - 1} (of {len(results)}) "
            f"failed: {error.message}; {len(unanswered)} items unanswered",
            status=error.status,
            code=error.code,
            request_id=error.request_id,
            retry_after=error.retry_after,
            attempts=error.attempts,
            limit=error.limit,
        )
        self.error = error
        self.failed = failed
        self.results = results
        self.unanswered = unanswered


def parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def error_for(
    status: int,
    body: bytes,
    *,
    request_id: str | None,
    retry_after: str | None,
    attempts: int,
    retry_statuses: frozenset[int],
) -> NlpserveError:
    """The exception for an HTTP error answer: ``{"error": {"code", "message"}}`` from the
    service, with ``limit`` where one refused the request; another body (a gateway's HTML
    page) gives code ``http_<status>``."""
    code, message = f"http_{status}", body[:200].decode("utf-8", "replace").strip()
    limit = None
    try:
        doc: Any = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(err := doc.get("error"), dict):
        code = str(err.get("code", code))
        message = str(err.get("message", message))
        limit = error_limit(err.get("limit"))
    cls: type[NlpserveError]
    if status == 504:
        cls = DeadlineExceeded
    elif status in retry_statuses or status == 429:
        # a 429 is never the request's fault, whatever the policy retries
        cls = RetriesExhausted
    elif status == 401:
        cls = AuthenticationError
    elif 400 <= status < 500:
        cls = ClientError
    else:
        cls = ServerError
    return cls(
        message or f"HTTP {status}",
        status=status,
        code=code,
        request_id=request_id,
        retry_after=parse_retry_after(retry_after),
        attempts=attempts,
        limit=limit,
    )


def error_limit(doc: Any) -> ErrorLimit | None:
    """An error body's ``limit``; None without one, or for one this client cannot read (the
    error itself still counts: a malformed extra is no reason to lose it)."""
    if not isinstance(doc, dict):
        return None
    name, value = doc.get("name"), doc.get("value")
    # bool is an int to Python, never a limit
    if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return ErrorLimit(name, value)
