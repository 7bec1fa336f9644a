"""POST /v1/{detect,polarity}/explain over real HTTP, on the tiny trained models.

Uses the shared in-process server (its ``batch_log`` shows which lane each batch ran in).
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
import pytest_asyncio

from service.api.routes.explain import explain_service, warm_up_explain
from tests.service_support import DETECT_MODEL, POLARITY_MODEL, metric_value, require_model

pytest.importorskip("shap", reason="the explain extra (shap) is not installed")
pytestmark = pytest.mark.asyncio(loop_scope="session")

MACHINE = "additionally it is important to note that overall there are several factors"
HUMAN = "i think my dog ate it lol yeah the bus was late again tbh"
REVIEW = "a truly wonderful and charming film but the plot was dull"
# Fp32 models answer the same whatever the batch; the default CPU variant of the tiny BERT is
# dynamically quantised int8, whose outputs move slightly with the batch (docs/service.md).
SAME_OUTPUT_TOL = 5e-3


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def srv(inprocess_service, model_repo):
    # shap's import and numba JIT happen once per process (seconds): keep them out of tests.
    await warm_up_explain(inprocess_service.app)
    return inprocess_service


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def c(srv):
    async with srv.client() as client:
        yield client


def check_additive(exp: dict, text: str) -> None:
    assert len(exp["tokens"]) == len(exp["values"]) == len(exp["offsets"]) > 0
    assert exp["base_value"] + sum(exp["values"]) == pytest.approx(exp["output"], abs=1e-3)
    assert [text[s:e] for s, e in exp["offsets"]] == exp["tokens"]
    assert 0.0 <= exp["base_value"] <= 1.0 and 0.0 <= exp["output"] <= 1.0


async def test_detector_explanation_is_additive_and_matches_the_prediction(c, model_repo):
    require_model(model_repo, DETECT_MODEL)
    text = f"{HUMAN}. {MACHINE}"
    pred = (await c.post("/v1/detect", json={"text": text})).json()
    r = await c.post("/v1/detect/explain", json={"text": text, "max_evals": 200})
    assert r.status_code == 200, r.text
    exp = r.json()
    check_additive(exp, text)
    assert exp["model"] == DETECT_MODEL and exp["output_name"] == "machine_probability"
    assert exp["output"] == pytest.approx(pred["machine_probability"], abs=SAME_OUTPUT_TOL)
    assert exp["label"] == ("machine" if exp["output"] >= 0.5 else "human")
    assert exp["truncated"] is False and exp["cached"] is False
    assert 0 < exp["evals"] <= 200 + 2  # SHAP's budget (+ f(x) and the all-masked base)
    # Word pieces of the text, in order (lowercased by the tokenizer's normaliser only in ids).
    assert "".join(exp["tokens"]).replace(" ", "") == text.replace(" ", "")


async def test_polarity_explanation_over_words(c, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    pred = (await c.post("/v1/polarity", json={"text": REVIEW})).json()
    r = await c.post("/v1/polarity/explain", json={"text": REVIEW})
    assert r.status_code == 200, r.text
    exp = r.json()
    check_additive(exp, REVIEW)
    assert exp["tokens"] == REVIEW.split()  # the LSTM's own word splitting
    assert exp["output_name"] == "positive_probability"
    assert exp["output"] == pytest.approx(pred["positive_probability"], abs=1e-5)  # fp32


async def test_default_and_limit_of_max_evals(c, srv, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    settings = srv.settings
    r = await c.post("/v1/polarity/explain", json={"text": "a dull film"})
    assert r.status_code == 200 and r.json()["max_evals"] == settings.explain_max_evals_default
    over = settings.explain_max_evals_limit + 1
    r = await c.post("/v1/polarity/explain", json={"text": "a dull film", "max_evals": over})
    assert r.status_code == 422
    assert "limit" in r.json()["error"]["message"]
    r = await c.post("/v1/polarity/explain", json={"text": "a dull film", "max_evals": 1})
    assert r.status_code == 422 and "max_evals" in r.json()["error"]["message"]
    for wrong in (True, "300", 300.5):  # true was read as 1, "300" as 300
        r = await c.post("/v1/polarity/explain", json={"text": "a dull film", "max_evals": wrong})
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_type", r.text
    r = await c.post("/v1/polarity/explain", json={"text": "   "})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_text"
    r = await c.post("/v1/polarity/explain?model=nope", json={"text": "fine"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await c.post("/v1/polarity/explain?max_evals=8", json={"text": "fine"})  # a body field
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_parameter"


async def test_over_long_text_explains_only_what_the_model_reads(c, srv, model_repo):
    require_model(model_repo, DETECT_MODEL)
    max_len = srv.state.tasks[DETECT_MODEL].max_length
    text = " ".join([MACHINE] * max_len)
    r = await c.post("/v1/detect/explain", json={"text": text, "max_evals": 100})
    assert r.status_code == 200, r.text
    exp = r.json()
    assert exp["truncated"] is True
    assert len(exp["tokens"]) == max_len - 2  # [CLS] and [SEP] take two places
    check_additive(exp, text)
    pred = (await c.post("/v1/detect", json={"text": text})).json()
    assert exp["output"] == pytest.approx(pred["machine_probability"], abs=SAME_OUTPUT_TOL)


async def test_cached_by_model_version_text_and_max_evals(c, srv, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    body = {"text": "boring and stale but the cast was great", "max_evals": 64}
    first = (await c.post("/v1/polarity/explain", json=body)).json()
    again = (await c.post("/v1/polarity/explain", json=body)).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["values"] == first["values"] and again["version"] == first["version"]
    other = (await c.post("/v1/polarity/explain", json={**body, "max_evals": 65})).json()
    assert other["cached"] is False
    cache = explain_service(srv.app).cache
    assert len(cache) <= cache.maxsize == srv.settings.explain_cache_size


async def test_masked_variants_run_in_the_explain_lane_in_large_batches(c, srv, model_repo):
    require_model(model_repo, DETECT_MODEL)
    marker = srv.queue.batch_log[-1] if srv.queue.batch_log else None
    text = f"{MACHINE} and {HUMAN} again"
    r = await c.post("/v1/detect/explain", json={"text": text, "max_evals": 300})
    assert r.status_code == 200, r.text
    log = list(srv.queue.batch_log)
    new = log[log.index(marker) + 1 :] if marker in log else log
    explain = [b for b in new if b.model == DETECT_MODEL and b.lane == "explain"]
    assert sum(b.size for b in explain) == r.json()["evals"]
    # SHAP hands the model up to max_batch_size masked texts per call: full batches.
    assert max(b.size for b in explain) == srv.settings.max_batch_size


async def test_explain_burst_does_not_push_predictions_past_their_deadline(c, srv, model_repo):
    """Explanations queue at the lowest priority: while a burst of them keeps the model busy,
    ordinary requests with a 1 s deadline are all answered in time."""
    require_model(model_repo, DETECT_MODEL)
    q = srv.queue

    def explain_batches() -> int:
        return sum(1 for b in q.batch_log if b.lane == "explain")

    limit = srv.settings.explain_max_evals_limit  # the most each explanation may run
    async with srv.client() as burst_client:
        burst = [
            asyncio.create_task(
                burst_client.post(
                    "/v1/detect/explain",
                    json={"text": f"{MACHINE} number {i} {HUMAN}", "max_evals": limit},
                )
            )
            for i in range(6)
        ]
        t0 = time.monotonic()
        while explain_batches() < 5:  # the burst is running
            assert time.monotonic() - t0 < 30, "explanations never started"
            await asyncio.sleep(0.005)
        marker = q.batch_log[-1]
        answers = []
        for wave in range(5):
            answers += await asyncio.gather(
                *(
                    c.post(
                        "/v1/detect",
                        json={"text": f"{HUMAN} {wave} {j}"},
                        headers={"X-Deadline-Ms": "1000"},
                    )
                    for j in range(4)
                )
            )
        log = list(q.batch_log)
        during = log[log.index(marker) + 1 :] if marker in log else log
        still_running = sum(not t.done() for t in burst)
        for t in burst:  # the client goes away: the server stops those explanations
            t.cancel()
        await asyncio.gather(*burst, return_exceptions=True)

    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    # Explanations really were competing for the model the whole time.
    assert any(b.lane == "explain" for b in during)
    assert still_running > 0
    t0 = time.monotonic()
    while explain_service(srv.app)._inflight:
        assert time.monotonic() - t0 < 10, "cancelled explanations kept running"
        await asyncio.sleep(0.02)


async def test_without_shap_the_endpoints_answer_501(c, model_repo, monkeypatch):
    require_model(model_repo, POLARITY_MODEL)
    monkeypatch.setitem(sys.modules, "shap", None)  # as if not installed
    r = await c.post("/v1/polarity/explain", json={"text": "a film nobody explained before"})
    assert r.status_code == 501
    assert r.json()["error"]["code"] == "explain_unavailable"
    assert "shap" in r.json()["error"]["message"]


async def test_explanations_work_on_every_queue_backend(service, client, model_repo):
    """The explain lane through whichever queue backend the session runs (in-process, Redis)."""
    require_model(model_repo, POLARITY_MODEL)
    await warm_up_explain(service.app)
    text = "stale and clumsy but truly charming"
    pred = (await client.post("/v1/polarity", json={"text": text})).json()
    r = await client.post("/v1/polarity/explain", json={"text": text, "max_evals": 50})
    assert r.status_code == 200, r.text
    check_additive(r.json(), text)
    assert r.json()["output"] == pytest.approx(pred["positive_probability"], abs=1e-5)


async def test_explanations_have_their_own_endpoint_label_in_request_metrics(c, model_repo):
    # Multi-second explanations must not blur the prediction latency series.
    require_model(model_repo, POLARITY_MODEL)

    async def counts() -> tuple[float, ...]:
        text = (await c.get("/metrics")).text
        predict, explain = (
            metric_value(
                text, "nlpserve_request_duration_seconds_count", model=POLARITY_MODEL, endpoint=e
            )
            for e in ("predict", "explain")
        )
        # nor are its masked variants predictions or inputs of the drift series
        answered = metric_value(text, "nlpserve_predictions_total", model=POLARITY_MODEL)
        read = metric_value(text, "nlpserve_input_tokens_count", model=POLARITY_MODEL)
        return predict, explain, answered, read

    before = await counts()
    r = await c.post("/v1/polarity/explain", json={"text": "a moving and clever film"})
    assert r.status_code == 200, r.text
    assert r.json()["cached"] is False and r.json()["evals"] > 1  # its variants ran
    after = await counts()
    assert after == (before[0], before[1] + 1, *before[2:])


ENDPOINTS = [("detect", DETECT_MODEL), ("polarity", POLARITY_MODEL)]


@pytest.mark.parametrize("task, model", ENDPOINTS)
@pytest.mark.parametrize("text", ["a " * 10001, "x" * 20001], ids=["many-words", "one-word"])
async def test_over_long_text_is_rejected_like_the_prediction_endpoint(
    c, model_repo, task, model, text
):
    """The client's text is held to the predict endpoints' limit, with their code and message
    (naming the client's field, not an internal batch position)."""
    require_model(model_repo, model)
    pred = await c.post(f"/v1/{task}", json={"text": text})
    assert pred.status_code == 422 and pred.json()["error"]["code"] == "text_too_long"
    r = await c.post(f"/v1/{task}/explain", json={"text": text, "max_evals": 20})
    assert r.status_code == 422, r.text
    assert r.json() == pred.json()
    assert r.json()["error"]["message"].startswith(f"text has {len(text)} characters; ")


@pytest.mark.parametrize("task, model", ENDPOINTS)
async def test_a_text_at_the_limit_is_explainable_though_masking_lengthens_it(
    c, srv, model_repo, task, model
):
    """Masked variants are the service's own texts: masking a one-character token ("!" ->
    "[MASK] ") makes a variant longer than the client's text, and that must not fail it."""
    require_model(model_repo, model)
    limit = srv.settings.max_text_chars
    specials = 2 if task == "detect" else 0  # [CLS] and [SEP]
    n = srv.state.tasks[model].max_length - specials  # every token is read and explained
    text = "!" * (n - 1) + " " + "a" * (limit - n)  # n tokens: n - 1 "!" and one long word
    assert len(text) == limit
    pred = await c.post(f"/v1/{task}", json={"text": text})
    assert pred.status_code == 200, pred.text
    r = await c.post(f"/v1/{task}/explain", json={"text": text, "max_evals": 40})
    assert r.status_code == 200, r.text
    exp = r.json()
    assert len(exp["tokens"]) == n and exp["truncated"] is False
    check_additive(exp, text)


async def test_explains_under_a_queue_depth_smaller_than_a_batch(model_repo):
    """SHAP's batches of masked texts are cut to what the queue admits at once."""
    from tests.service_support import live_server, make_settings

    require_model(model_repo, POLARITY_MODEL)
    text = "a dull and tedious film with a weak plot , flat acting and far too many scenes"
    async with live_server(make_settings(model_repo, max_queue_depth=8)) as s, s.client() as c:
        r = await c.post("/v1/polarity/explain", json={"text": text, "max_evals": 100})
        assert r.status_code == 200, r.text
        check_additive(r.json(), text)


async def test_explain_of_a_task_without_explanations_is_a_404_that_says_which_have(c):
    """/v1/pos/explain was a bare 404, and counted in /metrics as an explain request of pos-en."""
    r = await c.post("/v1/pos/explain", json={"text": "a test"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "/v1/detect/explain and /v1/polarity/explain" in r.json()["error"]["message"]
    text = (await c.get("/metrics")).text
    assert 'endpoint="explain",model="pos-en"' not in text
    assert not [line for line in text.splitlines() if "explain" in line and "pos-en" in line]


async def test_explain_warmup_setting_imports_shap_at_startup(model_repo):
    """NLPSERVE_EXPLAIN_WARMUP=1: startup begins the shap warm-up without any request."""
    from tests.service_support import live_server, make_settings

    async with live_server(make_settings(model_repo, explain_warmup=True)) as server:
        service = explain_service(server.app)
        assert service._warm is not None  # started by startup, not by a request
        await asyncio.wait_for(asyncio.shield(service._warm), 60)
    async with live_server(make_settings(model_repo)) as server:
        assert getattr(server.app.state, "explain", None) is None


async def test_a_character_the_tokenizer_splits_into_several_tokens_is_one_feature(c, model_repo):
    """NFKC turns "㍻" into two characters, two tokens that both map back to it: SHAP sees one
    feature there, and the explanation had one value per feature but an offset per token (a
    500: 'SHAP returned 3 values for 4 tokens', or an IndexError in SHAP's masker)."""
    require_model(model_repo, DETECT_MODEL)
    text = "㍻ is it"
    pred = (await c.post("/v1/detect", json={"text": text})).json()
    r = await c.post("/v1/detect/explain", json={"text": text, "max_evals": 40})
    assert r.status_code == 200, r.text
    exp = r.json()
    assert exp["tokens"] == ["㍻", "is", "it"] and exp["offsets"] == [[0, 1], [2, 4], [5, 7]]
    check_additive(exp, text)
    assert exp["output"] == pytest.approx(pred["machine_probability"], abs=SAME_OUTPUT_TOL)


AWKWARD_TEXTS = {
    "repeats-and-whitespace": "good  good\t\tgood\n\n good  dull dull",
    "non-ascii": "  café naïve 😀 film ㍻ 좀 더  ",
    "over-long": "a wonderful film , dull plot . " * 40,
}


@pytest.mark.parametrize("task, model", ENDPOINTS)
@pytest.mark.parametrize("text", AWKWARD_TEXTS.values(), ids=AWKWARD_TEXTS.keys())
async def test_values_add_up_and_map_onto_the_text_on_awkward_texts(
    c, srv, model_repo, task, model, text
):
    """Local accuracy to float precision, one value per token shown, each token where its
    offsets say, the tokens in order covering what the model reads (a cut text: up to the
    last token it reads), and the prediction the predict endpoint gives."""
    require_model(model_repo, model)
    field = "machine_probability" if task == "detect" else "positive_probability"
    pred = (await c.post(f"/v1/{task}", json={"text": text})).json()
    r = await c.post(f"/v1/{task}/explain", json={"text": text, "max_evals": 60})
    assert r.status_code == 200, r.text
    exp = r.json()
    check_additive(exp, text)
    assert exp["base_value"] + sum(exp["values"]) == pytest.approx(exp["output"], abs=1e-9)
    starts = [s for s, _ in exp["offsets"]]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    explained = text[: exp["offsets"][-1][1]]
    assert "".join(explained.split()) == "".join(exp["tokens"])  # nothing skipped or doubled
    assert exp["truncated"] is pred["truncated"] is (explained.strip() != text.strip())
    tol = SAME_OUTPUT_TOL if task == "detect" else 1e-6  # int8 vs fp32 (see above)
    assert exp["output"] == pytest.approx(pred[field], abs=tol)
    assert exp["label"] == pred["label"] or abs(pred[field] - 0.5) < tol


async def test_a_one_token_explanation_scores_the_text_alone_like_the_predict_endpoint(model_repo):
    """A one-token text was scored in one batch with its all-masked variant, and the int8
    detector's activation scales are per batch: its `output` was not the prediction (0.4423
    against 0.4434 for "lol" on the tiny detector; 0.1345 against 0.1573 for "!" on the
    committed one). Each is now scored alone, as a lone prediction is."""
    from tests.service_support import live_server, make_settings

    require_model(model_repo, DETECT_MODEL)
    async with live_server(make_settings(model_repo)) as s, s.client() as c:
        for text in ("additionally", "lol", "the", "!"):
            pred = (await c.post("/v1/detect", json={"text": text})).json()
            r = await c.post("/v1/detect/explain", json={"text": text, "max_evals": 10})
            assert r.status_code == 200, r.text
            exp = r.json()
            assert exp["output"] == pytest.approx(pred["machine_probability"], abs=1e-12), text
            assert exp["base_value"] + sum(exp["values"]) == pytest.approx(exp["output"], abs=1e-12)
