"""Open-loop overload scenario: phases of Poisson arrivals at fixed rates against a running
server, no retries, per phase the status codes (and error codes), goodput and latency.

    python -m bench.overload --url http://127.0.0.1:8101 \\
        --phase 40:10 --phase 120:20 --phase 400:20 --phase 20:15 \\
        --models detector,polarity --deadline-ms 300 --deadline-share 0.3

``--phase RATE:SECONDS`` (repeatable) runs in order; arrivals go out on schedule whatever the
server does (up to ``--max-connections`` open; latency counts from the scheduled arrival,
so waiting for a connection is counted). ``--models`` is a comma list of task names
(``detect``/``detector``, ``polarity``, ``pos``, ``qa``): each arrival picks one at random,
or only the first with ``--flood-share`` of the arrivals (``--flood-share 0.9``: one model
floods, the others keep their share). ``--deadline-share`` of the requests carry
``X-Deadline-Ms: --deadline-ms``. A request answered 200 after its deadline is counted as
``late`` (the service must answer 504 instead). The last phase's per-second p50 shows the
recovery. ``--steady TASK:RATE`` (repeatable) adds a stream of its own to one model, Poisson
at that rate from the first phase's start to the last one's end, whatever the phases send:
the light model whose latency a flood of another must not hurt (``--models qa --steady
polarity:20 --phase 0:15 --phase 40:30 --phase 0:15``; a phase at rate 0 sends only the
steady streams). ``--phases-priority batch`` sends the phases' arrivals with
``X-Priority: batch`` (the steady streams stay interactive; ``per_model`` counts them apart,
as ``TASK:batch``): a bulk job flooding the very model whose interactive latency it must
not hurt (``--models qa --phases-priority batch --steady qa:1``). ``--qa-repeats LO:HI``
sets the QA contexts' length (LO to HI copies of a 45-character paragraph; 1:4 by default,
20:40 for long contexts of several windows).
Prints one JSON object per phase (``per_model`` also has each model's statuses);
``--metrics`` adds one more line, what the server's ``nlpserve_rejected_total`` counted over
the run by reason (``queue_full``, ``deadline_exceeded``, ...), from its /metrics before and
after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

from bench.fastclient import FastClient, TransportError
from bench.loadgen import percentile, scrape_metrics

TEXT = (
    "the film was a charming funny and moving story about a dog who learns to read while "
    "its owner builds a boat in the garden and the neighbours watch with growing alarm"
)
WORDS = TEXT.split(" ")
ZH = "长城总长度超过两万千米。它始建于春秋战国时期，是古代中国为抵御外族入侵而修筑的防御工程。"
PATHS = {"detect": "/v1/detect", "detector": "/v1/detect", "polarity": "/v1/polarity",
         "pos": "/v1/pos", "qa": "/v1/qa"}  # fmt: skip


def body_for(task: str, rng: random.Random, qa_repeats: tuple[int, int] = (1, 4)) -> bytes:
    if task == "qa":
        ctx = ZH * rng.randint(*qa_repeats)
        return json.dumps({"question": "长城有多长？", "context": ctx}).encode()
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    return json.dumps({"text": text}).encode()


def pct(xs: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0 to 1) of latencies ``xs`` in seconds, in milliseconds."""
    p = percentile(xs, 100 * q)
    return None if p is None else round(1000 * p, 1)


def rejected_by_reason(samples: dict[tuple[str, tuple], float]) -> Counter[str]:
    """``nlpserve_rejected_total`` of a /metrics scrape, summed over models, by reason."""
    out: Counter[str] = Counter()
    for (name, labels), v in samples.items():
        if name == "nlpserve_rejected_total":
            out[dict(labels).get("reason", "?")] += int(v)  # a count, scraped as a float
    return out


def always(task: str) -> Callable[[], str]:
    """A steady stream's pick: its one task."""
    return lambda: task


