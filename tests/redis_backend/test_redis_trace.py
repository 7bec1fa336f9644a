"""A worker's log lines about a work item carry the trace of the request that queued it: the
ids travel in the stream entry (service/queueing/codec.py, ``F_TRACE``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from service import tracecontext
from service.logs import JsonFormatter
from service.queueing import InferenceFailedError
from tests.redis_backend.helpers import api_queue, make_item, running_worker

POS = "pos-en"
TRACE = tracecontext.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)


async def test_worker_lines_about_an_item_carry_its_request_trace(
    make_settings, tiny_runners, caplog
) -> None:
    settings = make_settings(redis_max_attempts=1)
    caplog.set_level(logging.WARNING)
    # the worker starts outside any request: what its lines carry came with the entry
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners):
        token = tracecontext.CURRENT.set(TRACE)  # what the API's middleware does per request
        try:
            bad = make_item(tiny_runners[POS], 7, np.random.default_rng(3), poison=True)
            with pytest.raises(InferenceFailedError):
                await q.submit(bad)
        finally:
            tracecontext.CURRENT.reset(token)
    worker_lines = [r for r in caplog.records if getattr(r, "item_id", None) == bad.id]
    # ORT's failure on the item, and its dead letter
    assert len(worker_lines) >= 2, [r.getMessage() for r in caplog.records]
    for record in worker_lines:  # formatted here, outside the request: the ids are the record's
        doc = JsonFormatter().format(record)
        assert f'"trace_id": "{TRACE.trace_id}"' in doc and f'"span_id": "{TRACE.span_id}"' in doc
