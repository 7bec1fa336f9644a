"""Parsing W3C Trace Context headers (service/tracecontext.py), by the spec's rules."""

from __future__ import annotations

import pytest

from service.tracecontext import TRACESTATE_MAX, from_headers, parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"

# Every form the spec says to ignore (the trace restarts), each as the one header line.
INVALID = {
    "uppercase": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "short trace id": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "long parent id": f"00-{TRACE_ID}-{PARENT_ID}0-01",
    "one-digit flags": f"00-{TRACE_ID}-{PARENT_ID}-1",
    "zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "zero parent id": f"00-{TRACE_ID}-{'0' * 16}-01",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "version 00 with more": f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
    "later version, more without a dash": f"cc-{TRACE_ID}-{PARENT_ID}-01x",
    "not hex": f"00-{'g' * 32}-{PARENT_ID}-01",
    "garbage": "hello",
    "empty": "",
    "no dashes": f"00{TRACE_ID}{PARENT_ID}01",
}


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("value", INVALID.values(), ids=list(INVALID))
def test_invalid_traceparent_is_not_parsed(value):
    assert parse_traceparent(value.encode()) is None


def test_valid_and_future_versions_parse():
    assert parse_traceparent(SAMPLED.encode()) == (TRACE_ID, PARENT_ID, True)
    assert parse_traceparent(UNSAMPLED.encode()) == (TRACE_ID, PARENT_ID, False)
    # flags other than sampled are not ours to read; only bit 0 counts
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-fe".encode()) == (
        TRACE_ID,
        PARENT_ID,
        False,
    )
    # a later version: its first four fields as version 00's, anything after a dash ignored
    later = f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds"
    assert parse_traceparent(later.encode()) == (TRACE_ID, PARENT_ID, True)
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-03".encode()) == (
        TRACE_ID,
        PARENT_ID,
        True,
    )
    assert parse_traceparent(f" {SAMPLED}\t".encode()) is not None  # HTTP's optional blanks


def test_context_of_the_headers():
    ctx = from_headers([SAMPLED.encode()], [b"a=1", b" b=2 "])
    assert (ctx.trace_id, ctx.sampled, ctx.tracestate) == (TRACE_ID, True, "a=1,b=2")
    assert len(ctx.span_id) == 16 and ctx.span_id not in (PARENT_ID, "0" * 16)
    assert ctx.traceparent == f"00-{TRACE_ID}-{ctx.span_id}-01"
    # a later version's flags: only sampled is propagated, in version 00
    later = from_headers([f"cc-{TRACE_ID}-{PARENT_ID}-03-x".encode()], [])
    assert later.traceparent == f"00-{TRACE_ID}-{later.span_id}-01"


@pytest.mark.parametrize(
    "state", ["x" * (TRACESTATE_MAX + 1), "a=\x01", "a=é", ""], ids=["long", "ctl", "utf8", "empty"]
)
def test_tracestate_outside_the_bounds_is_dropped(state):
    ctx = from_headers([SAMPLED.encode()], [state.encode()])
    assert ctx.trace_id == TRACE_ID and ctx.tracestate is None


def test_no_valid_traceparent_is_a_new_unsampled_trace_without_its_state():
    for lines in ([], [b"garbage"], [SAMPLED.encode(), SAMPLED.encode()]):
        ctx = from_headers(lines, [b"a=1"])
        assert ctx.trace_id != TRACE_ID and len(ctx.trace_id) == 32
        assert not ctx.sampled and ctx.tracestate is None
    assert from_headers([], []).trace_id != from_headers([], []).trace_id
