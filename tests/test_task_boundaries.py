"""Tasks' limits and post-processing at their boundaries, on the tiny real models (no server).

Found by a mutation audit: each test pins one boundary no other test did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from tokenizers import Encoding

from service.api import schemas as sc
from service.preprocess.classify import ClassifyWindow
from service.repository import discover_models
from service.tasks import build_tasks
from service.tasks.base import InputError
from service.tasks.detect import DetectTask
from service.tasks.qa import QATask
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    QA_MODEL,
    make_settings,
    require_model,
)


@pytest.fixture(scope="module")
def tasks(model_repo):
    return build_tasks(discover_models(model_repo), make_settings(model_repo, max_text_chars=1000))


def test_polarity_truncates_only_past_max_length_and_keeps_the_head(tasks):
    task = tasks[POLARITY_MODEL]
    top = task.max_length
    fun, dull = (task.encoder.encode_texts([w])[0].word_ids[0] for w in ("fun", "dull"))
    assert fun != dull  # distinct words, so the head and the tail differ

    (exact,) = task.prepare([sc.PolarityRequest(text="fun " * top)], 1e12, "predict")
    assert exact.truncated is False and exact.items[0].length == top == exact.tokens

    text = "fun " * top + "dull " * 5
    (cut,) = task.prepare([sc.PolarityRequest(text=text)], 1e12, "predict")
    assert cut.truncated is True and cut.items[0].length == top == cut.tokens  # as read
    assert cut.items[0].features["word_ids"].tolist() == [fun] * top  # the first tokens


def test_the_character_limit_is_inclusive(tasks):
    task = tasks[POLARITY_MODEL]
    limit = task.settings.max_text_chars
    task.check_length("a" * limit)
    with pytest.raises(InputError) as e:
        task.check_length("a" * (limit + 1))
    assert e.value.code == "text_too_long"


def test_qa_answers_no_longer_than_the_manifests_max_answer_length(tasks, model_repo):
    require_model(model_repo, QA_MODEL)
    task = tasks[QA_MODEL]
    limit = task.manifest.preprocessing.max_answer_length
    assert limit is not None and limit < 30  # a manifest value, not the task's default
    context = "中国的首都是北京它有三千多年的历史李白是唐代著名诗人"
    (prepared,) = task.prepare([sc.QARequest(question="谁？", context=context)], 1e12, "predict")
    (win,) = prepared.meta["windows"]
    lo = win.context_start
    start, end = np.zeros(len(win), np.float32), np.zeros(len(win), np.float32)
    start[lo + 5], end[lo + 5 + limit] = 9.0, 9.0  # limit + 1 tokens: too long
    start[lo], end[lo + 2] = 5.0, 5.0  # 3 tokens: the answer (no cross pair is valid)
    got = task.decode(prepared, [{"start_logits": start, "end_logits": end}])
    want = context[int(win.offsets[lo, 0]) : int(win.offsets[lo + 2, 1])]
    assert got.answer == want and len(want) == 3


def test_qa_counts_a_question_cut_only_past_max_query_length(tasks, model_repo):
    """nlpserve_input_truncated_total's QA boundary: a question of max_query_length tokens is
    read whole, one more is cut; tokens count the question before the cut and the context."""
    require_model(model_repo, QA_MODEL)
    task = tasks[QA_MODEL]
    top = task.encoder.max_query_length
    tok = task.encoder.tokenizer
    context = "中国的首都是北京。"

    def n_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    question = "北" * top
    assert n_tokens(question) == top  # one token a character
    for q, cut in ((question, False), (question + "京", True)):
        (p,) = task.prepare([sc.QARequest(question=q, context=context)], 1e12, "predict")
        assert p.truncated is cut
        assert p.tokens == n_tokens(q) + n_tokens(context)
        assert p.meta["windows"][0].context_start == top + 2  # [CLS] question [SEP], as read


def test_qa_refuses_a_request_over_its_windows_before_tokenizing_it_all(model_repo):
    """48 contexts of 20,000 characters (~5,000 windows) were all tokenized and cut, up to
    ~3.4 s of CPU, to answer a 422 that the first few decide: items are tokenized in chunks
    of 8, 16, 32..., counted against NLPSERVE_MAX_REQUEST_SEQUENCES after each."""
    require_model(model_repo, QA_MODEL)
    settings = make_settings(model_repo, max_request_sequences=64, max_batch_items=64)
    task = build_tasks(discover_models(model_repo, select={QA_MODEL: None}), settings)[QA_MODEL]
    assert isinstance(task, QATask)
    tokenized: list[int] = []
    tokenize = task.encoder.tokenize

    def counting(
        questions: Sequence[str], contexts: Sequence[str]
    ) -> list[tuple[Encoding, Encoding]]:
        tokenized.append(len(contexts))
        return tokenize(questions, contexts)

    context = "中国的首都是北京，它有三千多年的历史。" * 8  # a few windows each
    per_item = len(task.encoder.encode("首都？", context))
    assert 2 <= per_item <= 8
    task.encoder.tokenize = counting  # type: ignore[method-assign]
    requests = [sc.QARequest(question="首都？", context=context)] * 64
    with pytest.raises(InputError) as refused:
        task.prepare(requests, 1e12, "predict")
    assert refused.value.code == "input_too_long"
    assert "needs at least" in refused.value.message  # the rest was not counted
    assert sum(tokenized) < 64 and tokenized[0] == 8
    # nlpserve predict's lines are each a request of their own: encoded at once, not refused
    tokenized.clear()
    lines = task.prepare(requests, 1e12, "predict", enforce_limits=False)
    assert len(lines) == 64 and tokenized == [64]
    # a request within the limit is encoded whole, its windows as one call cuts them
    tokenized.clear()
    few = requests[: 64 // per_item]
    prepared = task.prepare(few, 1e12, "predict")
    assert [len(p.items) for p in prepared] == [per_item] * len(few)


def test_detect_refuses_a_request_over_its_windows_before_tokenizing_it_all(model_repo):
    """As QA's: 48 texts of 20,000 characters read in windows (~1,900 windows) were all
    tokenized (~0.45 s of CPU) to answer a 422 that the first few decide."""
    require_model(model_repo, DETECT_MODEL)
    settings = make_settings(model_repo, max_request_sequences=64, max_batch_items=64)
    built = build_tasks(discover_models(model_repo, select={DETECT_MODEL: None}), settings)
    task = built[DETECT_MODEL]
    assert isinstance(task, DetectTask)
    tokenized: list[int] = []
    encode_windows = task.encoder.encode_windows

    def counting(texts: Sequence[str]) -> list[list[ClassifyWindow]]:
        tokenized.append(len(texts))
        return encode_windows(texts)

    text = "the committee met on a quiet tuesday morning " * 8  # a few windows each
    per_item = len(encode_windows([text])[0])
    assert 2 <= per_item <= 8
    task.encoder.encode_windows = counting  # type: ignore[method-assign]
    requests = [sc.DetectRequest(text=text, windows=True)] * 64
    with pytest.raises(InputError) as refused:
        task.prepare(requests, 1e12, "predict")
    assert refused.value.code == "input_too_long"
    assert "needs at least" in refused.value.message  # the rest was not counted
    assert sum(tokenized) < 64 and tokenized[0] == 8
    # a request within the limit is encoded whole, plain items one sequence each
    tokenized.clear()
    few = [sc.DetectRequest(text="a plain one"), *requests[: 64 // per_item - 1]]
    prepared = task.prepare(few, 1e12, "predict")
    assert [len(p.items) for p in prepared] == [1] + [per_item] * (len(few) - 1)
    # nlpserve predict's lines (each a request of its own) are encoded at once
    tokenized.clear()
    assert len(task.prepare(requests, 1e12, "predict", enforce_limits=False)) == 64
    assert tokenized == [64]


@pytest.mark.parametrize(
    "answer",
    [
        sc.PosResponse(tokens=["The", "dog"], tags=["DT", "NN"]),
        sc.DetectResponse(label="machine", machine_probability=0.9, truncated=False),
        sc.QAResponse(answer="x", start=0, end=1, score=0.5),
    ],
    ids=lambda a: type(a).__name__,
)
def test_an_answer_without_options_is_dumped_without_running_python(answer):
    """The event loop dumps every item's answer: one without the option fields is dumped by
    pydantic-core alone (a model serializer that left them out ran Python for each, ~0.8 us,
    twice a plain dump), and still leaves them out (never null); asked, they are there."""
    import sys

    called: list[str] = []

    def profile(frame, event, _):  # Python frames only ("c_call" is a builtin's)
        if event == "call":
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        dumped = type(answer).__pydantic_serializer__.to_python(answer)
    finally:
        sys.setprofile(None)
    assert called == []
    asked = {"PosResponse": "scores", "DetectResponse": "windows", "QAResponse": "answers"}
    field = asked[type(answer).__name__]
    assert field not in dumped and field not in answer.model_dump_json()
    empty = answer.model_copy(update={field: []})  # asked, nothing to list: [] (QA's no answer)
    assert empty.model_dump()[field] == []
