"""The practical ceiling: the served ONNX model fed pre-sorted batches in a tight loop.

No HTTP, no queue, no tokenization in the timed part: every request is tokenized exactly as
the service does (``service.preprocess.classify``), the sequences are sorted by length and
cut into batches under the same limits as the service (``max_batch_size`` sequences,
``max_batch_tokens`` padded tokens), padded with the service's own ``pad_batch``, and the
session is opened with the service's ``create_session`` (same variant choice, threads,
graph optimisation, arena). What is left between this number and nlpserve's is the cost of
serving: HTTP, JSON, tokenization, queueing, imperfect batches.

    python -m bench.raw_ort --models models --model detector-en --requests 1000 --variant int8
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import RequestSpec, build_requests
from service.batching import WorkItem, pad_batch
from service.config import Settings
from service.repository import discover_models
from service.runtime.session import create_session


@dataclass
class RawResult:
    name: str
    variant: str
    provider: str
    sequences: int
    passes: int
    seconds: float
    throughput_sps: float
    padding_efficiency: float
    mean_batch_size: float
    batches: int
    outputs: dict[int, list[float]]  # request id -> logits (one pass), for answer checks

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.sequences,
            "ok": self.sequences,
            "errors": {},
            "retried": 0,
            "wall_s": self.seconds,
            "throughput_rps": self.throughput_sps,
            "latency_ms": {},
            "padding_efficiency": self.padding_efficiency,
            "mean_batch_size": self.mean_batch_size,
            "batches": self.batches,
            "passes": self.passes,
            "variant": self.variant,
            "provider": self.provider,
        }


def sorted_batches(
    items: Sequence[WorkItem], max_size: int, max_tokens: int
) -> list[list[WorkItem]]:
    """Greedy batches over length-sorted items under the service's two limits."""
    out: list[list[WorkItem]] = []
    cur: list[WorkItem] = []
    for it in sorted(items, key=lambda x: x.length):
        # Sorted ascending, so the newcomer is the longest: padded = (n + 1) * its length.
        if cur and (len(cur) >= max_size or (len(cur) + 1) * it.length > max_tokens):
            out.append(cur)
            cur = []
        cur.append(it)
    if cur:
        out.append(cur)
    return out


def encode_detect(specs: Sequence[RequestSpec], folder: Path, manifest: Any) -> list[WorkItem]:
    """WorkItems exactly as the API builds them for /v1/detect."""
    from service.preprocess.classify import ClassifyEncoder

    enc = ClassifyEncoder.load(folder / manifest.preprocessing.tokenizer_file, manifest.max_length)
    encodings = enc.encode([s.payload["text"] for s in specs])
    items = []
    for spec, e in zip(specs, encodings, strict=True):
        feats = {
            "input_ids": e.input_ids,
            "attention_mask": np.ones_like(e.input_ids),
            "token_type_ids": e.token_type_ids,
        }
        items.append(
            WorkItem(manifest.name, 0, len(e), feats, deadline=time.time() + 1e6, id=str(spec.id))
        )
    return items


def run_raw_ort(
    specs: Sequence[RequestSpec],
    models_dir: Path,
    model: str,
    *,
    variant: str | None = None,
    settings: Settings | None = None,
    min_seconds: float = 8.0,
    max_passes: int = 20,
) -> RawResult:
    settings = settings or Settings()
    if variant is not None:
        settings = settings.model_copy(update={"variant": variant})
    entry = next((e for e in discover_models(models_dir) if e.manifest.name == model), None)
    if entry is None:
        raise FileNotFoundError(f"{model} not in {models_dir}")
    m = entry.manifest
    if m.task != "detect":
        raise NotImplementedError(f"raw ORT ceiling implemented for task 'detect', not {m.task}")
    loaded = create_session(entry.path, m, settings)
    sess = loaded.session
    items = encode_detect(specs, entry.path, m)
    policy = settings.batch_policy()
    batches = sorted_batches(items, policy.max_batch_size, policy.max_batch_tokens)
    feeds = [pad_batch(b, m.inputs) for b in batches]  # padding is not part of the timing
    out_names = m.output_names()

    outputs: dict[int, list[float]] = {}
    for b, f in zip(batches, feeds, strict=True):  # warm-up pass: every shape once
        logits = sess.run(out_names, f)[0]
        for it, row in zip(b, logits, strict=True):
            outputs[int(it.id)] = [float(x) for x in row]

    passes, t0 = 0, time.perf_counter()
    while passes < max_passes and (passes == 0 or time.perf_counter() - t0 < min_seconds):
        for f in feeds:
            sess.run(out_names, f)
        passes += 1
    secs = time.perf_counter() - t0
    real = sum(it.length for it in items)
    padded = sum(len(b) * max(it.length for it in b) for b in batches)
    return RawResult(
        name=f"raw ORT ({loaded.variant})",
        variant=loaded.variant,
        provider=loaded.provider,
        sequences=len(items),
        passes=passes,
        seconds=secs,
        throughput_sps=passes * len(items) / secs,
        padding_efficiency=real / padded,
        mean_batch_size=len(items) / len(batches),
        batches=len(batches),
        outputs=outputs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--model", default="detector-en")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--variant", default=None)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args(argv)
    specs = build_requests(args.model, args.requests, models_dir=args.models, data_dir=args.data)
    res = run_raw_ort(
        specs, args.models, args.model, variant=args.variant, min_seconds=args.seconds
    )
    print(json.dumps(res.summary(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
