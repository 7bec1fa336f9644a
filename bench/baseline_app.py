"""The naive baseline: what a user writes first. FastAPI + the PyTorch model, once per request.

    python -m bench.baseline_app --hf-dir <checkpoint> --manifest-dir models/detector-en/1

One ``def`` endpoint (FastAPI runs it in its thread pool), tokenizer + ``model(**inputs)``
per request, no batching, default torch threads: the usual tutorial code. It serves
``POST /v1/detect`` with nlpserve's request/response shape so the load generator can drive
both with the same requests, and ``GET /readyz``/``/healthz`` so the benchmark can wait for
it. It imports torch and transformers, so it lives in ``bench/``, never in ``service/``.
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


def build_app(hf_dir: Path, manifest_dir: Path) -> Any:
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    labels: list[str] = manifest["labels"]
    max_length = int(manifest["max_length"])
    machine = labels.index("machine")
    # The served model's own tokenizer file: the same ids as nlpserve (a checkpoint folder
    # written by `save_pretrained` of the model alone carries no tokenizer).
    tok_file = manifest_dir / manifest["preprocessing"].get("tokenizer_file", "tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()

    app = FastAPI(title="naive PyTorch baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/detect")
    def detect(req: DetectIn) -> dict[str, Any]:
        enc = tokenizer(req.text, truncation=True, max_length=max_length, return_tensors="pt")
        enc.pop("offset_mapping", None)
        with torch.inference_mode():
            logits = model(**enc).logits[0]
        probs = torch.softmax(logits.float(), dim=-1)
        k = int(probs.argmax())
        return {"label": labels[k], "machine_probability": float(probs[machine])}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True, help="HF checkpoint (config + weights)")
    p.add_argument("--manifest-dir", type=Path, required=True, help="models/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    uvicorn.run(
        build_app(args.hf_dir, args.manifest_dir),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
