"""POST /v1/polarity over real HTTP, against the tiny trained classifier."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_single(client):
    pos = await client.post("/v1/polarity", json={"text": "a wonderful , funny and charming film"})
    neg = await client.post("/v1/polarity", json={"text": "a dull , tedious and boring plot"})
    assert pos.status_code == neg.status_code == 200
    p, n = pos.json(), neg.json()
    assert p["label"] == "positive" and p["positive_probability"] > 0.5
    assert n["label"] == "negative" and n["positive_probability"] < 0.5
    assert p["truncated"] is False and n["truncated"] is False


async def test_batch_in_order(client):
    texts = ["superb and fresh", "awful and stale", "the movie was brilliant", "bland script"]
    r = await client.post("/v1/polarity", json={"inputs": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert [o["label"] for o in outputs] == ["positive", "negative", "positive", "negative"]
    singles = await asyncio.gather(*(client.post("/v1/polarity", json={"text": t}) for t in texts))
    for o, s in zip(outputs, singles, strict=True):
        assert o["label"] == s.json()["label"]
        want = s.json()["positive_probability"]
        assert o["positive_probability"] == pytest.approx(want, abs=1e-6)


async def test_over_long_text_is_truncated_and_says_so(client, service):
    max_len = service.state.tasks["polarity-en"].max_length
    long_text = " ".join(["great"] * (max_len + 10))
    r = await client.post("/v1/polarity", json={"text": long_text})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True
    assert r.json()["label"] == "positive"


async def test_empty_and_wrong_type(client):
    for body, code in [({"text": ""}, "empty_text"), ({"text": ["a"]}, "wrong_type")]:
        r = await client.post("/v1/polarity", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == code
