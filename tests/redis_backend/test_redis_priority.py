"""Priority classes in Redis mode, end to end: a real API replica (HTTP), a real worker whose
one thread is held at a gate, real Redis. A keys-file batch client's request, queued before
an interactive one and even sent with ``X-Priority: interactive``, runs after it; the
metrics show the batch lane's backlog; a starved one ends at its deadline (504)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.redis_backend.helpers import running_worker, wait_for
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
