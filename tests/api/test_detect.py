"""POST /v1/detect over real HTTP, against the tiny trained BERT detector."""

from __future__ import annotations

import asyncio
import math

import pytest

from service.tasks.detect import DetectTask
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


# --------------------------------------------------------------------------- windows
async def test_windows_read_the_whole_text_and_answer_their_weighted_mean_log_odds(client, service):
    task = service.state.tasks[DETECT_MODEL]
    text = " ".join([HUMAN] * 6 + [MACHINE] * 6)
    (windows,) = task.encoder.encode_windows([text])
    assert len(windows) >= 3  # several windows, a human head and a machine tail
    r = await client.post("/v1/detect", json={"text": text, "windows": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["truncated"] is False
    listed = out["windows"]
    assert [(w["start"], w["end"]) for w in listed] == [(w.start, w.end) for w in windows]
    assert listed[0]["label"] == "human" and listed[-1]["label"] == "machine"
    for w in listed:
        assert w["label"] == ("machine" if w["machine_probability"] > 0.5 else "human")
    weights = [w.text_tokens for w in windows]
    odds = [math.log(w["machine_probability"] / (1 - w["machine_probability"])) for w in listed]
    mean = sum(z * n for z, n in zip(odds, weights, strict=True)) / sum(weights)
    assert out["machine_probability"] == pytest.approx(1 / (1 + math.exp(-mean)), abs=1e-9)
    assert out["label"] == ("machine" if out["machine_probability"] > 0.5 else "human")
    # the head window reads what a request without windows reads (int8 scales move a little
    # with the batch-mates: see test_batch_in_order)
    head = (await client.post("/v1/detect", json={"text": text})).json()
    assert head["truncated"] is True and "windows" not in head
    assert listed[0]["machine_probability"] == pytest.approx(head["machine_probability"], abs=5e-3)


async def test_a_short_text_in_windows_is_one_window_equal_to_the_plain_answer(client):
    plain = (await client.post("/v1/detect", json={"text": MACHINE})).json()
    r = await client.post("/v1/detect", json={"inputs": [{"text": MACHINE, "windows": True}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    (window,) = out.pop("windows")
    assert (window["start"], window["end"]) == (0, len(MACHINE))
    assert out == plain
    assert window == {"start": 0, "end": len(MACHINE), "label": plain["label"],
                      "machine_probability": plain["machine_probability"]}  # fmt: skip


async def test_windows_count_as_model_sequences_of_the_request(model_repo):
    """A text of more windows than NLPSERVE_MAX_REQUEST_SEQUENCES: 422 input_too_long with
    its limit, as QA's windows; the same text without windows is read (its head)."""
    from tests.service_support import live_server, make_settings

    settings = make_settings(
        model_repo, load_models=DETECT_MODEL, max_request_sequences=3, max_batch_items=3
    )
    async with live_server(settings) as srv, srv.client() as c:
        task = srv.state.tasks[DETECT_MODEL]
        assert isinstance(task, DetectTask)
        text = " ".join([MACHINE] * 40)
        assert len(task.encoder.encode_windows([text])[0]) > 3
        r = await c.post("/v1/detect", json={"text": text, "windows": True})
        plain = await c.post("/v1/detect", json={"text": text})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "input_too_long" and "window" in error["message"]
    assert error["limit"] == {"name": "max_request_sequences", "value": 3}
    assert plain.status_code == 200 and plain.json()["truncated"] is True


@pytest.mark.parametrize("value", [1, "true", None])
async def test_windows_must_be_a_boolean(client, value):
    r = await client.post("/v1/detect", json={"text": MACHINE, "windows": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "wrong_type"
