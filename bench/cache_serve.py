"""Micro-benchmark of the response cache's own cost (service/api/response_cache.py):
``ResponseCache.serve`` over N one-item requests, with a ``run`` that returns ready-made
results, so that what is timed is the cache alone (keys, lookup, keeping, copies), not the
model. Reported in CPU time per item (best of ``--repeat``): all misses (0% repeats, a
cache that keeps growing), then all hits.

    python -m bench.cache_serve --items 20000
    PYTHONPATH=/tmp/old python bench/cache_serve.py   # another tree's cache (not -m: the
                                                      # current folder would come first)

The results are real ones' shapes: /v1's ``PolarityResponse`` and the V2 protocol's rows
(dicts). A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.api.response_cache import ResponseCache, Timing
from service.api.schemas import PolarityRequest, PolarityResponse
from service.config import Settings
from service.metrics import Metrics
from service.repository import discover_models
from service.tasks import build_tasks


def v1_result(i: int) -> PolarityResponse:
    return PolarityResponse(label="positive", positive_probability=i / 1e6, truncated=False)


def v2_row(i: int) -> dict[str, Any]:
    p = i / 1e6
    return {"label": "positive", "probability": p, "probabilities": [1 - p, p], "truncated": False}


async def measure(models: Path, n: int, protocol: str) -> tuple[float, float]:
    """CPU seconds per item of ``serve`` for ``n`` misses, then for the same ``n`` as hits."""
    settings = Settings(model_dir=models, providers="CPUExecutionProvider")
    (entry,) = discover_models(models, select={"polarity-en": None})
    task = build_tasks([entry], settings)["polarity-en"]
    cache = ResponseCache(1 << 30, Metrics())
    make = v1_result if protocol == "v1" else v2_row

    def decode_v2(prepared: Any, outputs: Any) -> Any:  # a decoder other than task.decode
        raise AssertionError

    decode = task.decode if protocol == "v1" else decode_v2
    items = [
        PolarityRequest(text=f"headline number {i}: a film that is fine, or dull") for i in range(n)
    ]
    deadline = time.monotonic() + 3600
    counter = iter(range(10**9))

    async def run(todo: list[BaseModel]) -> list[Any]:
        return [make(next(counter)) for _ in todo]

    out = []
    for _ in range(2):  # misses (every item new), then hits (every item known)
        gc.collect()
        t0 = time.process_time()  # CPU, not wall time: the neighbours' load shows less
        for item in items:
            await cache.serve(task, None, [item], decode, deadline, Timing(), run)
        out.append((time.process_time() - t0) / n)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    args = ap.parse_args()
    import service

    print(f"service from {Path(service.__file__).parent}")
    for protocol in ("v1", "v2"):
        runs = [asyncio.run(measure(args.models, args.items, protocol)) for _ in range(args.repeat)]
        miss = min(r[0] for r in runs) * 1e6
        hit = min(r[1] for r in runs) * 1e6
        print(f"{protocol}: {args.items} items: miss {miss:.1f} us/item, hit {hit:.1f} us/item")


if __name__ == "__main__":
    main()
