"""InProcessQueue without HTTP: admission, deadlines, cancellation, poison input, draining."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

import numpy as np
import pytest

from service.batching import WorkItem
from service.batching.buckets import bucket_index
from service.queueing.base import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceFailedError,
    QueueFullError,
)
from service.queueing.inprocess import InProcessQueue
from service.runtime import load_runners
from tests.service_support import GatedRunner, make_settings, wait_for

MODEL = "polarity-en"


@pytest.fixture(scope="module")
def runners(model_repo):
    from service.repository import discover_models

    entries = [e for e in discover_models(model_repo) if e.name == MODEL]
    return load_runners(make_settings(model_repo), entries=entries)


def item(n: int = 4, deadline_s: float = 30.0, ids=None, lane: str = "predict") -> WorkItem:
    word_ids = np.asarray(ids if ids is not None else [2] * n, dtype=np.int64)
    return WorkItem(
        MODEL, 0, len(word_ids), {"word_ids": word_ids}, time.monotonic() + deadline_s, lane=lane
    )


@contextlib.asynccontextmanager
async def gated_queue(runner, settings):
    """An in-process queue over ``runner`` whose batches wait at a gate (opened on exit)."""
    gated = GatedRunner(runner)
    q = InProcessQueue({MODEL: gated}, settings)
    await q.start()
    try:
        yield q, gated
    finally:
        gated.gate.set()
        await q.close(2)


@pytest.fixture
async def queue(runners, model_repo):
    q = InProcessQueue(runners, make_settings(model_repo, max_queue_depth=4))
    await q.start()
    yield q
    await q.close(2)


async def test_submit_returns_outputs(queue):
    out = await queue.submit(item())
    assert out["logits"].shape == (2,)
    assert await queue.is_ready()


async def test_depth_limit_admits_all_or_nothing(queue):
    queue.pause()
    held = asyncio.create_task(queue.submit_many([item(), item(), item()]))
    await wait_for(lambda: queue.depth(MODEL) == 3)
    with pytest.raises(QueueFullError) as e:
        await queue.submit_many([item(), item()])
    assert e.value.status_code == 429 and e.value.retry_after_s >= 1
    assert "has 3 sequences queued and this request needs 2 more (limit 4)" in str(e.value)
    assert e.value.reason == "queue_full"
    assert queue.depth(MODEL) == 3
    queue.resume()
    assert len(await held) == 3


async def test_work_ahead_longer_than_the_deadline_is_refused_up_front(queue):
    """A request whose deadline is nearer than the time the work queued ahead of it takes
    would only wait to expire (a 504 after holding its connection, on every request of an
    overload): it is refused at once with 429 and the drain time as Retry-After."""
    await queue.submit(item())  # one batch ran: the model has a pace
    assert queue.drain_s(MODEL) == 0
    queue._seq_cost[MODEL] = 100.0  # the measured pace, set: 100 s per sequence
    assert "logits" in await queue.submit(item(deadline_s=1))  # nothing ahead: admitted
    queue._seq_cost[MODEL] = 100.0  # again: that batch moved the average
    queue.pause()
    held = asyncio.create_task(queue.submit_many([item(), item()]))
    await wait_for(lambda: queue.depth(MODEL) == 2)
    wait = queue.drain_s(MODEL, 3)  # the 2 queued, then its own
    assert wait >= 150  # 300 s of work over at most 2 threads
    with pytest.raises(QueueFullError) as e:
        await queue.submit(item(deadline_s=wait / 2))
    assert e.value.status_code == 429 and e.value.retry_after_s >= queue.drain_s(MODEL)
    assert "has 2 sequences running or queued ahead of this request" in str(e.value)
    assert e.value.reason == "queue_full_deadline"  # the metric's reason; the code is the same
    assert queue.depth(MODEL) == 2  # nothing of it was queued
    admitted = asyncio.create_task(queue.submit(item(deadline_s=wait + 30)))
    await wait_for(lambda: queue.depth(MODEL) == 3)
    queue.resume()
    assert len(await held) == 2 and "logits" in await admitted


async def test_a_running_batch_is_work_ahead_too(runners, model_repo):
    """Nothing queued, but a batch running: a request waits for it (threads are busy)."""
    async with gated_queue(runners[MODEL], make_settings(model_repo)) as (q, gated):
        first = asyncio.create_task(q.submit(item()))
        await wait_for(lambda: gated.active == 1)
        q._seq_cost[MODEL] = 100.0  # the measured pace, set: 100 s per sequence
        assert q.depth(MODEL) == 0
        with pytest.raises(QueueFullError, match="1 sequences running or queued ahead"):
            await q.submit(item(deadline_s=50))
        gated.gate.set()
        assert "logits" in await first


async def test_explanations_queued_are_not_ahead_of_a_prediction(queue):
    """Predictions run before explanations: a prediction is not refused for their work."""
    await queue.submit(item())
    queue._seq_cost[MODEL] = 100.0
    queue.pause()
    held = asyncio.create_task(queue.submit_many([item(lane="explain"), item(lane="explain")]))
    await wait_for(lambda: queue.depth(MODEL) == 2)
    pred = asyncio.create_task(queue.submit(item(deadline_s=5)))
    await wait_for(lambda: queue.depth(MODEL) == 3)
    with pytest.raises(QueueFullError):  # an explanation waits behind all of them
        await queue.submit(item(deadline_s=5, lane="explain"))
    queue.resume()
    assert "logits" in await pred and len(await held) == 2


async def test_a_request_refused_for_load_is_not_tokenized(queue):
    """Under overload most requests are refused: tokenizing them first would spend the event
    loop's CPU that admitted requests need (a QA request: ~0.4 ms of ~1 ms)."""
    from pydantic import BaseModel

    from service.tasks.base import Task, run_requests

    class NotToTokenize:
        name = MODEL

        def texts(self, request):
            raise AssertionError("a refused request was read for tokenizing")

        prepare = texts

    queue.pause()
    held = asyncio.create_task(queue.submit_many([item() for _ in range(4)]))
    await wait_for(lambda: queue.depth(MODEL) == 4)
    # Stand-ins for a Task and a request: any use of them but the name fails the test.
    task, request = cast(Task, NotToTokenize()), cast(BaseModel, object())
    with pytest.raises(QueueFullError, match="limit 4"):
        await run_requests(task, queue, [request], time.monotonic() + 30)
    queue.resume()
    assert len(await held) == 4