async def rejected_now(url: str) -> Counter[str]:
    # scrape_metrics blocks: off the event loop (the server may share it, as in the tests)
    return rejected_by_reason(await asyncio.to_thread(scrape_metrics, [url + "/metrics"]))


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    tasks = [t.strip() for t in args.models.split(",")]
    # per (deadline header, the phases' priority header) one client: the steady streams'
    # requests go out without the latter
    clients = {
        (dl, prio): FastClient(
            args.url, max_connections=args.max_connections, timeout_s=args.timeout,
            headers={
                **({"X-Deadline-Ms": str(args.deadline_ms)} if dl else {}),
                **({"X-Priority": args.phases_priority} if prio else {}),
            },
        )
        for dl in (False, True)
        for prio in (False, True)
    }  # fmt: skip
    # (phase, scheduled, seconds, task as counted, status, deadline header, error code)
    results: list[tuple[int, float, float, str, str, bool, str | None]] = []
    pending: set[asyncio.Task[None]] = set()
    errors: dict[str, str] = {}
    rejected_before = await rejected_now(args.url) if args.metrics else None

    async def fire(phase: int, sched: float, task: str, body: bytes, dl: bool, prio: bool) -> None:
        c = clients[dl, prio]
        code = None
        try:
            try:
                r = await c.post(PATHS[task], body)
            except TransportError as e:  # a pooled connection the server closed while idle
                if not str(e).startswith("IncompleteReadError: 0 bytes"):
                    raise
                r = await c.post(PATHS[task], body)
            status = r.status
            if status >= 400:
                try:
                    code = json.loads(r.content)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "?"
                if r.headers.get("retry-after") is None and status in (429, 503):
                    code = f"{code}(no Retry-After)"
        except TransportError as e:
            status, code = 0, str(e).split(":")[0]
            errors[code] = str(e)
        done = time.perf_counter()
        counted = f"{task}:{args.phases_priority}" if prio else task
        results.append((phase, sched, done - sched, counted, str(status), dl, code))

    t0 = time.perf_counter()
    bounds = []
    at = t0
    for _, secs in args.phase:
        bounds.append((at, at + secs))
        at += secs

    async def arrivals(
        i: int, start: float, end: float, rate: float, pick: Callable[[], str], rng: random.Random
    ) -> None:
        """Poisson arrivals at ``rate`` from ``start`` to ``end``, each of task ``pick()``,
        counted in the phase its scheduled time falls in (``i``: all in that one)."""
        at = start
        while rate > 0:
            at += rng.expovariate(rate)
            if at >= end:
                break
            now = time.perf_counter()
            if at > now:
                await asyncio.sleep(at - now)
            task = pick()
            dl = rng.random() < args.deadline_share
            ph = i if i >= 0 else next(k for k, (_, hi) in enumerate(bounds) if at < hi)
            body = body_for(task, rng, args.qa_repeats)
            prio = i >= 0 and args.phases_priority is not None
            t = asyncio.create_task(fire(ph, at, task, body, dl, prio))
            pending.add(t)
            t.add_done_callback(pending.discard)

    def flood_pick() -> str:
        return tasks[0] if rng.random() < args.flood_share else rng.choice(tasks)

    # each steady stream draws from its own generator: the phases' arrivals stay the same
    # with or without it (a run with a steady stream compares with one without)
    steady = [
        asyncio.create_task(
            arrivals(-1, t0, bounds[-1][1], rate, always(task), random.Random(f"{args.seed}:{k}"))
        )
        for k, (task, rate) in enumerate(args.steady)
    ]
    for i, (rate, _) in enumerate(args.phase):
        await arrivals(i, *bounds[i], rate, flood_pick, rng)
    await asyncio.gather(*steady)
    if pending:
        await asyncio.wait(pending)
    for c in clients.values():
        await c.aclose()

    for i, (rate, secs) in enumerate(args.phase):
        lo, hi = bounds[i]
        rs = [r for r in results if r[0] == i]
        ok = [r for r in rs if r[4] == "200"]
        late = [r for r in ok if r[5] and r[2] * 1000 > args.deadline_ms + args.late_slack_ms]
        per_model = {}
        flooded = [f"{t}:{args.phases_priority}" for t in tasks] if args.phases_priority else tasks
        for task in dict.fromkeys([*flooded, *(t for t, _ in args.steady)]):
            m = [r for r in ok if r[3] == task]
            per_model[task] = {
                "sent": sum(1 for r in rs if r[3] == task),
                "statuses": dict(
                    Counter(r[4] if r[6] is None else f"{r[4]} {r[6]}" for r in rs if r[3] == task)
                ),
                "ok": len(m),
                "p50_ms": pct([r[2] for r in m], 0.5),
                "p99_ms": pct([r[2] for r in m], 0.99),
            }
        out = {
            "phase": i,
            "rate": rate,
            "seconds": secs,
            "sent": len(rs),
            "statuses": dict(Counter(r[4] if r[6] is None else f"{r[4]} {r[6]}" for r in rs)),
            "goodput_per_s": round(len(ok) / secs, 1),
            # answers completed within the phase's own window, whatever their arrival
            "completed_ok_per_s": round(
                sum(1 for r in results if r[4] == "200" and lo <= r[1] + r[2] < hi) / secs, 1
            ),
            "ok_p50_ms": pct([r[2] for r in ok], 0.5),
            "ok_p99_ms": pct([r[2] for r in ok], 0.99),
            "ok_max_ms": pct([r[2] for r in ok], 1.0),
            "deadline_ok_p99_ms": pct([r[2] for r in ok if r[5]], 0.99),
            "late_200": len(late),
            "per_model": per_model,
        }
        if i == len(args.phase) - 1:  # recovery timeline: p50 of each second's arrivals
            start = bounds[i][0]
            timeline = []
            for s in range(int(secs)):
                w = [r[2] for r in ok if start + s <= r[1] < start + s + 1]
                timeline.append(pct(w, 0.5))
            out["p50_ms_by_second"] = timeline
        print(json.dumps(out), flush=True)
    if errors:
        print(json.dumps({"transport_errors": errors}), flush=True)
    if rejected_before is not None:
        delta = await rejected_now(args.url)
        delta.subtract(rejected_before)
        rejected = {k: int(v) for k, v in sorted(delta.items()) if v}
        print(json.dumps({"metrics": {"rejected_total": rejected}}), flush=True)


