"""``nlpserve predict`` against the loop people write instead: one item at a time.

Both sides use the same :class:`ModelRunner` (one ORT session: same variant, providers and
threads, from NLPSERVE_* as for ``nlpserve serve``) and the same task code. The loop parses,
validates, tokenizes, runs (a batch of one, unpadded) and decodes each line in turn; the
other side is :func:`service.bulk.predict_stream`, what ``nlpserve predict`` runs, over the
same lines in memory (no file I/O on either side). The answers are compared too: labels (and
QA spans) that differ, and the largest probability difference (int8 answers move with their
batch-mates, docs/service.md; fp32 ones only by rounding).

    python -m bench.predict_loop --models models --model detector-en --requests 2000
    NLPSERVE_INFERENCE_THREADS=1 python -m bench.predict_loop --model polarity-en

Prints one JSON line. A measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

from bench.loadgen import build_requests
from service.bulk import ITEM_MODELS, BulkPredictor, Stats, predict_stream
from service.config import Settings
from service.repository import discover_models
from service.runtime.runner import load_runners
from service.tasks import task_class


def naive_loop(task: Any, runner: Any, lines: list[bytes]) -> list[str]:
    """One line at a time: what a Python loop over a pipeline does."""
    model = ITEM_MODELS[task.task]
    out = []
    deadline = time.monotonic() + 86400
    for raw in lines:
        request = model.model_validate(json.loads(raw))
        (prepared,) = task.prepare([request], deadline, "predict")
        result = task.decode(prepared, runner.run_batch(prepared.items))
        out.append(json.dumps(result.model_dump(), ensure_ascii=False))
    return out


def _differences(a: list[str], b: list[str]) -> dict[str, float | int]:
    changed, worst = 0, 0.0
    for x, y in zip(a, b, strict=True):
        dx, dy = json.loads(x), json.loads(y)
        probs = [k for k, v in dx.items() if isinstance(v, float)]
        worst = max([worst, *(abs(dx[k] - dy[k]) for k in probs)])
        changed += {k: v for k, v in dx.items() if k not in probs} != {
            k: v for k, v in dy.items() if k not in probs
        }
    return {"answers_differing": changed, "max_probability_difference": round(worst, 6)}


def _r(xs: list[float]) -> list[float]:
    return [round(x, 3) for x in xs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--model", default="detector-en")
    ap.add_argument("--data", type=Path, default=None, help="texts from here (HC3, CMRC)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--chunk-lines", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="alternated; the best of each side")
    args = ap.parse_args(argv)

    settings = Settings(model_dir=args.models, warmup=False)
    (entry,) = discover_models(args.models, select={args.model: None})
    runner = load_runners(settings, None, [entry])[entry.name]
    task = task_class(entry.manifest.task)(entry, settings)
    specs = build_requests(args.model, args.requests, models_dir=args.models, data_dir=args.data)
    lines = [json.dumps(s.payload, ensure_ascii=False).encode() for s in specs]
    naive_loop(task, runner, lines[:20])  # first runs allocate ORT's arena: not timed

    predictor = BulkPredictor(task, runner, settings.batch_policy(runner.provider))
    loop_times, bulk_times, loop_cpu, bulk_cpu = [], [], [], []
    # alternated, best of each: a shared machine's neighbours move both sides alike
    for _ in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        loop_out = naive_loop(task, runner, lines)
        loop_times.append(time.perf_counter() - t0)
        loop_cpu.append(time.process_time() - c0)
        sink = io.StringIO()
        predictor.stats = Stats()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = predict_stream(
            predictor, io.BytesIO(b"\n".join(lines)), sink, chunk_lines=args.chunk_lines
        )
        bulk_times.append(time.perf_counter() - t0)
        bulk_cpu.append(time.process_time() - c0)
    predictor.close()
    bulk_out = sink.getvalue().splitlines()
    assert stats.errors == 0 and len(bulk_out) == len(lines), stats
    loop_s, bulk_s = min(loop_times), min(bulk_times)

    n = len(lines)
    print(
        json.dumps(
            {
                "model": f"{entry.name}/{entry.manifest.version}",
                "variant": runner.variant,
                "provider": runner.provider,
                "items": n,
                "batches_at_once": runner.batches_at_once,
                "intra_op_threads": runner.intra_op_threads,
                "loop_items_per_s": round(n / loop_s, 1),
                "predict_items_per_s": round(n / bulk_s, 1),
                "ratio": round(loop_s / bulk_s, 2),
                "rounds_s": {"loop": _r(loop_times), "predict": _r(bulk_times)},
                # CPU time (every thread) per item: what batching saves, whatever the cores
                "cpu_ms_per_item": {
                    "loop": round(1000 * min(loop_cpu) / n, 3),
                    "predict": round(1000 * min(bulk_cpu) / n, 3),
                },
                "batches": stats.batches,
                "padding_efficiency": round(stats.padding_efficiency, 3),
                **_differences(loop_out, bulk_out),
            }
        )
    )


if __name__ == "__main__":
    main()
