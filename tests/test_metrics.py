"""service/metrics.py: the label-child cache behind every per-request and per-batch series."""

from __future__ import annotations

from service.metrics import Metrics
from tests.service_support import metric_value


def test_cached_children_record_into_their_own_series() -> None:
    m = Metrics()
    for status in (200, 200, 422):
        m.observe_request("detector-en", "predict", status, 0.25)
    m.observe_request("qa-zh", "predict", 200, 0.5)
    m.observe_batch("qa-zh", 2, size=3, real_tokens=90, padded_tokens=100, secs=0.01)
    m.observe_batch("qa-zh", 2, size=1, real_tokens=10, padded_tokens=10, secs=0.01)
    # the same labels on two metrics are two children, not one
    assert m.child(m.requests, "qa-zh", "predict", "200") is m.requests.labels(
        "qa-zh", "predict", "200"
    )
    assert m.child(m.requests, "qa-zh", "predict", "200") is not m.child(
        m.request_duration, "qa-zh", "predict", "200"
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
        m.observe_request("qa-zh", "predict", 200, secs)
    text = m.render().decode()

    def bucket(le: str) -> float:
        return metric_value(
            text, "nlpserve_request_duration_seconds_bucket",
            model="qa-zh", endpoint="predict", status="200", le=le,
        )  # fmt: skip

    assert bucket("10.0") == 0 and bucket("20.0") == 1 and bucket("30.0") == 3