async def test_expired_deadline_is_refused_up_front(queue):
    with pytest.raises(DeadlineExceededError):
        await queue.submit(item(deadline_s=-1))


async def test_cancelled_request_is_skipped(queue):
    queue.pause()
    ran = len(queue.batch_log)
    t = asyncio.create_task(queue.submit(item()))
    await wait_for(lambda: queue.depth(MODEL) == 1)
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    queue.resume()
    await wait_for(lambda: queue.depth(MODEL) == 0)
    await queue.submit(item())  # a later request runs: the loop skipped, not died
    assert len(queue.batch_log) == ran + 1


@pytest.mark.parametrize("how", ["expired", "cancelled"])
async def test_queue_depth_gauge_drops_work_that_leaves_without_a_batch(runners, model_repo, how):
    """Work that expires or whose request goes away while queued leaves the gauge too, even
    when no batch follows (an idle model must not report phantom depth to the alerts)."""
    from service.metrics import Metrics

    metrics = Metrics()
    q = InProcessQueue(runners, make_settings(model_repo), metrics)
    await q.start()

    def gauge() -> float | None:
        return metrics.registry.get_sample_value(
            "nlpserve_queue_depth", {"model": MODEL, "bucket": "0"}
        )

    try:
        q.pause()
        t = asyncio.create_task(q.submit(item(deadline_s=0.2)))
        await wait_for(lambda: q.depth(MODEL) == 1)
        assert gauge() == 1
        if how == "cancelled":
            t.cancel()
        else:
            await asyncio.sleep(0.3)
        q.resume()
        results = await asyncio.gather(t, return_exceptions=True)
        expected = asyncio.CancelledError if how == "cancelled" else DeadlineExceededError
        assert isinstance(results[0], expected)
        await wait_for(lambda: gauge() == 0)
    finally:
        await q.close(2)


