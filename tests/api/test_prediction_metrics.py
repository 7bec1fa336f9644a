"""The prediction and input series (nlpserve_predictions_total, nlpserve_prediction_confidence,
nlpserve_input_tokens, nlpserve_input_truncated_total) over real HTTP, once per queue backend:
each answered item counted once (batches, /v1 and /v2 alike), with the model's own labels and
its answers' confidence; QA's no-answer; POS counted as input only; refused items not at all.
The response cache's rule is in tests/api/test_response_cache.py, a reclaimed Redis entry's in
tests/redis_backend/test_redis_processes.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from service.repository.manifest import MANIFEST_FILE
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Delta:
    """What the series moved by between two scrapes of the server's /metrics."""

    def __init__(self, before: str, after: str) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return metric_value(self.after, name, **labels) - metric_value(self.before, name, **labels)

    def series_labels(self, name: str, model: str) -> set[str]:
        """The ``label`` values of ``name``'s series of ``model`` after."""
        out = set()
        for line in self.after.splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                out.add(line.split('label="', 1)[1].split('"', 1)[0])
        return out


async def test_classifier_items_are_counted_once_with_their_label_and_confidence(client, service):
    task = service.state.tasks[POLARITY_MODEL]
    words = ["superb and fresh", "awful and stale", "the movie was brilliant"]
    long_text = " ".join(["great"] * (task.max_length + 10))
    before = await read_metrics(client)
    batch = await client.post("/v1/polarity", json={"inputs": [{"text": t} for t in words]})
    single = await client.post("/v1/polarity", json={"text": long_text})
    v2 = await client.post(
        f"/v2/models/{POLARITY_MODEL}/infer",
        json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": words[:2]}]},
    )
    # refused items (one bad item refuses its whole batch) are answered nothing: not counted
    refused = await client.post("/v1/polarity", json={"inputs": [{"text": "fine"}, {"text": ""}]})
    after = await read_metrics(client)
    assert batch.status_code == single.status_code == v2.status_code == 200, (batch.text, v2.text)
    assert refused.status_code == 422
    d = Delta(before, after)

    v1 = [*batch.json()["outputs"], single.json()]
    v2_out = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    labels = [o["label"] for o in v1] + v2_out["label"]
    # the top class's probability: P(positive) or 1 - P(positive) (a binary model)
    top = [max(o["positive_probability"], 1 - o["positive_probability"]) for o in v1]
    top += v2_out["probability"]
    assert len(labels) == 6
    for label in task.labels:
        got = d("nlpserve_predictions_total", model=POLARITY_MODEL, label=label)
        assert got == labels.count(label), label
    assert d.series_labels("nlpserve_predictions_total", POLARITY_MODEL) <= set(task.labels)
    assert d("nlpserve_prediction_confidence_count", model=POLARITY_MODEL) == 6
    got_sum = d("nlpserve_prediction_confidence_sum", model=POLARITY_MODEL)
    assert got_sum == pytest.approx(sum(top), abs=1e-5)
    assert all(p >= 0.5 for p in top)
    assert d("nlpserve_prediction_confidence_bucket", model=POLARITY_MODEL, le="0.4") == 0

    # inputs: as read (the long text: max_length, and cut)
    assert d("nlpserve_input_tokens_count", model=POLARITY_MODEL) == 6
    want_tokens = 3 + 3 + 4 + task.max_length + 3 + 3
    assert d("nlpserve_input_tokens_sum", model=POLARITY_MODEL) == want_tokens
    assert d("nlpserve_input_truncated_total", model=POLARITY_MODEL) == 1


async def test_detect_in_windows_is_one_item_read_whole(client, service):
    """windows: true: one prediction, and one input observation of every window's tokens
    (specials of each included), never truncated, however many windows it took."""
    task = service.state.tasks[DETECT_MODEL]
    text = " ".join(["the committee met on a quiet tuesday morning"] * task.max_length)
    (windows,) = task.encoder.encode_windows([text])
    assert len(windows) > 3
    before = await read_metrics(client)
    r = await client.post("/v1/detect", json={"text": text, "windows": True})
    after = await read_metrics(client)
    assert r.status_code == 200, r.text
    out = r.json()
    d = Delta(before, after)
    assert d("nlpserve_predictions_total", model=DETECT_MODEL, label=out["label"]) == 1
    assert d("nlpserve_prediction_confidence_count", model=DETECT_MODEL) == 1
    assert d("nlpserve_input_tokens_count", model=DETECT_MODEL) == 1
    want = sum(len(w.encoding) for w in windows)
    assert d("nlpserve_input_tokens_sum", model=DETECT_MODEL) == want > task.max_length
    assert d("nlpserve_input_truncated_total", model=DETECT_MODEL) == 0


async def test_pos_counts_inputs_and_no_predictions(client):
    sentences = [["She", "likes", "red", "cars", "."], ["Dogs", "run"]]
    before = await read_metrics(client)
    r = await client.post("/v1/pos", json={"inputs": [{"tokens": s} for s in sentences]})
    too_long = await client.post("/v1/pos", json={"tokens": ["word"] * 10_000})
    after = await read_metrics(client)
    assert r.status_code == 200, r.text
    assert too_long.status_code == 422  # refused, never cut: nothing truncated
    d = Delta(before, after)
    assert d("nlpserve_input_tokens_count", model=POS_MODEL) == 2
    assert d("nlpserve_input_tokens_sum", model=POS_MODEL) == 7
    assert metric_value(after, "nlpserve_input_truncated_total", model=POS_MODEL) == 0
    assert 'nlpserve_predictions_total{model="pos-en"' not in after
    assert 'nlpserve_prediction_confidence_count{model="pos-en"' not in after


