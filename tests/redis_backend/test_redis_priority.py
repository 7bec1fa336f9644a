"""Priority classes in Redis mode, end to end: a real API replica (HTTP), a real worker whose
one thread is held at a gate, real Redis. A keys-file batch client's request, queued before
an interactive one and even sent with ``X-Priority: interactive``, runs after it; the
metrics show the batch lane's backlog; a starved one ends at its deadline (504). A flood of
batch-priority entries filling the worker's prefetch does not keep an interactive one in
Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from service.batching.scheduler import BATCH_LANE, PREDICT_LANE
from service.queueing.redis_keys import stream_labels
from service.worker import StreamItem, Worker
from tests.redis_backend.helpers import api_queue, make_item, running_worker, wait_for
from tests.service_support import GatedRunner, live_server, metric_value, read_metrics

POL = "polarity-en"
BULK_KEY, WEB_KEY = "b" * 32, "w" * 32


async def test_batch_client_runs_after_interactive_and_starves_to_504(
    make_settings, tiny_runners, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"bulk {BULK_KEY} priority=batch\nweb {WEB_KEY}\n")
    settings = make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        api_keys_file=keys,
        load_models=POL,
    )
    gated = GatedRunner(tiny_runners[POL])
    web = {"X-API-Key": WEB_KEY}
    bulk = {"X-API-Key": BULK_KEY, "X-Priority": "interactive"}  # cannot raise itself

    def post(c, text: str, headers: dict[str, str]):
        return asyncio.create_task(c.post("/v1/polarity", json={"text": text}, headers=headers))

    async with (
        running_worker(settings, {POL: gated}) as w,
        live_server(settings) as srv,
        srv.client() as c,
    ):
        try:
            first = post(c, "a b c", web)
            await wait_for(lambda: gated.active == 1)
            batch = post(c, "a b c d", bulk)
            await wait_for(lambda: w.schedulers[POL].depth(lane="batch") == 1)
            text = await read_metrics(c)
            assert metric_value(text, "nlpserve_queue_lane_depth", model=POL, lane="batch") == 1
            later = post(c, "a b c d e", web)
            await wait_for(lambda: w.batches_in_flight == 2)  # formed ahead of the batch one
            starved = post(c, "a b c d e f", {**bulk, "X-Deadline-Ms": "300"})
            r = await starved
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        finally:
            gated.gate.set()
        for t in (first, later, batch):
            assert (await t).status_code == 200
    lengths = [s[0] for s in gated.started]
    assert len(lengths) == 3  # the starved one never ran
    assert lengths[0] < lengths[2] < lengths[1]  # first, later (interactive), then the batch one


async def test_an_interactive_entry_is_read_and_runs_next_while_batch_entries_fill_the_prefetch(
    make_settings, tiny_runners
) -> None:
    """A worker holds at most ``worker_prefetch`` (2) entries of its model; batch-priority
    entries fill it, with more of them in Redis, one batch at a time let through. An
    interactive entry queued then is read at once (interactive entries have a room of their
    own) and formed ahead, so it runs right after the batch running when it came. It used to
    wait in Redis until a batch freed room, and then behind the batch already formed from the
    batch entries held (third, not second)."""
    settings = make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        worker_prefetch=2,
        redis_read_count=2,
        load_models=POL,
    )
    stepped = GatedRunner(tiny_runners[POL])
    runners = {POL: stepped}
    rng = np.random.default_rng(37)
    backlog = [make_item(tiny_runners[POL], n, rng) for n in range(3, 11)]
    for it in backlog:
        it.lane = BATCH_LANE
    urgent = make_item(tiny_runners[POL], 2, rng)  # the only one of length 2
    async with api_queue(settings, runners) as q, running_worker(settings, runners) as w:
        # the replica saw the worker read the batch lane (else batch work goes to predict)
        await wait_for(
            lambda: q.model_workers_alive.get(POL) == 1 and q._lane_read(POL, BATCH_LANE)
        )
        tasks = [asyncio.create_task(q.submit(it)) for it in backlog]
        answer = None
        try:
            await wait_for(lambda: stepped.active == 1 and len(w._in_hand) == 2)
            answer = asyncio.create_task(q.submit(urgent))
            # read though the prefetch is full of batch entries, and formed ahead of them
            await wait_for(lambda: w.batches_in_flight == 2, timeout=5)
            stepped.step()  # the batch running when it came
            await wait_for(lambda: len(stepped.started) == 2)
            assert stepped.started[1] == (urgent.length,), stepped.started
            stepped.step()
            await asyncio.wait_for(answer, 10)
            assert sum(t.done() for t in tasks) <= 1  # the backlog still waits
        finally:
            stepped.gate.set()
            left = [*tasks, *([answer] if answer is not None else [])]
            done = await asyncio.wait_for(asyncio.gather(*left, return_exceptions=True), 20)
    assert not [r for r in done if isinstance(r, BaseException)]
    assert sorted(stepped.started) == sorted((it.length,) for it in [*backlog, urgent])


def test_rooms_count_the_entries_held_by_their_streams_without_reading_them(
    make_settings, tiny_runners
) -> None:
    """``_rooms`` runs before every read, and after each settle beside a blocked one. It went
    over every entry held in Python (its model, its stream, two Counters): ~0.1 ms a call at
    4 models x 64 held, 6x the count by model it replaced. The entries are now counted by
    their keys' streams, without reading one; the rooms are still the documented ones."""
    reads = 0

    class Counted(StreamItem):
        def __getattribute__(self, name: str) -> object:
            nonlocal reads
            reads += 1
            return super().__getattribute__(name)

    w = Worker(make_settings(worker_prefetch=8), tiny_runners)
    held = {"predict": 5, "batch": 3, "explain": 1}  # per model, in its first bucket
    for s, m in w._stream_model.items():
        _, _, bucket, lane = stream_labels(s)
        for n in range(held[lane] if bucket == "0" else 0):
            it = Counted(model=m, bucket=0, length=3, features={}, deadline=0.0, stream=s)
            w._in_hand[(s, f"{n}-0".encode())] = it
    reads = 0
    rooms = w._rooms()
    assert reads == 0  # was one per entry held
    assert set(rooms) == set(w.streams) and len(set(w._stream_model.values())) == 2
    for s in w.streams:  # interactive: their own room; batch, explain: the model's
        assert rooms[s] == (8 - 5 if stream_labels(s)[3] == PREDICT_LANE else 8 - 9), s