async def test_poison_input_fails_alone_with_422(queue):
    queue.pause()
    good = asyncio.create_task(queue.submit(item()))
    bad = asyncio.create_task(queue.submit(item(ids=[1, 10**9])))
    await wait_for(lambda: queue.depth(MODEL) == 2)
    queue.resume()
    assert "logits" in await good
    with pytest.raises(InferenceFailedError) as e:
        await bad
    assert e.value.status_code == 422


async def test_close_drains_queued_work_then_refuses(runners, model_repo):
    q = InProcessQueue(
        runners, make_settings(model_repo, max_wait_ms=60_000, default_deadline_ms=600_000)
    )
    await q.start()
    q.pause()
    pending = [asyncio.create_task(q.submit(item(n))) for n in (3, 5)]
    await wait_for(lambda: q.depth(MODEL) == 2)
    await q.close(drain_timeout_s=5)  # flushes without waiting for the batch to fill
    outs = await asyncio.gather(*pending)
    assert all("logits" in o for o in outs)
    assert not await q.is_ready()
    with pytest.raises(BackendUnavailableError):
        await q.submit(item())


@pytest.mark.parametrize(
    ("threads", "prefetch", "running", "handed", "waiting"),
    [
        (1, 0, 1, 1, 2),  # one batch at a time, the next formed when it ends
        (1, 1, 1, 2, 1),  # the next batch formed and queued behind the running one
        (2, 0, 2, 2, 1),  # two batches of ONE model at once
    ],
)
async def test_batches_run_and_queue_per_model_up_to_threads_plus_prefetch(
    runners, model_repo, threads, prefetch, running, handed, waiting
):
    settings = make_settings(
        model_repo, max_batch_size=1, inference_threads=threads, prefetch_batches=prefetch
    )
    async with gated_queue(runners[MODEL], settings) as (q, gated):
        pending = [asyncio.create_task(q.submit(item(n))) for n in (3, 4, 5)]
        await wait_for(
            lambda: (
                gated.active == running
                and q.in_flight(MODEL) == handed
                and q.depth(MODEL) == waiting
            )
        )
        gated.gate.set()
        outs = await asyncio.gather(*pending)
        assert all(o["logits"].shape == (2,) for o in outs)
        assert gated.most == running  # never more batches at once than threads
        assert q.in_flight(MODEL) == 0 and q.depth(MODEL) == 0


async def test_idle_thread_runs_at_once_and_only_the_batch_formed_ahead_waits(runners, model_repo):
    """A lone request on an idle model runs without waiting for company (the max wait here
    is a minute); while the thread is busy, the next batch stays open until it is full."""
    settings = make_settings(
        model_repo,
        max_wait_ms=60_000,
        default_deadline_ms=600_000,
        max_batch_size=3,
        inference_threads=1,
        prefetch_batches=1,
    )
    async with gated_queue(runners[MODEL], settings) as (q, gated):
        lone = asyncio.create_task(q.submit(item(3)))
        await wait_for(lambda: gated.active == 1)  # before: held for the 60 s max wait
        later = [asyncio.create_task(q.submit(item(4))) for _ in range(2)]
        await wait_for(lambda: q.depth(MODEL) == 2)
        await asyncio.sleep(0.05)  # the loop had its chances: a batch of 2 is not full
        assert q.in_flight(MODEL) == 1 and q.depth(MODEL) == 2
        later.append(asyncio.create_task(q.submit(item(4))))
        await wait_for(lambda: q.in_flight(MODEL) == 4)  # full: formed and queued behind
        gated.gate.set()
        await asyncio.gather(lone, *later)
        assert [r.size for r in list(q.batch_log)[-2:]] == [1, 3]


async def test_wait_when_idle_holds_a_lone_request_for_company(runners, model_repo):
    settings = make_settings(
        model_repo, max_wait_ms=60_000, default_deadline_ms=600_000, wait_when_idle=True
    )
    q = InProcessQueue(runners, settings)
    await q.start()
    try:
        lone = asyncio.create_task(q.submit(item(3)))
        await wait_for(lambda: q.depth(MODEL) == 1)
        await asyncio.sleep(0.05)  # the loop had its chances: held, though no thread is busy
        assert q.depth(MODEL) == 1 and q.in_flight(MODEL) == 0 and not lone.done()
    finally:
        await q.close(2)  # drains: the held request runs
    assert "logits" in await lone


