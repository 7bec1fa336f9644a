"""The practical ceiling: the served ONNX model fed pre-sorted batches in a tight loop.

No HTTP, no queue, no tokenization in the timed part: every request is tokenized exactly as
the service does (``service.preprocess.classify`` for the detector, the QA task's windows
for QA), the sequences are sorted by length and cut into batches under the same limits as
the service (``max_batch_size`` sequences, ``max_batch_tokens`` padded tokens, the token
budget of the provider the session really runs on), padded with the service's own
``pad_batch``, and the session is opened with the service's ``create_session`` (same
providers, variant choice, threads, graph optimisation, arena). What is left between this
number and nlpserve's is the cost of serving: HTTP, JSON, tokenization, queueing, imperfect
batches.

Throughput is in requests per second (a QA request may be several windows: its sequences
per second are reported too). ``--device cuda`` opens the session on
``CUDAExecutionProvider`` and fails rather than fall back to the CPU.

    python -m bench.raw_ort --models models --model detector-en --requests 1000 --variant int8
    python -m bench.raw_ort --models models --model qa-zh --variant fp16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import RequestSpec, build_requests
from service.batching import WorkItem, pad_batch, sorted_batches
from service.config import Settings
from service.repository import discover_models
from service.runtime.session import create_session

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def device_providers(device: str) -> str:
    """NLPSERVE_PROVIDERS for a benchmark device: explicit, so a CPU run on a GPU machine
    stays on the CPU and a CUDA run names the GPU first."""
    return f"{CUDA},{CPU}" if device == "cuda" else CPU


@dataclass
class RawResult:
    name: str
    variant: str
    provider: str
    requests: int
    sequences: int  # model sequences: one per detector request, one per window for QA
    passes: int
    seconds: float
    throughput_rps: float  # requests per second
    throughput_sps: float  # sequences per second
    padding_efficiency: float
    mean_batch_size: float
    batches: int
    threads: int  # batches run at once
    intra_op_threads: int  # ORT threads per batch (0 = ORT default: all cores)
    # request id -> logits (detector) or the decoded answer dict (QA), from one pass
    outputs: dict[int, Any]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "ok": self.requests,
            "errors": {},
            "retried": 0,
            "wall_s": self.seconds,
            "throughput_rps": self.throughput_rps,
            "sequences": self.sequences,
            "sequences_per_s": self.throughput_sps,
            "latency_ms": {},
            "padding_efficiency": self.padding_efficiency,
            "mean_batch_size": self.mean_batch_size,
            "batches": self.batches,
            "threads": self.threads,
            "intra_op_threads": self.intra_op_threads,
            "passes": self.passes,
            "variant": self.variant,
            "provider": self.provider,
        }


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
            WorkItem(
                manifest.name, 0, len(e), feats, deadline=time.monotonic() + 1e6, id=str(spec.id)
            )
        )
    return items


def encode_qa(
    specs: Sequence[RequestSpec], folder: Path, manifest: Any
) -> tuple[list[WorkItem], dict[int, tuple[str, list[Any]]]]:
    """One WorkItem per window, exactly as the QA task builds them for /v1/qa, and per
    request what decoding needs (context, windows). Item ids are ``<request>:<window>``."""
    from service.preprocess.qa import QAEncoder
    from service.tasks.qa import DEFAULT_DOC_STRIDE, DEFAULT_MAX_QUERY_LENGTH

    pre = manifest.preprocessing
    enc = QAEncoder.load(
        folder / pre.tokenizer_file,
        max_length=manifest.max_length,
        doc_stride=pre.doc_stride or DEFAULT_DOC_STRIDE,
        max_query_length=pre.max_query_length or DEFAULT_MAX_QUERY_LENGTH,
    )
    all_windows = enc.encode_batch(
        [s.payload["question"] for s in specs], [s.payload["context"] for s in specs]
    )
    items, meta = [], {}
    for spec, windows in zip(specs, all_windows, strict=True):
        meta[spec.id] = (spec.payload["context"], windows)
        for w, win in enumerate(windows):
            feats = {
                "input_ids": win.input_ids,
                "attention_mask": win.attention_mask,
                "token_type_ids": win.token_type_ids,
            }
            items.append(
                WorkItem(
                    manifest.name,
                    0,
                    len(win),
                    feats,
                    deadline=time.monotonic() + 1e6,
                    id=f"{spec.id}:{w}",
                )  # fmt: skip
            )
    return items, meta


def decode_qa(
    meta: dict[int, tuple[str, list[Any]]],
    rows: dict[str, list[np.ndarray]],
    max_answer_length: int,
) -> dict[int, dict[str, Any]]:
    """Answers as /v1/qa gives them, from each window's (start, end) logits."""
    from service.preprocess.qa import decode_best_span

    out = {}
    for rid, (context, windows) in meta.items():
        per = [rows[f"{rid}:{w}"] for w in range(len(windows))]
        ans = decode_best_span(context, windows, [r[0] for r in per], [r[1] for r in per],
                               max_answer_length=max_answer_length)  # fmt: skip
        found = ans.window >= 0
        out[rid] = {"answer": ans.text, "start": ans.start, "end": ans.end,
                    "score": ans.probability if found else 0.0}  # fmt: skip
    return out


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
    """The ceiling under ``settings``' batch limits (``max_batch_size``, token budget)."""
    settings = settings or Settings()
    return run_raw_sweep(specs, models_dir, model, variant=variant, settings=settings,
                         batch_sizes=[settings.max_batch_size], min_seconds=min_seconds,
                         max_passes=max_passes)[0]  # fmt: skip


