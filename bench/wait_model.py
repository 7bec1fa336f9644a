"""A queueing model of one API process's batch loop, to choose ``NLPSERVE_MAX_WAIT_MS`` for
a device without one on hand (the GPU is lent for minutes, the model runs anywhere).

    python -m bench.wait_model                       # the GPU case: 1 ms batches
    python -m bench.wait_model --batch-ms 40 --per-seq-ms 4 --loop-ms 1.2   # a CPU-like case

Closed loop: ``clients`` clients, each sending its next request as soon as it has the last
answer. The process's event loop does ``parse`` ms of work per request (HTTP, JSON,
tokenizing) before queueing it and ``respond`` ms after its batch; one batch runs at a time,
off the event loop (the GPU), in ``batch_ms + per_seq_ms x n`` ms; a batch starts when the
model is idle and the queue is full (``max_batch``) or its oldest request has waited
``max_wait`` ms: the rule of service/batching with ``NLPSERVE_WAIT_WHEN_IDLE=1`` (one bucket,
one thread, no batch formed ahead). The default rule, an idle model takes pending work at
once, is ``max_wait`` 0 here.

What it showed, with the H200 figures (``bench/results/*-cuda-h200*``): at 8 clients per
process a 5 ms wait caps the loop near 940 req/s, where 0-1 ms reach its ~1,670 req/s
ceiling (the event loop's own work); at 32 clients the wait no longer matters.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    parse_ms: float = 0.35  # event-loop work before a request is queued
    respond_ms: float = 0.25  # event-loop work to answer it
    network_ms: float = 0.05  # each way
    batch_ms: float = 1.0  # fixed cost of one batch (kernel launches, copies)
    per_seq_ms: float = 0.02  # and per sequence in it
    max_batch: int = 32


def simulate(
    clients: int, max_wait_ms: float, costs: Costs = Costs(), duration_ms: float = 3000.0
) -> tuple[float, float, float]:
    """Throughput (req/s), p50 and p99 latency (ms) of the modelled loop."""
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()

    def at(t: float, kind: str, data: object = None) -> None:
        heapq.heappush(events, (t, next(order), kind, data))

    loop_free = 0.0
    queue: list[tuple[float, int]] = []  # (enqueued at, client)
    running = False
    sent: dict[int, float] = {}
    lat: list[float] = []

    def try_batch(now: float) -> None:
        nonlocal running
        if running or not queue:
            return
        if len(queue) >= costs.max_batch or now - queue[0][0] >= max_wait_ms - 1e-9:
            batch = queue[: costs.max_batch]
            del queue[: costs.max_batch]
            running = True
            at(now + costs.batch_ms + costs.per_seq_ms * len(batch), "batch_done", batch)
        else:
            at(queue[0][0] + max_wait_ms, "timer")

    for c in range(clients):
        at(c * 0.01, "arrive", c)
    while events:
        t, _, kind, data = heapq.heappop(events)
        if t > duration_ms:
            break
        if kind == "arrive":
            sent[data] = t  # type: ignore[index]
            loop_free = max(t, loop_free) + costs.parse_ms
            at(loop_free, "queued", data)
        elif kind == "queued":
            queue.append((t, data))  # type: ignore[arg-type]
            try_batch(t)
        elif kind == "timer":
            try_batch(t)
        elif kind == "batch_done":
            running = False
            for _, c in data:  # type: ignore[attr-defined]
                loop_free = max(t, loop_free) + costs.respond_ms
                at(loop_free + costs.network_ms, "answered", c)
            try_batch(t)
        elif kind == "answered":
            lat.append(t - sent[data])  # type: ignore[index]
            at(t + costs.network_ms, "arrive", data)
    lat.sort()
    if not lat:
        return 0.0, float("nan"), float("nan")
    return len(lat) / duration_ms * 1000.0, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="8,32", help="clients per API process")
    p.add_argument("--waits", default="0,0.5,1,2,5", help="max wait values to compare (ms)")
    p.add_argument("--batch-ms", type=float, default=Costs.batch_ms)
    p.add_argument("--per-seq-ms", type=float, default=Costs.per_seq_ms)
    loop_help = "event-loop work per request, split 60/40 before/after the batch"
    p.add_argument("--loop-ms", type=float, default=Costs.parse_ms + Costs.respond_ms,
                   help=loop_help)  # fmt: skip
    a = p.parse_args(argv)
    costs = Costs(parse_ms=0.6 * a.loop_ms, respond_ms=0.4 * a.loop_ms, batch_ms=a.batch_ms,
                  per_seq_ms=a.per_seq_ms)  # fmt: skip
    for clients in (int(x) for x in a.clients.split(",")):
        for wait in (float(x) for x in a.waits.split(",")):
            rps, p50, p99 = simulate(clients, wait, costs)
            print(f"clients {clients:3d}  max_wait {wait:4g} ms: {rps:7.0f} req/s, "
                  f"p50 {p50:5.1f} ms, p99 {p99:5.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