def phase(s: str) -> tuple[float, float]:
    rate, _, secs = s.partition(":")
    return float(rate), float(secs)


def steady_stream(s: str) -> tuple[str, float]:
    task, _, rate = s.partition(":")
    if task not in PATHS:
        raise argparse.ArgumentTypeError(f"unknown task {task!r} (one of {', '.join(PATHS)})")
    return task, float(rate)


def int_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--phase", type=phase, action="append", required=True, help="RATE:SECONDS")
    p.add_argument("--models", default="detect")
    p.add_argument("--flood-share", type=float, default=0.0)
    p.add_argument(
        "--steady", type=steady_stream, action="append", default=[],
        help="TASK:RATE, a Poisson stream to TASK over all phases, besides theirs",
    )  # fmt: skip
    p.add_argument(
        "--phases-priority", choices=("batch", "interactive"), default=None,
        help="X-Priority of the phases' requests (not of the --steady streams')",
    )  # fmt: skip
    p.add_argument("--qa-repeats", type=int_range, default=(1, 4), help="LO:HI, QA context size")
    p.add_argument("--deadline-ms", type=int, default=300)
    p.add_argument("--deadline-share", type=float, default=0.0)
    p.add_argument("--late-slack-ms", type=float, default=50.0)
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--metrics", action="store_true",
        help="also print the server's nlpserve_rejected_total by reason over the run",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
