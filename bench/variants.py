"""Benchmark-only model variants: fp32/fp16 ONNX files a version does not commit.

The repository commits what serves best on a CPU (``detector-en/1``: int8 only, for size), but
a GPU benchmark needs fp32 and fp16. ``derive_version`` writes a *copy* of a version, for the
benchmark's private model repository, with the missing variants made from the version's own
weights, the way ``training/transformer/export.py`` makes them at export:

* fp32: exported with the training exporter from the PyTorch weights: ``--hf-dir`` when
  given (the real checkpoint), else the weights read back out of the version's ONNX file by
  ``bench/onnx_to_torch.py`` (exact from an fp32 file; from an int8-only version they are the
  DEQUANTIZED weights: the same architecture and sizes, each weight within half a
  quantisation step, so throughput is that of the real model while accuracy is not claimed);
* fp16: the training code's ``convert_fp16`` of that fp32 file (BERT fusions, keep_io_types).

The PyTorch weights used are left in ``<copy>/hf`` so the naive baseline runs exactly the
weights the derived ONNX files hold (the report's ``answers`` check shows it). Nothing is
written under ``models/``.

    python -m bench.variants --models models --model detector-en --variants fp32,fp16 \\
        --out /tmp/gpu-models
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.data.checksums import sha256_file

log = logging.getLogger(__name__)

DERIVABLE = ("fp32", "fp16")
TASK_HEADS = {"detect": "AutoModelForSequenceClassification", "qa": "AutoModelForQuestionAnswering"}


def _free_name(folder: Path, wanted: str) -> Path:
    """``wanted`` in ``folder`` unless a file of the version already has that name."""
    p = folder / wanted
    return p if not p.exists() else folder / wanted.replace(".onnx", ".derived.onnx")


def derive_version(
    src: Path,
    out_root: Path,
    variants: Sequence[str],
    hf_dir: Path | None = None,
) -> tuple[Path, list[str]]:
    """Copy version ``src`` to ``out_root/<name>/<version>`` with each of ``variants`` that it
    lacks (fp32, fp16) derived from its weights. Returns the copy and notes for the report.

    Files of ``src`` are symlinked, the manifest is rewritten (validated by the service's own
    loader); a variant ``src`` already has is kept as it is.
    """
    import transformers

    from service.repository.manifest import load_manifest
    from training.transformer.export import convert_fp16, example_batch, export_onnx, parity

    manifest: dict[str, Any] = json.loads((src / "manifest.json").read_text())
    unknown = [v for v in variants if v not in DERIVABLE and v not in manifest["variants"]]
    if unknown:
        raise ValueError(f"cannot derive variant(s) {unknown}; derivable: {DERIVABLE}")
    task = manifest["task"]
    if task not in TASK_HEADS:
        raise NotImplementedError(f"no derived variants for task {task!r}")
    dst = out_root / manifest["name"] / manifest["version"]
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())

    by_precision = {v["precision"]: k for k, v in manifest["variants"].items()}
    missing = [v for v in variants if v in DERIVABLE and v not in by_precision]
    notes: list[str] = []
    if not missing:
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        load_manifest(dst)
        return dst, notes

    # The PyTorch weights everything derived comes from.
    if hf_dir is not None:
        weights, origin = hf_dir, f"the checkpoint {hf_dir}"
    else:
        from bench.onnx_to_torch import hf_from_onnx

        weights, kind = hf_from_onnx(src, dst / "hf")
        origin = (
            "the fp32 ONNX file's weights (exact)"
            if kind == "fp32"
            else "the int8 file's DEQUANTIZED weights (same architecture and sizes; accuracy "
            "not that of the served model, throughput is)"
        )
    if not (dst / "hf").exists():
        (dst / "hf").symlink_to(weights.resolve(), target_is_directory=True)
    head = getattr(transformers, TASK_HEADS[task])
    model = head.from_pretrained(str(weights)).eval()
    config = model.config

    fp32_key = by_precision.get("fp32")
    if fp32_key is not None:
        fp32_path = dst / manifest["variants"][fp32_key]["file"]
    else:
        fp32_path = _free_name(dst, "model.onnx")
        example = example_batch(int(config.vocab_size))
        export_onnx(model, fp32_path, task, example)
        diff = parity(model, fp32_path, example, task)
        if diff > 1e-3:
            raise RuntimeError(f"derived fp32 export differs from PyTorch by {diff:.2e}")
        manifest["variants"]["fp32"] = {
            "file": fp32_path.name,
            "precision": "fp32",
            "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
            "sha256": sha256_file(fp32_path),
            "metrics": {},
        }
        notes.append(
            f"{manifest['name']}: fp32 variant derived for the benchmark from {origin} "
            f"(training exporter, ONNX vs PyTorch max |diff| {diff:.1e})."
        )
    if "fp16" in missing:
        fp16_path, fused = convert_fp16(
            fp32_path, _free_name(dst, "model.fp16.onnx"),
            int(config.num_attention_heads), int(config.hidden_size),
        )  # fmt: skip
        manifest["variants"]["fp16"] = {
            "file": fp16_path.name,
            "precision": "fp16",
            "providers": ["CUDAExecutionProvider"],
            "sha256": sha256_file(fp16_path),
            "metrics": {},
        }
        notes.append(
            f"{manifest['name']}: fp16 variant derived for the benchmark from the fp32 file "
            f"({'BERT-fused, ' if fused else 'NOT fused, '}keep_io_types; training's "
            "convert_fp16); its accuracy is not measured here."
        )
    manifest["description"] = (
        manifest.get("description", "") + " [bench copy: " + " ".join(notes) + "]"
    )
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    load_manifest(dst)  # the service must accept the copy as it accepts the original
    return dst, notes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--model", required=True)
    p.add_argument("--version", default=None, help="default: the newest")
    p.add_argument("--variants", default="fp32,fp16")
    p.add_argument("--hf-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="a model repository to write into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    folder = args.models / args.model
    version = args.version or max(
        (d.name for d in folder.iterdir() if (d / "manifest.json").is_file()),
        key=lambda n: (n.isdigit(), int(n) if n.isdigit() else 0),
    )
    dst, notes = derive_version(
        folder / version, args.out, [v for v in args.variants.split(",") if v], args.hf_dir
    )
    print(dst)
    for n in notes:
        print(" ", n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