async def test_a_batch_formed_ahead_is_never_an_explanation(runners, model_repo):
    """Explanations wait while every thread is busy; predictions may queue ahead of them."""
    settings = make_settings(model_repo, max_batch_size=1, inference_threads=1, prefetch_batches=1)
    async with gated_queue(runners[MODEL], settings) as (q, gated):
        first = asyncio.create_task(q.submit(item(3)))
        await wait_for(lambda: gated.active == 1)
        explain = asyncio.create_task(q.submit(item(4, lane="explain")))
        await wait_for(lambda: q.depth(MODEL) == 1)
        await asyncio.sleep(0.05)  # the loop had its chances: the explanation stays queued
        assert q.in_flight(MODEL) == 1 and q.depth(MODEL) == 1
        predict = asyncio.create_task(q.submit(item(5)))
        await wait_for(lambda: q.in_flight(MODEL) == 2)  # formed ahead, behind the first
        assert q.depth(MODEL) == 1  # the explanation still waits
        gated.gate.set()
        await asyncio.gather(first, explain, predict)
        order = [r.lengths[0] for r in list(q.batch_log)[-3:]]
        assert order == [3, 5, 4]  # the prediction that came later ran first


class Overflowing:
    """A real runner whose ``output`` overflows to ``value`` for inputs of one length."""

    def __init__(self, real, output: str, *, length: int, value: float) -> None:
        self.real, self.output, self.length, self.value = real, output, length, value
        self.name = real.name

    def run_batch(self, batch):
        out = self.real.run_batch(batch)
        for it, res in zip(batch, out, strict=True):
            if it.length == self.length:
                res[self.output] = np.full_like(res[self.output], self.value)
        return out


def test_non_finite_outputs_fail_their_item_alone(runners):
    """A NaN output (an fp16 overflow, a diverged model) was answered as `"score": NaN`,
    which no JSON client parses; that item now fails alone as inference_failed."""
    from service.queueing.inprocess import run_batch_isolating

    overflowing = Overflowing(runners[MODEL], "logits", length=3, value=np.nan)
    ok, failed, ok_too = run_batch_isolating(overflowing, [item(4), item(3), item(5)])
    assert isinstance(ok, dict) and isinstance(ok_too, dict)
    assert "logits" in ok and "logits" in ok_too
    assert isinstance(failed, ValueError) and "not a finite number" in str(failed)


def test_a_non_finite_value_in_any_output_fails_the_item(model_repo):
    """QA has two outputs: a NaN only in the second (end_logits) fails its item too."""
    from service.queueing.inprocess import run_batch_isolating
    from service.repository import discover_models
    from tests.service_support import QA_MODEL, require_model

    require_model(model_repo, QA_MODEL)
    entries = [e for e in discover_models(model_repo) if e.name == QA_MODEL]
    real = load_runners(make_settings(model_repo), entries=entries)[QA_MODEL]
    names = [o.name for o in real.manifest.outputs]
    assert names[-1] == "end_logits" and len(names) == 2

    batch = [real.dummy_item(n, 0) for n in (8, 9, 10)]
    ok, failed, ok_too = run_batch_isolating(
        Overflowing(real, "end_logits", length=9, value=np.inf), batch
    )
    assert isinstance(failed, ValueError) and "not a finite number" in str(failed)
    assert isinstance(ok, dict) and isinstance(ok_too, dict)
    assert set(ok) == set(ok_too) == set(names)


@pytest.mark.parametrize("how", ["expired", "cancelled"])
async def test_a_batch_formed_ahead_skips_requests_gone_while_it_waited(runners, model_repo, how):
    """A batch formed ahead queues behind the running one; a request of it that expired or
    left meanwhile is not run when the batch starts (it ran, for nobody, delaying the
    requests still waiting), and its batch mates still get their answers."""
    settings = make_settings(
        model_repo,
        max_wait_ms=60_000,
        default_deadline_ms=600_000,
        max_batch_size=2,
        inference_threads=1,
        prefetch_batches=1,
    )
    async with gated_queue(runners[MODEL], settings) as (q, gated):
        first = asyncio.create_task(q.submit(item(3)))
        await wait_for(lambda: gated.active == 1)
        live = asyncio.create_task(q.submit(item(5)))
        gone = asyncio.create_task(q.submit(item(6, deadline_s=0.2 if how == "expired" else 30)))
        await wait_for(lambda: q.in_flight(MODEL) == 3)  # full: formed ahead, behind `first`
        if how == "cancelled":
            gone.cancel()
        results = await asyncio.gather(gone, return_exceptions=True)
        expected = asyncio.CancelledError if how == "cancelled" else DeadlineExceededError
        assert isinstance(results[0], expected)
        gated.gate.set()
        assert "logits" in await first and "logits" in await live
        assert gated.started == [(3,), (5,)]  # the gone request's sequence never ran
        assert [r.lengths for r in list(q.batch_log)[-2:]] == [(3,), (5,)]


