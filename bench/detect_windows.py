"""Does ``/v1/detect``'s ``windows`` option judge long texts better than reading their head?

On the committed detector's own HC3 test split (re-created from its manifest, as ``nlpserve
evaluate`` does), every text is scored twice through ``nlpserve predict`` (the service's own
tokenization, batching and decoding, in-process): as sent by default (the head, cut at the
model's max length) and with ``"windows": true`` (the whole text, the windows' mean
log-odds, weighted by their tokens). Reports accuracy and ROC AUC over all texts and over
the texts longer than the model reads, with the windows those took.

    python bench/detect_windows.py --data ../shared/data --out /tmp/windows.json

Needs the ``train`` extra (the split is training's code) and HC3 under ``--data``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_split(folder: Path, data: Path) -> list[Any]:
    """The manifest's HC3 test split, checked against its recorded checksums."""
    from service.repository import load_manifest
    from training.data.hc3 import hc3_files, load_hc3
    from training.data.splits import check_evaluation_data
    from training.transformer.detector import split_by_question

    m = load_manifest(folder)
    if m.split is None:
        raise SystemExit(f"{folder}: the manifest records no split to re-create")
    files = hc3_files(data, m.hyperparameters.get("lang", "en"))
    splits = split_by_question(load_hc3(files), m.split.seed, m.split.ratios)
    check_evaluation_data(folder, m, files, data, {k: len(v) for k, v in splits.items()})
    return splits["test"]


def predict(model: str, models: Path, items: list[dict[str, Any]], variant: str | None) -> list:
    """``nlpserve predict`` over ``items``: one answer per item, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        cmd = [sys.executable, "-m", "service.cli", "predict", model, "--models", str(models),
               "-i", str(src), "-o", str(dst)]  # fmt: skip
        cmd += ["--variant", variant] if variant else []
        subprocess.run(cmd, check=True, cwd=ROOT)
        return [json.loads(line) for line in dst.read_text("utf-8").splitlines()]


def scores(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from training.metrics.classification import binary_metrics

    m = binary_metrics(labels, p)
    return {"n": len(labels), "accuracy": m["accuracy"], "roc_auc": m["roc_auc"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the folder holding hc3/")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="detector-en")
    ap.add_argument("--version", default="1")
    ap.add_argument("--variant", help="default: the model's default CPU variant")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = ap.parse_args(argv)

    from service.preprocess.classify import ClassifyEncoder
    from service.repository import load_manifest

    folder = args.models / args.model / args.version
    test = test_split(folder, args.data)
    m = load_manifest(folder)
    encoder = ClassifyEncoder.load(folder / m.preprocessing.tokenizer_file, m.max_length)
    windows = [len(w) for w in encoder.encode_windows([e.text for e in test])]
    labels = np.asarray([e.label for e in test])
    long = np.asarray(windows) > 1  # more than the model reads at once
    runs: dict[str, Any] = {}
    for name, extra in (("head", {}), ("windows", {"windows": True})):
        t0 = time.perf_counter()
        out = predict(args.model, args.models, [{"text": e.text, **extra} for e in test],
                      args.variant)  # fmt: skip
        p = np.asarray([o["machine_probability"] for o in out])
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "all": scores(labels, p),
            "long": scores(labels[long], p[long]),
            "short": scores(labels[~long], p[~long]),
        }
    summary = {
        "model": f"{args.model}/{args.version}",
        "variant": args.variant or "default",
        "max_length": m.max_length,
        "texts": len(test),
        "long_texts": int(long.sum()),
        "windows_of_long_texts": {
            "mean": float(np.mean(np.asarray(windows)[long]) if long.any() else 0),
            "max": int(max(windows)),
        },  # fmt: skip
        "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
