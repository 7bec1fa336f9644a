"""POST /v1/qa over real HTTP, against the tiny trained BERT span model."""

from __future__ import annotations

import asyncio

import pytest

from service.api.schemas import QARequest
from tests.service_support import QA_MODEL, require_model

pytestmark = pytest.mark.asyncio(loop_scope="session")

CONTEXT = "中国的首都是北京，它有三千多年的历史。"
QUESTION = "中国的首都是哪里？"
# Long enough for several windows (tiny model: max_length 64, doc_stride 16).
LONG_CONTEXT = "这是一段没有用的填充文字。" * 8 + CONTEXT + "还有更多的填充文字在这里。" * 6


@pytest.fixture(autouse=True)
def _needs_model(model_repo):
    require_model(model_repo, QA_MODEL)


def _check_span(out: dict, context: str) -> None:
    assert 0 <= out["start"] <= out["end"] <= len(context)
    assert context[out["start"] : out["end"]] == out["answer"]
    assert 0.0 <= out["score"] <= 1.0


async def test_single(client):
    r = await client.post("/v1/qa", json={"question": QUESTION, "context": CONTEXT})
    assert r.status_code == 200, r.text
    out = r.json()
    _check_span(out, CONTEXT)
    assert out["answer"]  # the tiny model always finds some span in a short context


async def test_long_context_uses_windows_and_maps_offsets_back(client, service):
    task = service.state.tasks[QA_MODEL]
    windows = task.encoder.encode(QUESTION, LONG_CONTEXT)
    assert len(windows) > 2
    r = await client.post("/v1/qa", json={"question": QUESTION, "context": LONG_CONTEXT})
    assert r.status_code == 200, r.text
    out = r.json()
    _check_span(out, LONG_CONTEXT)
    # Reference: every window run on its own, then the same span decoding.
    prepared = task.prepare([QARequest(question=QUESTION, context=LONG_CONTEXT)], 1e12, "predict")
    runner = service.state.runners.get(QA_MODEL)
    if runner is not None:  # in-process backend: the model is in this process
        outputs = [runner.run_batch([it])[0] for it in prepared[0].items]
        want = task.decode(prepared[0], outputs)
        assert out["answer"] == want.answer
        assert (out["start"], out["end"]) == (want.start, want.end)


async def test_batch_in_order(client):
    items = [
        {"question": QUESTION, "context": CONTEXT},
        {"question": "谁被称为诗仙？", "context": "李白是唐代著名诗人，被称为诗仙。"},
        {"question": QUESTION, "context": LONG_CONTEXT},
    ]
    r = await client.post("/v1/qa", json={"inputs": items})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert len(outputs) == 3
    singles = await asyncio.gather(*(client.post("/v1/qa", json=i) for i in items))
    # Each output is a span of its own item's context: the three contexts differ, and the long
    # one's filler puts its spans past the end of the short one, so outputs out of order fail.
    for item, o in zip(items, outputs, strict=True):
        _check_span(o, item["context"])
    # The served int8 variant is dynamically quantised: activation scales are computed over
    # the whole batch, so a batch answer may differ from the single one (seen in CI: span
    # (6, 8) against (6, 7)). The fp32 variant must not: test_fp32_batch_answers_equal_singles.
    assert all(s.status_code == 200 for s in singles)


async def test_fp32_batch_answers_equal_singles(model_repo):
    """fp32 answers do not depend on the batch: a request's span and score are the same alone
    and batched with others (padding to the longest included)."""
    from tests.service_support import live_server, make_settings

    items = [
        {"question": QUESTION, "context": CONTEXT},
        {"question": "谁被称为诗仙？", "context": "李白是唐代著名诗人，被称为诗仙。"},
        {"question": QUESTION, "context": LONG_CONTEXT},
    ]
    async with (
        live_server(make_settings(model_repo, variant="fp32")) as srv,
        srv.client() as client,
    ):
        r = await client.post("/v1/qa", json={"inputs": items})
        singles = [(await client.post("/v1/qa", json=i)).json() for i in items]
    assert r.status_code == 200, r.text
    for o, s in zip(r.json()["outputs"], singles, strict=True):
        assert (o["answer"], o["start"], o["end"]) == (s["answer"], s["start"], s["end"])
        assert o["score"] == pytest.approx(s["score"], abs=1e-6)


