"""Explanation latency: nlpserve's /v1/detect/explain vs plain ``shap`` + ``transformers.pipeline``.

Both sides explain the SAME texts (cut to N tokens of the detector's tokenizer) with SHAP's
partition explainer over a Text masker and the same ``max_evals``, alternately, on this
machine's CPU:

* **nlpserve**: a live server started here (uvicorn, in-process queue, the model's default CPU
  variant, explanation cache off), called over HTTP; masked variants go through the batched
  ONNX Runtime queue in the ``explain`` lane.
* **baseline**: the textbook recipe ``shap.Explainer(transformers.pipeline(...))`` on the same
  architecture in PyTorch: the fine-tuned checkpoint when ``--torch-model`` names one, else
  ``runs/<name>/best``, else the served weights rebuilt from the ONNX file
  (``bench/onnx_to_torch.py``; dequantised from an int8-only version), and only where that
  fails the manifest's base model with a fresh head, or for the tiny test detector the same
  tiny config (latency depends on the architecture, not on the weights). The pipeline runs with its
  default batch size (1: what "plain" gets you) and, as a second row, with ``batch_size=32``.

    python bench/explain_baseline.py                           # models/detector-en (latest)
    python bench/explain_baseline.py --tiny                    # builds the tiny test detector
    python bench/explain_baseline.py --tokens 100 300 --max-evals 500 --repeats 3

Prints a table and writes JSON (``--out``). torch/transformers are fine here (bench/), never
in ``service/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FALLBACK_TEXT = (
    "Artificial intelligence is a branch of computer science that aims to create systems "
    "capable of performing tasks that typically require human intelligence. These tasks "
    "include learning, reasoning, problem solving, perception and language understanding. "
    "It is important to note that there are several approaches to building such systems, "
    "and each of them has its own advantages and limitations. "
)


# --------------------------------------------------------------------------- inputs
def find_detector(models: Path, tiny: bool) -> Path:
    if tiny:
        from tests.builders_bert import build_tiny_detector

        return build_tiny_detector(Path(tempfile.mkdtemp(prefix="nlpserve-bench-")))
    from service.repository import discover_models

    for entry in discover_models(models):
        if entry.manifest.task == "detect":
            return entry.path
    raise SystemExit(f"no detect model in {models}: train one, or pass --tiny")


def source_text(data: Path | None) -> str:
    """Machine answers from HC3 (if the data is here), else a fixed paragraph, repeated."""
    if data is not None:
        files = sorted((data / "hc3" / "en").glob("*.jsonl"))
        if files:
            parts: list[str] = []
            with files[0].open(encoding="utf-8") as f:
                for line in f:
                    parts += json.loads(line).get("chatgpt_answers", [])
                    if sum(len(p) for p in parts) > 20_000:
                        break
            if parts:
                return " ".join(parts)
    return FALLBACK_TEXT * 40


def texts_of_length(tokenizer_file: Path, source: str, n_tokens: int, k: int) -> list[str]:
    """``k`` different texts of exactly ``n_tokens`` tokens (no specials) cut from ``source``."""
    from service.preprocess.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    offsets = tok.encode(source, add_special_tokens=False).offsets
    out = []
    for i in range(k):
        start = (i * 37) % max(1, len(offsets) - n_tokens)
        s, e = offsets[start][0], offsets[start + n_tokens - 1][1]
        out.append(source[s:e])
    return out


# --------------------------------------------------------------------------- nlpserve
def nlpserve_settings(models_dir: Path, max_evals: int, threads: int):
    from tests.service_support import make_settings

    return make_settings(
        models_dir,
        max_wait_ms=2.0,
        intra_op_threads=threads,
        explain_cache_size=0,  # every call computes
        explain_max_evals_limit=max(max_evals, 2000),
        default_deadline_ms=600_000,
    )


async def explain_nlpserve(client: Any, text: str, max_evals: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.post("/v1/detect/explain", json={"text": text, "max_evals": max_evals})
    wall = time.perf_counter() - t0
    r.raise_for_status()
    d = r.json()
    return {
        "seconds": wall,
        "evals": d["evals"],
        "features": len(d["tokens"]),
        "truncated": d["truncated"],
        "additivity_error": abs(d["base_value"] + sum(d["values"]) - d["output"]),
        "output": d["output"],
    }


# --------------------------------------------------------------------------- baseline
def baseline_pipeline(folder: Path, torch_model: str | None, batch_size: int | None, threads: int):
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        pipeline,
    )

    from service.repository import load_manifest

    manifest = load_manifest(folder)
    torch.set_num_threads(threads)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / manifest.preprocessing.tokenizer_file),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=manifest.max_length,
    )
    labels = {i: lab for i, lab in enumerate(manifest.labels)}
    found = (torch_model, "given with --torch-model") if torch_model else None
    found = found or _same_weights_checkpoint(folder, manifest.name)
    if found:
        model = AutoModelForSequenceClassification.from_pretrained(found[0])
        source = f"{found[0]} ({found[1]})"
    else:
        from training.transformer.commands import recorded_base

        base = recorded_base(str(manifest.hyperparameters.get("base_model") or ""))
        if base and Path(base).is_dir():  # same architecture, fresh head
            label2id = {v: k for k, v in labels.items()}
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(labels), id2label=labels, label2id=label2id
            )
            source = f"{base} + fresh head (same compute, other weights)"
        else:  # the tiny test detector: the same tiny config, random weights
            from tests.builders_bert import _tiny_bert

            model = _tiny_bert(tokenizer.vocab_size, "detect")
            source = "tiny BERT config of tests/builders_bert.py (random weights)"
    model.eval()
    kw: dict[str, Any] = {"batch_size": batch_size} if batch_size else {}
    pipe = pipeline(
        "text-classification",
        model=model,
        tokenizer=tokenizer,
        device=-1,
        top_k=None,
        truncation=True,
        max_length=manifest.max_length,
        **kw,
    )
    return pipe, source


def _same_weights_checkpoint(folder: Path, name: str) -> tuple[str, str] | None:
    """(folder, what it is): the training checkpoint (runs/<name>/best), or the weights rebuilt
    from the served ONNX (fp32: the same weights; int8 only: dequantised, equivalent)."""
    best = ROOT / "runs" / name / "best"
    if (best / "config.json").is_file():
        return str(best), "the training checkpoint"
    try:
        from bench.onnx_to_torch import hf_from_onnx

        out = hf_from_onnx(folder, Path(tempfile.mkdtemp(prefix="nlpserve-bench-hf-")))
    except Exception as e:  # architecture it cannot rebuild: fall back to the same shape
        print(f"(baseline: could not rebuild the weights from ONNX: {e})", flush=True)
        return None
    # Older versions return the folder, newer ones (folder, "fp32" | "int8-dequantized").
    path, kind = out if isinstance(out, tuple) else (out, "fp32")
    what = {
        "fp32": "the served weights, rebuilt from the fp32 ONNX",
        "int8-dequantized": "rebuilt from the served int8 ONNX, dequantised (equivalent weights)",
    }.get(kind, kind)
    return str(path), what


def baseline_explainer(pipe: Any) -> Any:
    import shap

    explainer = shap.Explainer(pipe, algorithm="partition")  # the textbook recipe
    explainer(["warm up the model please"], max_evals=20, silent=True)
    return explainer


def explain_baseline(explainer: Any, text: str, max_evals: int) -> dict[str, Any]:
    import numpy as np

    t0 = time.perf_counter()
    sv = explainer([text], max_evals=max_evals, batch_size=32, silent=True)
    wall = time.perf_counter() - t0
    values = np.asarray(sv.values[0])  # [features, labels]
    k = list(explainer.model.inner_model.model.config.id2label.values()).index("machine")
    output = float(np.asarray(sv.base_values[0])[k] + values[:, k].sum())
    return {"seconds": wall, "features": int(values.shape[0]), "evals": max_evals, "output": output}


async def run_side_by_side(
    repo: Path,
    folder: Path,
    texts: dict[int, list[str]],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Every text through every contender in turn, so all see the same machine load."""
    import httpx

    from service.api.routes.explain import warm_up_explain
    from tests.service_support import live_server

    contenders: list[tuple[str, Any]] = []
    for label, bs in [("baseline pipeline (batch 1)", None), ("baseline pipeline (batch 32)", 32)]:
        if bs and args.skip_batched_baseline:
            continue
        pipe, src = baseline_pipeline(folder, args.torch_model, bs, args.threads)
        report["baseline_model"] = src
        contenders.append((label, baseline_explainer(pipe)))
    rows: dict[str, dict[int, list[dict[str, Any]]]] = {"nlpserve": {}}
    rows.update({label: {} for label, _ in contenders})
    settings = nlpserve_settings(repo, args.max_evals, args.threads)
    async with live_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=600) as c:
        await warm_up_explain(srv.app)
        (
            await c.post("/v1/detect/explain", json={"text": "warm up the model please"})
        ).raise_for_status()
        models = (await c.get("/v1/models")).json()["models"]
        report["served_variant"] = {m["name"]: m["variant"] for m in models}
        for n, group in texts.items():
            for row in rows.values():
                row[n] = []
            for text in group:
                rows["nlpserve"][n].append(await explain_nlpserve(c, text, args.max_evals))
                for label, explainer in contenders:  # blocks the loop: nothing else in flight
                    rows[label][n].append(explain_baseline(explainer, text, args.max_evals))
                print(f"  {n} tokens: " + ", ".join(
                    f"{k} {v[n][-1]['seconds']:.2f}s" for k, v in rows.items()
                ), flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------- main
def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    secs = [r["seconds"] for r in rows]
    return {
        "median_s": statistics.median(secs),
        "min_s": min(secs),
        "max_s": max(secs),
        "features": rows[0]["features"],
        "evals": statistics.median(r["evals"] for r in rows),
        "outputs": [round(r["output"], 4) for r in rows],
        **({"truncated": rows[0]["truncated"]} if "truncated" in rows[0] else {}),
        **(
            {"max_additivity_error": max(r["additivity_error"] for r in rows)}
            if "additivity_error" in rows[0]
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--tiny", action="store_true", help="build and use the tiny test detector")
    ap.add_argument("--torch-model", help="fine-tuned HF checkpoint folder for the baseline")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--max-evals", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3, help="texts per length (medians)")
    ap.add_argument("--skip-batched-baseline", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="compute threads of BOTH sides (ORT intra-op, torch.set_num_threads)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "explain.json")
    args = ap.parse_args(argv)

    folder = find_detector(args.models, args.tiny)
    from service.repository import load_manifest

    manifest = load_manifest(folder)
    data = args.data if args.data.is_dir() else None
    source = source_text(data)
    tok_file = folder / manifest.preprocessing.tokenizer_file
    texts = {n: texts_of_length(tok_file, source, n, args.repeats) for n in args.tokens}
    print(
        f"detector: {folder} (max_length {manifest.max_length}); texts from "
        f"{'HC3 ' + str(data) if data else 'a fixed paragraph'}; cpu cores {os.cpu_count()}",
        flush=True,
    )

    # The service gets a repository holding just the detector (loads faster).
    repo = Path(tempfile.mkdtemp(prefix="nlpserve-bench-repo-"))
    (repo / manifest.name).mkdir()
    (repo / manifest.name / manifest.version).symlink_to(folder, target_is_directory=True)

    report: dict[str, Any] = {
        "detector": str(folder),
        "max_length": manifest.max_length,
        "max_evals": args.max_evals,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "rows": {},
    }
    rows = asyncio.run(run_side_by_side(repo, folder, texts, args, report))
    report["rows"] = {
        label: {n: summarize(r) for n, r in per_n.items()} for label, per_n in rows.items()
    }
    print(f"\nmax_evals={args.max_evals}, median of {args.repeats} texts per length")
    print(f"{'':32s}" + "".join(f"{n:>7d} tok (features)  " for n in args.tokens))
    for label, per_n in report["rows"].items():
        cells = "".join(
            f"{per_n[n]['median_s']:9.2f} s ({per_n[n]['features']:3d})     " for n in args.tokens
        )
        print(f"{label:32s}{cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