def run_raw_sweep(
    specs: Sequence[RequestSpec],
    models_dir: Path,
    model: str,
    *,
    batch_sizes: Sequence[int],
    variant: str | None = None,
    settings: Settings | None = None,
    min_seconds: float = 8.0,
    max_passes: int = 20,
    before_each: Callable[[], None] | None = None,
) -> list[RawResult]:
    """One result per max batch size, over ONE session: on a GPU a session costs seconds to
    open (CUDA context, cuDNN, fp16 kernels), which the sweep need not pay three times."""
    settings = settings or Settings()
    if variant is not None:
        settings = settings.model_copy(update={"variant": variant})
    entry = next((e for e in discover_models(models_dir) if e.manifest.name == model), None)
    if entry is None:
        raise FileNotFoundError(f"{model} not in {models_dir}")
    m = entry.manifest
    if m.task not in ("detect", "qa"):
        raise NotImplementedError(f"raw ORT ceiling implemented for detect and qa, not {m.task}")
    loaded = create_session(entry.path, m, settings)
    if settings.require_gpu and loaded.provider != CUDA:  # create_session raises first; belt
        raise RuntimeError(f"raw ORT: session runs on {loaded.provider}, CUDA was required")
    qa_meta: dict[int, tuple[str, list[Any]]] = {}
    if m.task == "qa":
        items, qa_meta = encode_qa(specs, entry.path, m)
    else:
        items = encode_detect(specs, entry.path, m)
    # As many batches at once as nlpserve runs (on CPU: one per core, one core each).
    threads = settings.inference_threads_for(loaded.provider)
    out = []
    for bs in batch_sizes:
        if before_each is not None:
            before_each()
        # The provider's token budget, as nlpserve's scheduler gets it (512 CPU, 8192 CUDA).
        policy = settings.batch_policy(loaded.provider)
        batches = sorted_batches(items, bs, policy.max_batch_tokens)
        out.append(_time_batches(loaded, m, specs, items, batches, qa_meta, min_seconds,
                                 max_passes, threads))  # fmt: skip
    return out


def _time_batches(
    loaded: Any,
    m: Any,
    specs: Sequence[RequestSpec],
    items: Sequence[WorkItem],
    batches: list[list[WorkItem]],
    qa_meta: dict[int, tuple[str, list[Any]]],
    min_seconds: float,
    max_passes: int,
    threads: int = 1,
) -> RawResult:
    sess = loaded.session
    feeds = [pad_batch(b, m.inputs) for b in batches]  # padding is not part of the timing
    out_names = m.output_names()

    rows: dict[str, list[np.ndarray]] = {}
    for b, f in zip(batches, feeds, strict=True):  # warm-up pass: every shape once
        res = sess.run(out_names, f)
        for i, it in enumerate(b):
            rows[str(it.id)] = [np.asarray(r[i][: it.length] if m.task == "qa" else r[i])
                                for r in res]  # fmt: skip
    outputs: dict[int, Any]
    if m.task == "qa":
        from service.tasks.qa import DEFAULT_MAX_ANSWER_LENGTH

        max_answer = m.preprocessing.max_answer_length or DEFAULT_MAX_ANSWER_LENGTH
        outputs = dict(decode_qa(qa_meta, rows, max_answer))
    else:
        outputs = {int(k): [float(x) for x in v[0]] for k, v in rows.items()}

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    passes, t0 = 0, time.perf_counter()
    while passes < max_passes and (passes == 0 or time.perf_counter() - t0 < min_seconds):
        if pool is None:
            for f in feeds:
                sess.run(out_names, f)
        else:  # ``threads`` batches at once on the one session (ORT's run is thread-safe)
            list(pool.map(lambda f: sess.run(out_names, f), feeds))
        passes += 1
    secs = time.perf_counter() - t0
    if pool is not None:
        pool.shutdown()
    real = sum(it.length for it in items)
    padded = sum(len(b) * max(it.length for it in b) for b in batches)
    return RawResult(
        name=f"raw ORT ({loaded.variant})",
        variant=loaded.variant,
        provider=loaded.provider,
        requests=len(specs),
        sequences=len(items),
        passes=passes,
        seconds=secs,
        throughput_rps=passes * len(specs) / secs,
        throughput_sps=passes * len(items) / secs,
        padding_efficiency=real / padded,
        mean_batch_size=len(items) / len(batches),
        batches=len(batches),
        threads=threads,
        intra_op_threads=sess.get_session_options().intra_op_num_threads,
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    specs = build_requests(args.model, args.requests, models_dir=args.models, data_dir=args.data)
    settings = Settings(providers=device_providers(args.device), require_gpu=args.device == "cuda")
    res = run_raw_ort(
        specs, args.models, args.model, variant=args.variant, settings=settings,
        min_seconds=args.seconds,
    )  # fmt: skip
    print(json.dumps(res.summary(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
