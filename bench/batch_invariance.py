"""How much a detector answer depends on the other requests in its batch, per variant.

The batcher pads a request to its batch's longest sequence and runs it with its batch-mates.
In fp32 that changes a row only by float rounding. The int8 files are dynamically
quantised: ONNX Runtime computes each MatMul input's scale over the whole batch tensor,
padding included, so a request's logits move with what it is batched with. This script
measures that effect. It runs each of ``--requests`` benchmark texts alone, unpadded, and
inside consecutive groups of ``--batch`` padded to the group's longest, then reports the
machine-probability differences and the label flips.

    python -m bench.batch_invariance --data ../shared/data                  # committed variants
    python -m bench.batch_invariance --data ../shared/data --derive fp32    # + fp32 from int8

``--derive fp32`` adds an fp32 file made from the int8 weights (``bench/variants.py``), in a
temporary copy. Nothing is written under ``models/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.loadgen import build_requests
from service.preprocess.classify import ClassifyEncoder, softmax
from service.repository import load_manifest


def measure(
    version_dir: Path, variant: str, texts: Sequence[str], batch: int
) -> dict[str, float | int]:
    """Machine-probability differences between each text alone and in its batch."""
    manifest = load_manifest(version_dir)
    spec = manifest.variants[variant]
    encoder = ClassifyEncoder.load(version_dir / manifest.preprocessing.tokenizer_file,
                                   manifest.max_length)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / spec.file), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    machine = manifest.labels.index("machine")
    names = {i.name for i in session.get_inputs()}  # a DistilBERT export takes no token types

    def feeds(group: list[str]) -> dict[str, np.ndarray]:
        return {k: v for k, v in encoder(group).items() if k in names}

    diffs: list[float] = []
    flips = 0
    for start in range(0, len(texts), batch):
        group = list(texts[start : start + batch])
        together = softmax(session.run(["logits"], feeds(group))[0])[:, machine]
        for text, p_batch in zip(group, together, strict=True):
            p_alone = softmax(session.run(["logits"], feeds([text]))[0])[0, machine]
            diffs.append(abs(float(p_alone) - float(p_batch)))
            flips += (p_alone > 0.5) != (p_batch > 0.5)
    d = np.asarray(diffs)
    return {
        "requests": len(diffs),
        "median_abs_diff": float(np.median(d)),
        "p99_abs_diff": float(np.percentile(d, 99)),
        "max_abs_diff": float(d.max()),
        "label_flips": int(flips),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--model", default="detector-en")
    p.add_argument("--version", default="1")
    p.add_argument("--data", type=Path, default=None, help="request texts (else generated)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--batch", type=int, default=4, help="batch-mates per group")
    p.add_argument("--derive", default="", help="variants to add from the weights, e.g. fp32")
    args = p.parse_args(argv)

    version = args.models / args.model / args.version
    specs = build_requests(args.model, args.requests, models_dir=args.models, data_dir=args.data)
    texts = [s.payload["text"] for s in specs]
    with tempfile.TemporaryDirectory(prefix="nlpserve-invariance-") as tmp:
        wanted = [v for v in args.derive.split(",") if v]
        if wanted:
            from bench.variants import derive_version

            version, _ = derive_version(version, Path(tmp), wanted)
        out = {
            v: measure(version, v, texts, args.batch)
            for v in sorted(load_manifest(version).variants)
        }
    json.dump({"model": args.model, "batch": args.batch, "variants": out}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