async def test_a_batch_formed_ahead_whose_requests_all_left_does_not_run(runners, model_repo):
    settings = make_settings(model_repo, max_batch_size=1, inference_threads=1, prefetch_batches=1)
    async with gated_queue(runners[MODEL], settings) as (q, gated):
        first = asyncio.create_task(q.submit(item(3)))
        await wait_for(lambda: gated.active == 1)
        doomed = asyncio.create_task(q.submit(item(7, deadline_s=0.2)))
        await wait_for(lambda: q.in_flight(MODEL) == 2)
        with pytest.raises(DeadlineExceededError):
            await doomed
        gated.gate.set()
        await first
        await q.submit(item(4))  # runs after the skipped batch: the loop went on
        assert gated.started == [(3,), (4,)]
        assert q.in_flight(MODEL) == 0


@pytest.fixture(scope="module")
def every_model(model_repo):
    """Every test model at fp32 (int8 answers move with their batch mates), and its task."""
    from service.repository import discover_models
    from service.tasks import build_tasks

    settings = make_settings(model_repo, variant="fp32")
    entries = discover_models(model_repo)
    return load_runners(settings, entries=entries), build_tasks(entries, settings)


@pytest.mark.parametrize("seed", range(4))
async def test_random_mixed_traffic_answers_each_request_as_if_alone(every_model, model_repo, seed):
    """Seeded random requests to every model at once (QA contexts of many windows, batch
    requests, identical texts, a small token budget that splits a request's windows across
    batches), some cancelled while queued: each answer is the one its request gets alone,
    and no batch breaks its size or token budget."""
    import random

    from service.api.schemas import DetectRequest, PolarityRequest, PosRequest, QARequest
    from service.tasks import run_requests

    runners, tasks = every_model
    rng = random.Random(seed)
    settings = make_settings(
        model_repo,
        max_batch_size=rng.randint(2, 8),
        max_batch_tokens=rng.choice([64, 512]),
        min_padding_efficiency=rng.choice([0.0, 0.8]),
        inference_threads=rng.randint(1, 2),
        prefetch_batches=rng.randint(0, 2),
        max_queue_depth=4096,
    )
    words = "the a film good bad , . fun not very is was 中 国 人".split()  # noqa: SIM905
    make = {
        "polarity": lambda t: PolarityRequest(text=t),
        "pos": lambda t: PosRequest(text=t),
        "detect": lambda t: DetectRequest(text=t),
        "qa": lambda t: QARequest(question="谁 是 中 国 人", context=t * rng.randint(1, 20)),
    }
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(12)]
    jobs = []
    for _ in range(40):
        task = tasks[rng.choice(sorted(tasks))]
        jobs.append((task, [make[task.task](rng.choice(texts)) for _ in range(rng.randint(1, 3))]))
    alone, sequences = [], 0
    for task, reqs in jobs:
        prepared = task.prepare(reqs, time.monotonic() + 60, "predict")
        sequences += sum(len(p.items) for p in prepared)
        runner = runners[task.name]
        alone.append(
            [task.decode(p, [runner.run_batch([it])[0] for it in p.items]) for p in prepared]
        )

    q = InProcessQueue(runners, settings)
    await q.start()
    try:
        q.pause()  # everything queued first: the batches mix requests and models
        runs = [
            asyncio.create_task(run_requests(task, q, reqs, time.monotonic() + 30))
            for task, reqs in jobs
        ]
        await wait_for(lambda: q.waiting == sequences)
        cancelled = set(rng.sample(range(len(runs)), 4))
        for i in cancelled:
            runs[i].cancel()
        q.resume()
        got = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        await q.close(5)
    for i, (answers, expected) in enumerate(zip(got, alone, strict=True)):
        if i in cancelled:
            assert isinstance(answers, asyncio.CancelledError)
            continue
        assert not isinstance(answers, BaseException), answers
        for answer, alone_answer in zip(answers, expected, strict=True):
            a, e = answer.model_dump(), alone_answer.model_dump()
            assert a.keys() == e.keys()
            for k in e:
                if isinstance(e[k], float):
                    assert a[k] == pytest.approx(e[k], abs=1e-4), (i, k)
                else:
                    assert a[k] == e[k], (i, k)
    assert len({r.model for r in q.batch_log}) == len(runners)
    for record in q.batch_log:
        policy = settings.batch_policy(runners[record.model].provider)
        assert record.size <= policy.max_batch_size
        if record.size > 1:
            assert record.size * max(record.lengths) <= policy.max_batch_tokens
    assert any(r.size > 1 for r in q.batch_log)  # the test did batch