async def test_qa_counts_answers_no_answers_and_cut_questions(client, service, model_repo):
    require_model(model_repo, QA_MODEL)
    task = service.state.tasks[QA_MODEL]
    context = "中国的首都是北京，它有三千多年的历史。"
    question = "中国的首都是哪里？"
    long_question = question * (task.encoder.max_query_length // 4 + 1)  # tokens: 1 a character
    items = [
        {"question": question, "context": context},
        {"question": question, "context": "[SEP][CLS][PAD][MASK]"},  # no span can be the answer
        {"question": long_question, "context": context},
    ]
    before = await read_metrics(client)
    r = await client.post("/v1/qa", json={"inputs": items})
    after = await read_metrics(client)
    assert r.status_code == 200, r.text
    d = Delta(before, after)
    outputs = r.json()["outputs"]
    answered = [o for o in outputs if o["answer"]]
    assert outputs[1]["answer"] == "" and len(answered) == 2
    assert d("nlpserve_predictions_total", model=QA_MODEL, label="answer") == 2
    assert d("nlpserve_predictions_total", model=QA_MODEL, label="no_answer") == 1
    assert d.series_labels("nlpserve_predictions_total", QA_MODEL) == {"answer", "no_answer"}
    # the no-answer's score (0 by definition) is no confidence: not observed
    assert d("nlpserve_prediction_confidence_count", model=QA_MODEL) == 2
    got_sum = d("nlpserve_prediction_confidence_sum", model=QA_MODEL)
    assert got_sum == pytest.approx(sum(o["score"] for o in answered), abs=1e-5)
    assert d("nlpserve_input_tokens_count", model=QA_MODEL) == 3
    assert d("nlpserve_input_truncated_total", model=QA_MODEL) == 1  # the long question
    # the question's tokens before the cut are counted: more than the model may read
    assert d("nlpserve_input_tokens_sum", model=QA_MODEL) > 2 * len(context) + len(long_question)


async def test_a_request_answered_with_an_error_counts_no_inputs(model_repo):
    """A batch whose first items the model read, then answered 504 (its last item waited on
    an identical item's run for another request, past its deadline): the client got no
    answer, so nothing is counted, inputs included (docs/service.md, "Predictions and
    inputs"). The other request's lone long item waits for batch company (wait_when_idle,
    a long max wait) while the batch's two short items fill a batch of two and run."""
    settings = make_settings(
        model_repo,
        load_models=POLARITY_MODEL,
        response_cache_mb=1,
        wait_when_idle=True,
        max_wait_ms=3000,
        max_batch_size=2,
        buckets={POLARITY_MODEL: [8, 64]},
    )
    long_text = " ".join(["good", "film"] * 15)  # the second bucket
    async with live_server(settings) as srv, srv.client() as c:
        before = await read_metrics(c)
        first = asyncio.create_task(c.post("/v1/polarity", json={"text": long_text}))
        await wait_for(lambda: srv.queue.depth(POLARITY_MODEL) == 1)
        items = [{"text": "fine"}, {"text": "dull"}, {"text": long_text}]
        batch = await c.post(
            "/v1/polarity", json={"inputs": items}, headers={"X-Deadline-Ms": "1000"}
        )
        assert batch.status_code == 504, batch.text
        assert not first.done()  # the long item still waits for company
        after = await read_metrics(c)
        answered = await first
    assert answered.status_code == 200, answered.text
    d = Delta(before, after)
    assert d("nlpserve_batch_size_sum", model=POLARITY_MODEL) == 2  # the short items ran
    assert d("nlpserve_predictions_total", model=POLARITY_MODEL) == 0
    assert d("nlpserve_input_tokens_count", model=POLARITY_MODEL) == 0


async def test_a_model_without_a_positive_label_observes_no_confidence_on_any_protocol(
    model_repo: Path, tmp_path: Path
):
    """Confidence is observed for two-label models whose answer carries it (P(positive)):
    the polarity model with its labels renamed has none on /v1, and the same item on /v2
    (whose row has the label's probability) must not be observed either, or the series
    would depend on the protocol the clients use."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / POLARITY_MODEL / "1", repo / POLARITY_MODEL / "1")
    path = repo / POLARITY_MODEL / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["labels"] = ["bad", "good"]
    path.write_text(json.dumps(manifest))
    text = "superb and fresh"
    v2_body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    async with live_server(make_settings(repo)) as srv, srv.client() as c:
        before = await read_metrics(c)
        v1 = await c.post("/v1/polarity", json={"text": text})
        v2 = await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=v2_body)
        after = await read_metrics(c)
    assert v1.status_code == v2.status_code == 200, (v1.text, v2.text)
    label = v1.json()["label"]
    assert label in ("bad", "good")
    d = Delta(before, after)
    assert d("nlpserve_predictions_total", model=POLARITY_MODEL, label=label) == 2
    assert d("nlpserve_prediction_confidence_count", model=POLARITY_MODEL) == 0
