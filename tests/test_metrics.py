"""service/metrics.py: the label-child cache behind every per-request and per-batch series;
service/loop_lag.py: the event-loop lag series, on this test's own loop."""

from __future__ import annotations

import asyncio
import threading
import time

from service.loop_lag import INTERVAL_S, LoopLagMonitor
from service.metrics import Metrics
from tests.service_support import (
    LATE_S,
    LOOP_STALL_S,
    late_wakeups,
    metric_value,
    stall_loop,
    wait_for,
)


def test_cached_children_record_into_their_own_series() -> None:
    m = Metrics()
    for status in (200, 200, 422):
        m.observe_request("detector-en", "predict", status, 0.25, priority="interactive")
    m.observe_request("qa-zh", "predict", 200, 0.5, priority="batch")
    m.observe_batch("qa-zh", 2, size=3, real_tokens=90, padded_tokens=100, secs=0.01)
    m.observe_batch("qa-zh", 2, size=1, real_tokens=10, padded_tokens=10, secs=0.01)
    # the same labels on two metrics are two children, not one
    assert m.child(m.requests, "qa-zh", "predict", "200", "batch") is m.requests.labels(
        "qa-zh", "predict", "200", "batch"
    )
    assert m.child(m.requests, "qa-zh", "predict", "200", "batch") is not m.child(
        m.request_duration, "qa-zh", "predict", "200", "batch"
    )
    text = m.render().decode()

    def value(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels)

    assert (
        value("nlpserve_requests_total", model="detector-en", endpoint="predict", status="200") == 2
    )
    assert (
        value("nlpserve_requests_total", model="detector-en", endpoint="predict", status="422") == 1
    )
    assert value("nlpserve_requests_total", model="qa-zh", endpoint="predict", status="200") == 1
    assert (
        value(
            "nlpserve_request_duration_seconds_sum", model="qa-zh", endpoint="predict", status="200"
        )
        == 0.5
    )
    assert value("nlpserve_batch_tokens_total", model="qa-zh", kind="real") == 100
    assert value("nlpserve_batch_tokens_total", model="qa-zh", kind="padded") == 110
    assert value("nlpserve_batch_size_sum", model="qa-zh", bucket="2") == 4


def test_request_latency_buckets_reach_past_the_default_deadline() -> None:
    """Under overload requests wait up to their deadline (30 s by default): a histogram that
    ended at 10 s would put all of them past it, and its p99 would read 10 s."""
    m = Metrics()
    for secs in (12.0, 25.0, 29.0):
        m.observe_request("qa-zh", "predict", 200, secs, priority="interactive")
    text = m.render().decode()

    def bucket(le: str) -> float:
        return metric_value(
            text, "nlpserve_request_duration_seconds_bucket",
            model="qa-zh", endpoint="predict", status="200", le=le,
        )  # fmt: skip

    assert bucket("10.0") == 0 and bucket("20.0") == 1 and bucket("30.0") == 3


async def test_event_loop_lag_shows_a_stall_and_forgets_it_after_its_window() -> None:
    m = Metrics()
    monitor = LoopLagMonitor(m.loop_lag, m.loop_lag_max, window_s=1.0)
    monitor.start()
    try:

        async def read() -> str:
            return m.render().decode()

        before, after = await stall_loop(read)
        assert metric_value(after, "nlpserve_event_loop_lag_seconds_count") > metric_value(
            before, "nlpserve_event_loop_lag_seconds_count"
        )
        assert metric_value(after, "nlpserve_event_loop_lag_max_seconds") >= (
            LOOP_STALL_S - INTERVAL_S
        )
        # one window later the gauge holds the idle loop's lags again
        await wait_for(lambda: monitor.max_lag() < float(LATE_S))
    finally:
        await monitor.stop()


async def test_a_stuck_loop_shows_in_a_scrape_from_another_thread() -> None:
    """The worker serves /metrics from a thread: while its loop is stuck (the monitor cannot
    wake to record anything), the gauge already reports how late it is."""
    m = Metrics()
    monitor = LoopLagMonitor(m.loop_lag, m.loop_lag_max)
    monitor.start()
    stalled, scraped = threading.Event(), threading.Event()

    def scrape_while_stalled() -> str:
        stalled.wait()
        time.sleep(LOOP_STALL_S)
        try:
            return m.render().decode()
        finally:
            scraped.set()

    try:
        await asyncio.sleep(2 * INTERVAL_S)  # the monitor sleeps: its wake-up is due
        before = m.render().decode()
        scrape = asyncio.get_running_loop().run_in_executor(None, scrape_while_stalled)
        stalled.set()
        assert scraped.wait(timeout=30)  # blocks this loop until the thread has scraped
        during = await scrape
        assert metric_value(during, "nlpserve_event_loop_lag_max_seconds") >= (
            LOOP_STALL_S - INTERVAL_S
        )
        assert late_wakeups(during) == late_wakeups(before)  # not recorded yet: stuck
    finally:
        await monitor.stop()
    # stopped: no wake-up is due, so the gauge stops growing
    stopped = monitor.max_lag()
    await asyncio.sleep(2 * INTERVAL_S)
    assert monitor.max_lag() == stopped