OTHER = "pos-en"


@pytest.fixture(scope="module")
def two_models(model_repo):
    """polarity-en and pos-en: one to flood, one to serve meanwhile."""
    from service.repository import discover_models

    entries = [e for e in discover_models(model_repo) if e.name in (MODEL, OTHER)]
    return load_runners(make_settings(model_repo), entries=entries)


def other_item(runner, n: int = 4, deadline_s: float = 30.0) -> WorkItem:
    it = runner.dummy_item(n, bucket_index(n, runner.buckets))
    it.deadline = time.monotonic() + deadline_s
    return it


@pytest.mark.parametrize("threads", [1, 2])
async def test_a_model_with_every_thread_busy_does_not_hold_up_another(
    two_models, model_repo, threads
):
    """pos-en's batches hold all its threads, one more is formed ahead and more wait: a
    polarity request meanwhile runs at once, on threads of its own. With one executor for
    every model, its batch queued (FIFO) behind the one pos-en had formed ahead and waited
    for pos-en's running batches to end."""
    settings = make_settings(
        model_repo, max_batch_size=1, inference_threads=threads, prefetch_batches=1
    )
    gated = GatedRunner(two_models[OTHER])
    q = InProcessQueue({OTHER: gated, MODEL: two_models[MODEL]}, settings)
    await q.start()
    try:
        flood = [
            asyncio.create_task(q.submit(other_item(two_models[OTHER], n)))
            for n in range(3, 3 + threads + 3)
        ]
        await wait_for(lambda: gated.active == threads and q.in_flight(OTHER) == threads + 1)
        assert q.depth(OTHER) == 2
        light = asyncio.create_task(q.submit(item()))
        await wait_for(light.done)  # while every pos-en batch still waits at its gate
        assert "logits" in light.result()
        assert gated.active == threads and not any(t.done() for t in flood)
        assert [b.model for b in q.batch_log] == [MODEL]
        gated.gate.set()
        assert len(await asyncio.gather(*flood)) == threads + 3
        assert gated.most == threads  # pos-en itself still ran at most `threads` at once
    finally:
        gated.gate.set()
        await q.close(2)


async def test_a_model_is_not_refused_for_another_models_backlog(two_models, model_repo):
    """Admission is per model: pos-en at its depth limit, with work ahead far longer than any
    deadline at its pace, refuses; polarity, with nothing ahead, admits a short deadline."""
    q = InProcessQueue(two_models, make_settings(model_repo, max_queue_depth=3))
    await q.start()
    try:
        await q.submit(other_item(two_models[OTHER]))
        await q.submit(item())
        q._seq_cost[OTHER] = 100.0  # pos-en's measured pace, set: 100 s per sequence
        q.pause()
        held = asyncio.create_task(
            q.submit_many(
                [
                    other_item(two_models[OTHER]),
                    other_item(two_models[OTHER]),
                    other_item(two_models[OTHER]),
                ]
            )
        )
        await wait_for(lambda: q.depth(OTHER) == 3)
        assert isinstance(q.refuse(OTHER, 1, time.monotonic() + 30), QueueFullError)
        assert q.refuse(MODEL, 1, time.monotonic() + 0.05) is None
        q.resume()
        assert "logits" in await q.submit(item(deadline_s=5))
        assert len(await held) == 3
    finally:
        await q.close(2)
