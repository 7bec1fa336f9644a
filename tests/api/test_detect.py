"""POST /v1/detect over real HTTP, against the tiny trained BERT detector."""

from __future__ import annotations

import asyncio

import pytest

from tests.service_support import DETECT_MODEL, require_model

pytestmark = pytest.mark.asyncio(loop_scope="session")

MACHINE = "additionally it is important to note that overall there are several factors"
HUMAN = "i think my dog ate it lol yeah the bus was late again tbh"


@pytest.fixture(autouse=True)
def _needs_model(model_repo):
    require_model(model_repo, DETECT_MODEL)


async def test_single(client):
    m = await client.post("/v1/detect", json={"text": MACHINE})
    h = await client.post("/v1/detect", json={"text": HUMAN})
    assert m.status_code == h.status_code == 200, (m.text, h.text)
    assert m.json()["label"] == "machine" and m.json()["machine_probability"] > 0.5
    assert h.json()["label"] == "human" and h.json()["machine_probability"] < 0.5
    assert m.json()["truncated"] is False


async def test_batch_in_order(client):
    texts = [HUMAN, MACHINE, HUMAN + " " + HUMAN, "furthermore in conclusion"]
    r = await client.post("/v1/detect", json={"inputs": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert len(outputs) == 4
    singles = await asyncio.gather(*(client.post("/v1/detect", json={"text": t}) for t in texts))
    assert [o["label"] for o in outputs] == [s.json()["label"] for s in singles]
    # The default CPU variant is dynamically quantised int8: its activation scales are
    # computed per batch, so probabilities move with the batch-mates (docs/service.md; on the
    # real detector by up to ~0.3 near the 0.5 boundary). This tiny model's answers for these
    # texts sit far from the boundary and move by less than 5e-3.
    for o, s in zip(outputs, singles, strict=True):
        want = s.json()["machine_probability"]
        assert o["machine_probability"] == pytest.approx(want, abs=5e-3)


async def test_over_long_text_is_truncated_and_says_so(client, service):
    max_len = service.state.tasks[DETECT_MODEL].max_length
    r = await client.post("/v1/detect", json={"text": " ".join([MACHINE] * max_len)})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True
    assert r.json()["label"] == "machine"


async def test_unicode_and_unknown_characters(client):
    r = await client.post("/v1/detect", json={"text": "🙂 naïve café ☃ \u200b"})
    assert r.status_code == 200, r.text
    assert 0.0 <= r.json()["machine_probability"] <= 1.0
