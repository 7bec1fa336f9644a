"""The naive baseline: what a user writes first. FastAPI + the PyTorch model, once per request.

    python -m bench.baseline_app --hf-dir <checkpoint> --manifest-dir models/detector-en/1
    python -m bench.baseline_app --hf-dir <checkpoint> --manifest-dir models/qa-zh/1 \\
        --device cuda --dtype fp16

One ``def`` endpoint (FastAPI runs it in its thread pool), tokenizer + ``model(**inputs)``
per request, no batching across requests, default torch threads: the usual tutorial code.
It serves nlpserve's request/response shape for the manifest's task (``POST /v1/detect`` or
``POST /v1/qa``) so the load generator can drive both with the same requests, and
``GET /readyz``/``/healthz`` so the benchmark can wait for it. It imports torch and
transformers, so it lives in ``bench/``, never in ``service/``.

QA is naive the same way: one request's windows (the manifest's ``max_length`` and
``doc_stride``) go through the model together, then the best span by start+end logit within
``max_answer_length``. Windows and decoding are ``service.preprocess.qa``'s on purpose: the
answers must be the ones nlpserve gives, so the comparison is about batching, not decoding.

``--device cuda`` moves the model and every input to the GPU; ``--dtype fp16`` runs it in
torch half precision (CUDA only: many CPU kernels have no half version).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class DetectIn(BaseModel):
    # Module level, not inside build_app: with postponed annotations FastAPI resolves the
    # parameter's type by name, and a local class would turn the body into a query param.
    text: str


class QAIn(BaseModel):
    question: str
    context: str


DTYPES = ("fp32", "fp16")


def build_app(hf_dir: Path, manifest_dir: Path, device: str = "cpu", dtype: str = "fp32") -> Any:
    import torch
    from fastapi import FastAPI

    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    task = manifest.get("task", "detect")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if dtype == "fp16" and not device.startswith("cuda"):
        raise ValueError("--dtype fp16 is for CUDA (torch's CPU half kernels are slow or missing)")
    # The served model's own tokenizer file: the same ids as nlpserve (a checkpoint folder
    # written by `save_pretrained` of the model alone carries no tokenizer).
    tok_file = manifest_dir / manifest["preprocessing"].get("tokenizer_file", "tokenizer.json")

    app = FastAPI(title="naive PyTorch baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    if task == "detect":
        _add_detect(app, hf_dir, manifest, tok_file, device, dtype)
    elif task == "qa":
        _add_qa(app, hf_dir, manifest, tok_file, device, dtype)
    else:
        raise NotImplementedError(f"no naive baseline for task {task!r}")
    return app


def _load(model_class: Any, hf_dir: Path, device: str, dtype: str) -> Any:
    import torch

    model = model_class.from_pretrained(str(hf_dir)).eval().to(device)
    return model.half() if dtype == "fp16" else model.to(torch.float32)


def _add_detect(app: Any, hf_dir: Path, manifest: dict[str, Any], tok_file: Path, device: str,
                dtype: str) -> None:  # fmt: skip
    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    labels: list[str] = manifest["labels"]
    max_length = int(manifest["max_length"])
    machine = labels.index("machine")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    model = _load(AutoModelForSequenceClassification, hf_dir, device, dtype)

    @app.post("/v1/detect")
    def detect(req: DetectIn) -> dict[str, Any]:
        enc = tokenizer(req.text, truncation=True, max_length=max_length, return_tensors="pt")
        enc.pop("offset_mapping", None)
        with torch.inference_mode():
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits[0]
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        k = int(probs.argmax())
        return {"label": labels[k], "machine_probability": float(probs[machine])}


def _add_qa(app: Any, hf_dir: Path, manifest: dict[str, Any], tok_file: Path, device: str,
            dtype: str) -> None:  # fmt: skip
    import torch
    from transformers import AutoModelForQuestionAnswering

    from service.preprocess.qa import QAEncoder, decode_best_span
    from service.tasks.qa import (
        DEFAULT_DOC_STRIDE,
        DEFAULT_MAX_ANSWER_LENGTH,
        DEFAULT_MAX_QUERY_LENGTH,
    )

    pre = manifest["preprocessing"]
    # The same defaults as service/tasks/qa.py when the manifest leaves a field out.
    encoder = QAEncoder.load(
        tok_file,
        max_length=int(manifest["max_length"]),
        doc_stride=pre.get("doc_stride") or DEFAULT_DOC_STRIDE,
        max_query_length=pre.get("max_query_length") or DEFAULT_MAX_QUERY_LENGTH,
    )
    max_answer = pre.get("max_answer_length") or DEFAULT_MAX_ANSWER_LENGTH
    model = _load(AutoModelForQuestionAnswering, hf_dir, device, dtype)

    @app.post("/v1/qa")
    def qa(req: QAIn) -> dict[str, Any]:
        windows = encoder.encode(req.question, req.context)
        feeds = encoder.collate(windows)
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
        start = out.start_logits.float().cpu().numpy()
        end = out.end_logits.float().cpu().numpy()
        ans = decode_best_span(req.context, windows, start, end, max_answer_length=max_answer)
        found = ans.window >= 0
        return {
            "answer": ans.text,
            "start": ans.start,
            "end": ans.end,
            "score": ans.probability if found else 0.0,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True, help="HF checkpoint (config + weights)")
    p.add_argument("--manifest-dir", type=Path, required=True, help="models/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1...")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="fp16: torch half (CUDA)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    uvicorn.run(
        build_app(args.hf_dir, args.manifest_dir, args.device, args.dtype),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
