"""POST /v1/pos over real HTTP, against the tiny trained tagger."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.api.schemas import PosRequest
from tests.service_support import POS_MODEL

pytestmark = pytest.mark.asyncio(loop_scope="session")

SENTENCE = "The big dog sees a cat ."


async def test_single_text(client):
    r = await client.post("/v1/pos", json={"text": SENTENCE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == ["The", "big", "dog", "sees", "a", "cat", "."]
    assert len(body["tags"]) == len(body["tokens"])
    # The tiny model fits its toy grammar: determiners and nouns are right.
    assert body["tags"][0] == "DT" and body["tags"][2] == "NN" and body["tags"][-1] == "."


async def test_text_is_split_with_surface_forms_kept(client):
    r = await client.post("/v1/pos", json={"text": "She likes red cars!"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ["She", "likes", "red", "cars", "!"]


async def test_pre_split_tokens(client):
    r = await client.post("/v1/pos", json={"tokens": ["the", "cats", "chased", "a", "bird"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == ["the", "cats", "chased", "a", "bird"]
    assert body["tags"][1] == "NNS"


async def test_batch_answers_in_order_and_matches_singles(client):
    inputs = [
        {"text": SENTENCE},
        {"tokens": ["he", "owns", "a", "red", "car", "."]},
        {"text": "every old man finds the park ."},
    ]
    r = await client.post("/v1/pos", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    singles = await asyncio.gather(*(client.post("/v1/pos", json=i) for i in inputs))
    assert outputs == [s.json() for s in singles]


async def test_over_long_text_is_rejected_not_truncated(client, service):
    max_len = service.state.tasks["pos-en"].max_length
    r = await client.post("/v1/pos", json={"tokens": ["dog"] * (max_len + 1)})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "input_too_long"
    assert str(max_len) in err["message"]
    ok = await client.post("/v1/pos", json={"tokens": ["dog"] * max_len})
    assert ok.status_code == 200 and len(ok.json()["tags"]) == max_len


async def test_over_long_text_is_split_no_further_than_the_limit(client, service):
    """A text is split one token past the limit, not whole: 48 texts of 20,000 characters
    split whole took ~0.9 s of CPU (~2.7 s of punctuation) to answer this 422. The answer
    says "more than", as it does not count the rest."""
    max_len = service.state.tasks["pos-en"].max_length
    chars = service.state.settings.max_text_chars
    for text in (("the dog barks . " * 2000)[:chars], "!" * chars):
        assert len(text.split()) > max_len or "!" in text
        r = await client.post("/v1/pos", json={"text": text})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "input_too_long"
        assert err["message"].startswith(f"the text has more than {max_len} tokens;"), err


async def test_over_long_item_of_a_batch_is_named(client, service):
    max_len = service.state.tasks["pos-en"].max_length
    body = {"inputs": [{"text": SENTENCE}, {"tokens": ["a"] * (max_len + 5)}]}
    r = await client.post("/v1/pos", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("inputs[1]:")


@pytest.mark.parametrize(
    "body, code",
    [
        ({"text": "x", "tokens": ["x"]}, "text_or_tokens"),
        ({}, "text_or_tokens"),
        ({"tokens": []}, "empty_text"),
        ({"tokens": ["ok", " "]}, "empty_text"),
        ({"tokens": "not a list"}, "wrong_type"),
        ({"text": "   "}, "empty_text"),
        ({"text": "..."}, None),  # punctuation only is still words to tag
    ],
)
async def test_input_validation(client, body, code):
    r = await client.post("/v1/pos", json=body)
    if code is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code


async def test_scores_are_each_tags_probability_under_the_model(client, service):
    plain = (await client.post("/v1/pos", json={"text": SENTENCE})).json()
    r = await client.post("/v1/pos", json={"text": SENTENCE, "scores": True})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = body.pop("scores")
    assert body == plain and "scores" not in plain  # only when asked for
    task = service.state.tasks[POS_MODEL]
    assert len(scores) == len(body["tags"])
    assert all(1 / len(task.labels) <= p <= 1.0 for p in scores)
    runner = service.state.runners.get(POS_MODEL)
    if runner is not None:  # in process: the model's own softmax, row by row
        (prepared,) = task.prepare([PosRequest(text=SENTENCE)], 1e12, "predict")
        (logits,) = [o["logits"] for o in runner.run_batch(prepared.items)]
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        want = (z / z.sum(axis=-1, keepdims=True)).max(axis=-1)
        assert scores == pytest.approx(want.tolist(), abs=1e-6)


async def test_scores_in_a_batch_only_where_asked(client):
    items = [{"tokens": ["the", "cats", "ran"], "scores": True}, {"text": SENTENCE}]
    r = await client.post("/v1/pos", json={"inputs": items})
    assert r.status_code == 200, r.text
    first, second = r.json()["outputs"]
    assert len(first["scores"]) == 3 and "scores" not in second


@pytest.mark.parametrize("value", [1, "true", None])
async def test_scores_must_be_a_boolean(client, value):
    r = await client.post("/v1/pos", json={"text": SENTENCE, "scores": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "wrong_type"