@pytest.mark.parametrize(
    "body, code",
    [
        ({"question": "", "context": CONTEXT}, "empty_text"),
        ({"question": QUESTION, "context": " \n"}, "empty_text"),
        ({"question": QUESTION}, "missing_field"),
        ({"question": 3, "context": CONTEXT}, "wrong_type"),
    ],
)
async def test_validation(client, body, code):
    r = await client.post("/v1/qa", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


# Special-token strings the tokenizer matches in client text (they get their special ids).
TYPED_SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")


async def test_a_context_of_special_token_strings_has_no_answer(client):
    """Typed "[SEP]"/"[CLS]"/... are the model's own markers, not text: never an answer."""
    r = await client.post("/v1/qa", json={"question": QUESTION, "context": "[SEP][CLS][PAD][MASK]"})
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": "", "start": 0, "end": 0, "score": 0.0}


@pytest.mark.parametrize(
    "context",
    [
        "[SEP][CLS][PAD] 长城 [SEP]",
        "[CLS]北京[SEP]",
        "[MASK][MASK]首都[PAD][PAD][SEP]",
        "[SEP]" * 30 + CONTEXT + "[CLS]" * 30,
    ],
)
async def test_answer_never_starts_or_ends_on_a_special_token_typed_in_the_context(
    client, service, context
):
    encoder = service.state.tasks[QA_MODEL].encoder
    ids = encoder.tokenizer.encode(context, add_special_tokens=False).ids
    specials = {encoder.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    assert specials & set(ids)  # matched as the special tokens
    r = await client.post("/v1/qa", json={"question": QUESTION, "context": context})
    assert r.status_code == 200, r.text
    out = r.json()
    _check_span(out, context)
    assert out["answer"].strip()
    assert not out["answer"].startswith(TYPED_SPECIALS), out
    assert not out["answer"].endswith(TYPED_SPECIALS), out


# --------------------------------------------------------------------------- top_k, length
def _tokens(service, text: str) -> int:
    encoder = service.state.tasks[QA_MODEL].encoder
    return len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)


async def test_top_k_lists_distinct_spans_best_first(client):
    plain = await client.post("/v1/qa", json={"question": QUESTION, "context": LONG_CONTEXT})
    r = await client.post(
        "/v1/qa", json={"question": QUESTION, "context": LONG_CONTEXT, "top_k": 5}
    )
    assert r.status_code == 200, r.text
    assert "answers" not in plain.json()  # only when asked for
    out = r.json()
    answers = out.pop("answers")
    assert out == plain.json()  # the best answer is the same with or without top_k
    assert len(answers) == 5
    assert answers[0] == out
    for a in answers:
        _check_span(a, LONG_CONTEXT)
        assert a["answer"]
    assert len({(a["start"], a["end"]) for a in answers}) == 5
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-9


async def test_max_answer_length_bounds_every_listed_span(client, service):
    body = {"question": QUESTION, "context": LONG_CONTEXT, "top_k": 20}
    wide = (await client.post("/v1/qa", json=body)).json()["answers"]
    assert max(_tokens(service, a["answer"]) for a in wide) > 2  # the limit below matters
    r = await client.post("/v1/qa", json={**body, "max_answer_length": 2})
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert answers and all(1 <= _tokens(service, a["answer"]) <= 2 for a in answers)
    # the model's own limit, as GET /v1/models says, is what a request without one gets
    info = (await client.get(f"/v1/models/{QA_MODEL}")).json()
    default = info["max_answer_length"]
    assert default == service.state.tasks[QA_MODEL].max_answer_length
    same = await client.post("/v1/qa", json={**body, "max_answer_length": default})
    assert same.json() == {**wide[0], "answers": wide}


async def test_a_batch_lists_answers_for_the_items_that_ask(client):
    items = [
        {"question": QUESTION, "context": CONTEXT, "top_k": 3},
        {"question": QUESTION, "context": CONTEXT},
    ]
    r = await client.post("/v1/qa", json={"inputs": items})
    assert r.status_code == 200, r.text
    first, second = r.json()["outputs"]
    assert 1 <= len(first["answers"]) <= 3 and first["answers"][0]["answer"] == first["answer"]
    assert "answers" not in second


async def test_no_answer_lists_no_spans(client):
    body = {"question": QUESTION, "context": "[SEP][CLS][PAD][MASK]", "top_k": 4}
    r = await client.post("/v1/qa", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": "", "start": 0, "end": 0, "score": 0.0, "answers": []}


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"top_k": 0}, "invalid_request"),
        ({"top_k": 21}, "invalid_request"),
        ({"top_k": "3"}, "wrong_type"),
        ({"top_k": True}, "wrong_type"),
        ({"top_k": 2.5}, "wrong_type"),
        ({"max_answer_length": 0}, "invalid_request"),
        ({"max_answer_length": 10**30}, "invalid_request"),
        ({"topk": 3}, "unknown_field"),
    ],
)
async def test_bad_options_are_422_naming_the_field(client, extra, code):
    r = await client.post("/v1/qa", json={"question": QUESTION, "context": CONTEXT, **extra})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert next(iter(extra)) in error["message"]


async def test_the_response_cache_keys_top_k_apart(model_repo):
    """A cached plain answer is never the answer of a top_k request, nor the reverse."""
    from tests.service_support import live_server, make_settings

    settings = make_settings(model_repo, load_models=QA_MODEL, response_cache_mb=1)
    body = {"question": QUESTION, "context": CONTEXT}
    async with live_server(settings) as srv, srv.client() as c:
        plain = await c.post("/v1/qa", json=body)
        listed = await c.post("/v1/qa", json={**body, "top_k": 3})
        again = await c.post("/v1/qa", json=body)
        listed_again = await c.post("/v1/qa", json={**body, "top_k": 3})
    assert "answers" not in plain.json() and "answers" not in again.json()
    assert again.content == plain.content
    assert listed.json()["answers"] and listed_again.content == listed.content
    assert "cache;desc=hit" in again.headers["server-timing"]
    assert "cache;desc=hit" in listed_again.headers["server-timing"]
