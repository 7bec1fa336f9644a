"""The Server-Timing header of predictions: where a request's time went in the server."""

from __future__ import annotations

import re

import pytest

from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    metric_value,
    read_metrics,
    require_model,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

_METRIC = re.compile(r"^(\w+);dur=(\d+\.\d{3})$")


def timings(header: str) -> dict[str, float]:
    """``name;dur=ms, ...`` as {name: ms}; every part must have that form."""
    out = {}
    for part in header.split(", "):
        m = _METRIC.match(part)
        assert m, header
        out[m[1]] = float(m[2])
    return out


@pytest.fixture(autouse=True)
def _needs_models(model_repo):
    require_model(model_repo, DETECT_MODEL)
    require_model(model_repo, POLARITY_MODEL)


async def test_every_prediction_says_where_its_time_went(client, service):
    """Both backends: tokenizing, the wait for the model, and the model's own batch time
    (in Redis mode the worker reports it with the reply: 0 if it did not)."""
    for path, body in (
        ("/v1/detect", {"text": "a short text to classify"}),
        ("/v1/polarity", {"inputs": [{"text": "a fine film"}, {"text": "dull and long"}]}),
    ):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        t = timings(r.headers["server-timing"])
        assert list(t) == ["tokenize", "queue", "inference"], t
        assert t["inference"] > 0 and t["queue"] >= 0 and t["tokenize"] >= 0, t
    queue = service.app.state.service.queue
    assert not getattr(queue, "_run_s", {})  # the Redis replies' times are not kept


async def test_inference_time_is_the_batch_that_ran_the_request(inprocess_service):
    queue = inprocess_service.app.state.service.queue
    async with inprocess_service.client() as c:
        r = await c.post("/v1/detect", json={"text": "one request on its own"})
    assert r.status_code == 200, r.text
    ran = queue.batch_log[-1]
    assert ran.model == DETECT_MODEL and ran.size == 1
    assert timings(r.headers["server-timing"])["inference"] == round(ran.seconds * 1000, 3)


async def test_errors_carry_no_server_timing(client):
    r = await client.post("/v1/detect", json={"text": ""})
    assert r.status_code == 422 and "server-timing" not in r.headers


async def test_the_header_is_declared_on_every_prediction(client):
    spec = (await client.get("/openapi.json")).json()
    for task in ("qa", "detect", "pos", "polarity"):
        ok = spec["paths"][f"/v1/{task}"]["post"]["responses"]["200"]
        assert "Server-Timing" in ok["headers"], task
        assert not ok["headers"]["Server-Timing"].get("required")  # errors do not carry it


async def test_stage_metrics_add_up_the_headers(client):
    """nlpserve_request_stage_seconds: per model and stage, one observation per answered
    prediction (a batch request is one), summing what the headers said; an error adds none."""

    def stages(text: str) -> dict[str, tuple[float, float]]:
        return {
            s: (
                metric_value(
                    text, "nlpserve_request_stage_seconds_count", model=POLARITY_MODEL, stage=s
                ),
                metric_value(
                    text, "nlpserve_request_stage_seconds_sum", model=POLARITY_MODEL, stage=s
                ),
            )
            for s in ("tokenize", "queue", "inference")
        }

    before = stages(await read_metrics(client))
    said: dict[str, float] = {"tokenize": 0.0, "queue": 0.0, "inference": 0.0}
    bodies = [{"text": "a fine film"}, {"inputs": [{"text": "dull"}, {"text": "bright"}]}]
    for body in bodies:
        r = await client.post("/v1/polarity", json=body)
        assert r.status_code == 200, r.text
        for name, ms in timings(r.headers["server-timing"]).items():
            said[name] += ms / 1000
    assert (await client.post("/v1/polarity", json={"text": ""})).status_code == 422
    after = stages(await read_metrics(client))
    for s, (count, total) in after.items():
        assert count - before[s][0] == len(bodies), s
        # the header rounds each value to a microsecond
        assert total - before[s][1] == pytest.approx(said[s], abs=2e-6 * len(bodies)), s


async def test_stage_histogram_resolves_sub_millisecond_stages(client):
    """Tokenizing a short text, and an LSTM's whole batch, take well under a millisecond: a
    histogram whose first bucket ends at 1 ms put every such observation in it, and the
    docs' dashboard quantile read ~0.95 ms whatever the stage really took."""

    def bucket_counts(text: str, stage: str) -> dict[float, float]:
        bounds = set(re.findall(r'nlpserve_request_stage_seconds_bucket\{[^}]*le="([^"]+)"', text))
        return {
            float(le): metric_value(
                text,
                "nlpserve_request_stage_seconds_bucket",
                model=POLARITY_MODEL,
                stage=stage,
                le=le,
            )
            for le in bounds
        }

    await client.post("/v1/polarity", json={"text": "a fine film"})  # the series exist
    for stage in ("tokenize", "inference"):
        before = bucket_counts(await read_metrics(client), stage)
        r = await client.post("/v1/polarity", json={"text": "a fine film"})
        assert r.status_code == 200, r.text
        took = timings(r.headers["server-timing"])[stage] / 1000
        after = bucket_counts(await read_metrics(client), stage)
        landed = min(le for le, n in after.items() if n > before.get(le, 0.0))
        assert took <= landed <= max(4 * took, 1e-4), (stage, took, landed)


async def test_stage_metrics_tell_the_priority_classes_apart(client):
    """A batch-priority prediction's stages are counted under priority="batch", an
    interactive one's under "interactive": a batch request's queue stage waits for
    interactive work by design, and would blur the interactive queue wait."""

    def counts(text: str) -> dict[tuple[str, str], float]:
        return {
            (p, s): metric_value(
                text,
                "nlpserve_request_stage_seconds_count",
                model=POLARITY_MODEL,
                stage=s,
                priority=p,
            )
            for p in ("interactive", "batch")
            for s in ("tokenize", "queue", "inference")
        }

    before = counts(await read_metrics(client))
    r = await client.post("/v1/polarity", json={"text": "an interactive film review"})
    assert r.status_code == 200, r.text
    for k in range(2):
        r = await client.post(
            "/v1/polarity",
            json={"text": f"a bulk-scored review {k}"},
            headers={"X-Priority": "batch"},
        )
        assert r.status_code == 200, r.text
    after = counts(await read_metrics(client))
    for (p, s), n in after.items():
        assert n - before[p, s] == {"interactive": 1, "batch": 2}[p], (p, s)
