"""W3C Trace Context (level 1) without OpenTelemetry: the ids that tie a request's log lines,
its work items and its latency exemplar to the caller's distributed trace.

An incoming ``traceparent`` (``00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>``) is
parsed by the spec's rules, forward-compatible versions included; one that fails them is
ignored and the trace restarts here, as the spec says (never an error to the client). Every
request gets a span id of its own (the service's span, a child of the caller's); the response
carries ``traceparent`` with the trace id, that span id and the caller's sampled flag. The
service exports no spans: ``sampled`` is only ever the caller's decision, and a trace started
here is not sampled (no tracing backend holds it, so no exemplar points at it).

``tracestate`` is opaque here: kept when it is printable ASCII of at most
:data:`TRACESTATE_MAX` characters and the ``traceparent`` beside it is valid, and sent back
unchanged with the response's ``traceparent``.
"""

from __future__ import annotations

import random
import re
from contextvars import ContextVar
from dataclasses import dataclass

from service.ids import new_id

SAMPLED = 0x01  # the only trace flag of level 1; other bits are not propagated
# The spec's floor for what a vendor propagates; longer values are dropped, not truncated
# (cutting an opaque list could split a member).
TRACESTATE_MAX = 512

# version 00 exactly; a later version: the same first 55 characters, then "-" and more
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE = re.compile(rb"[\x20-\x7e]*")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


@dataclass(slots=True)  # not frozen: that costs ~0.7 µs per request; never modified
class TraceContext:
    """A request's place in its trace: ``span_id`` is the service's span (in a worker, the
    API span that submitted the item: the worker starts none of its own)."""

    trace_id: str
    span_id: str
    sampled: bool = False
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def log_fields(self) -> dict[str, str]:
        return {"trace_id": self.trace_id, "span_id": self.span_id}


def new_span_id() -> str:
    # 64 random bits; all zeros is the spec's invalid id (p = 2^-64, but free to rule out)
    return f"{random.getrandbits(64) or 1:016x}"


def parse_traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """(trace id, parent id, sampled) of a ``traceparent`` header, None if it is invalid:
    not lowercase hex, a field of the wrong length, an all-zero id, version ``ff``, a version
    00 header with anything after the flags, or a later version's extra not behind a ``-``.
    Surrounding blanks (HTTP's optional whitespace) are allowed."""
    m = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id.decode(), parent_id.decode(), bool(int(flags, 16) & SAMPLED)


def from_headers(traceparent: list[bytes], tracestate: list[bytes]) -> TraceContext:
    """The context of a request with these header lines (each list: the values of every
    line of that name, in order): the caller's trace when ``traceparent`` is one valid line,
    else a new trace; a new span id either way."""
    parsed = parse_traceparent(traceparent[0]) if len(traceparent) == 1 else None
    if parsed is None:  # absent, repeated or invalid: the trace restarts here
        return TraceContext(new_id(), new_span_id())
    trace_id, _parent, sampled = parsed
    state = None
    if tracestate:
        # several lines are one comma-separated list (RFC 9110 field combination)
        joined = b",".join(v.strip(b" \t") for v in tracestate)
        if 0 < len(joined) <= TRACESTATE_MAX and _TRACESTATE.fullmatch(joined):
            state = joined.decode("ascii")
    return TraceContext(trace_id, new_span_id(), sampled, state)


# The trace of the request being served in this task (None outside one): log lines emitted
# while serving it carry its ids (service/logs.py), and work items created for it carry them
# to a worker (service/batching/types.py).
CURRENT: ContextVar[TraceContext | None] = ContextVar("nlpserve_trace", default=None)


def current() -> TraceContext | None:
    return CURRENT.get()
