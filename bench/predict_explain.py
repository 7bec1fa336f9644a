"""``nlpserve predict --explain`` against the live explain endpoint called one text at a time.

Both sides are real processes over the same model and NLPSERVE_* settings: ``nlpserve serve``
(``NLPSERVE_EXPLAIN_WARMUP=1``, the explanation cache off) answering ``POST
/v1/detect/explain`` requests sent one after another, and ``nlpserve predict --explain``
over a file of the same texts. Start-up is left out of both rates: the first text is a
warm-up (shap's import and JIT), and the rate counts the texts after it, from the moment
its answer arrived (``predict --explain`` writes each line as soon as it is known) to the
last answer. Rounds alternate the two sides; the answers are compared too (int8 answers move
with their batch-mates, so values may differ a little; fp32 ones only by rounding).

    python -m bench.predict_explain --data ../shared/data --texts 12 --max-evals 100

Prints one JSON line. A measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.explain_faithfulness import hc3_texts
from bench.procs import REPO_ROOT, free_port, nlpserve_bin, start, wait_http

TASK_OF = {"detector-en": "detect", "polarity-en": "polarity"}


def live_loop(args: argparse.Namespace, lines: list[str], log_dir: Path) -> dict[str, Any]:
    port = free_port()
    env = {
        "NLPSERVE_PORT": str(port),
        "NLPSERVE_MODEL_DIR": str(args.models),
        "NLPSERVE_LOAD_MODELS": args.model,
        "NLPSERVE_EXPLAIN_WARMUP": "1",
        "NLPSERVE_EXPLAIN_CACHE_SIZE": "0",  # each text is new anyway; no shortcut either way
        "NLPSERVE_DEFAULT_DEADLINE_MS": "600000",  # offline has none: neither side runs out
        "NLPSERVE_LOG_LEVEL": "WARNING",
    }
    proc = start("serve", [nlpserve_bin(), "serve"], log_dir, env=env)
    try:
        wait_http(proc, f"http://127.0.0.1:{port}/readyz", timeout_s=300)
        url = f"http://127.0.0.1:{port}/v1/{TASK_OF[args.model]}/explain"
        answers, times = [], []
        with httpx.Client(timeout=600) as client:
            for line in lines:
                r = client.post(url, content=line, headers={"content-type": "application/json"})
                r.raise_for_status()
                answers.append(r.json())
                times.append(time.perf_counter())
    finally:
        proc.stop()
    return {"answers": answers, "times": times}


def bulk(args: argparse.Namespace, lines: list[str], tmp: Path) -> dict[str, Any]:
    src = tmp / "texts.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = [nlpserve_bin(), "predict", args.model, "--models", str(args.models), "--explain"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "--input", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "NLPSERVE_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    answers, times = [], []
    for out in proc.stdout:
        answers.append(json.loads(out))
        times.append(time.perf_counter())
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"nlpserve predict --explain failed: {err[-2000:]}")
    return {"answers": answers, "times": times, "whole_s": time.perf_counter() - t0,
            "summary": err.strip().splitlines()[-1]}  # fmt: skip


def rate(times: list[float]) -> float:
    """Texts per second after the warm-up text's answer."""
    return (len(times) - 1) / (times[-1] - times[0])


def compare(a: list[dict], b: list[dict]) -> dict[str, Any]:
    worst_value = worst_output = 0.0
    tokens_differ = labels_differ = 0
    for x, y in zip(a, b, strict=True):
        tokens_differ += x["tokens"] != y["tokens"]
        labels_differ += x["label"] != y["label"]
        worst_output = max(worst_output, abs(x["output"] - y["output"]))
        if x["tokens"] == y["tokens"]:
            diffs = [abs(p - q) for p, q in zip(x["values"], y["values"], strict=True)]
            worst_value = max([worst_value, *diffs])
    return {"texts": len(a), "tokens_differ": tokens_differ, "labels_differ": labels_differ,
            "max_value_difference": worst_value, "max_output_difference": worst_output}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    p.add_argument("--model", default="detector-en", choices=sorted(TASK_OF))
    p.add_argument("--data", type=Path, required=True, help="holds hc3/en/*.jsonl")
    p.add_argument("--texts", type=int, default=12, help="texts timed (plus one warm-up)")
    p.add_argument("--max-evals", type=int, default=100)
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds of both sides")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    picked = hc3_texts(args.data, args.texts + 1, args.seed, args.min_words)
    lines = [json.dumps({"text": t["text"], "max_evals": args.max_evals}) for t in picked]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="predict-explain-") as d:
        for _ in range(args.rounds):
            live = live_loop(args, lines, Path(d))
            offline = bulk(args, lines, Path(d))
            rounds.append({
                "live_items_per_s": round(rate(live["times"]), 3),
                "predict_explain_items_per_s": round(rate(offline["times"]), 3),
                "predict_explain_whole_run_s": round(offline["whole_s"], 1),
                "predict_summary": offline["summary"],
                "answers": compare(live["answers"][1:], offline["answers"][1:]),
            })  # fmt: skip
    best_live = max(r["live_items_per_s"] for r in rounds)
    best_bulk = max(r["predict_explain_items_per_s"] for r in rounds)
    print(json.dumps({
        "model": args.model, "texts": args.texts, "max_evals": args.max_evals,
        "live_items_per_s": best_live, "predict_explain_items_per_s": best_bulk,
        "ratio": round(best_bulk / best_live, 2), "rounds": rounds,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
