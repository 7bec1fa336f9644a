"""Where a served request's CPU goes: per-thread CPU of a running server, per request.

    nlpserve serve &                       # or any server speaking nlpserve's JSON API
    python -m bench.cpu_account --pid $! --url http://127.0.0.1:8000 --model detector-en \\
        --models models --data ../shared/data --requests 3000 --rounds 3

Sends the same closed-loop load as ``bench.loadgen`` (requests generated before anything is
measured) and reads the server's per-thread CPU time from ``/proc/<pid>/task/*/stat``
before and after each round. Prints, per round: throughput, the event loop's CPU per request
(the main thread: HTTP, validation, tokenizing, queueing, decoding), the other threads'
(ONNX Runtime batches, padding, splitting) and the load generator's own. On a machine where
client and server share the cores, these add up to what one request costs the machine, which
is what separates the served throughput from raw ONNX Runtime's. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import _ms, build_requests, percentile, run_load

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _stat_cpu(stat: Path) -> float:
    """User + system CPU seconds from a ``/proc/.../stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # After the ")" of the command name: state is field 3, utime 14, stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) * TICK_S


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of ``pid``."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _stat_cpu(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listing and reading
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds of the whole process ``pid``, threads that already ended included."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


@dataclass
class Account:
    requests: int
    seconds: float
    main_ms: float  # main thread (the event loop) CPU per request
    other_ms: float  # every other thread of the server
    client_ms: float  # this process (the load generator)
    busiest_ms: list[float]  # the other threads, busiest first (inference threads on top)
    p50_ms: float | None = None  # latency percentiles of the round's requests
    p99_ms: float | None = None

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def line(self) -> str:
        busiest = ", ".join(f"{x:.2f}" for x in self.busiest_ms[:4])
        return (
            f"{self.throughput:7.1f} req/s | CPU ms/request: event loop {self.main_ms:.2f}, "
            f"other threads {self.other_ms:.2f} (busiest {busiest}), server "
            f"{self.main_ms + self.other_ms:.2f}, load generator {self.client_ms:.2f}"
        )


def warm_up(url: str, specs: Sequence, concurrency: int) -> None:
    """Send ``specs`` unmeasured (sessions, caches and the allocator settle first)."""
    if specs:
        asyncio.run(run_load(url, specs, concurrency=concurrency, keep_body=False))


def measure(pid: int, url: str, specs: Sequence, concurrency: int) -> Account:
    before, c0 = thread_cpu(pid), time.process_time()
    results, wall = asyncio.run(run_load(url, specs, concurrency=concurrency, keep_body=False))
    after, c1 = thread_cpu(pid), time.process_time()
    failed = sum(r.status != 200 for r in results)
    if failed:
        raise SystemExit(f"cpu_account: {failed} of {len(results)} requests failed")
    n = len(specs)
    per_thread = {tid: (after[tid] - before.get(tid, 0.0)) * 1000 / n for tid in after}
    main = per_thread.pop(pid, 0.0)
    lat = [r.latency_s for r in results]
    return Account(n, wall, main, sum(per_thread.values()), (c1 - c0) * 1000 / n,
                   sorted(per_thread.values(), reverse=True),
                   _ms(percentile(lat, 50)), _ms(percentile(lat, 99)))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pid", type=int, required=True, help="the server process")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="detector-en")
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not Path(f"/proc/{args.pid}/task").is_dir():
        raise SystemExit(f"cpu_account: no process {args.pid} (Linux /proc needed)")
    specs = build_requests(args.model, args.requests, models_dir=args.models, data_dir=args.data)
    warm_up(args.url, specs[: args.warmup], args.concurrency)
    for r in range(args.rounds):
        print(f"round {r + 1}: {measure(args.pid, args.url, specs, args.concurrency).line()}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
