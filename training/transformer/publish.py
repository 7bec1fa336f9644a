"""Copy a trained entry into the committed repository, keeping only some variants.

    python -m training.transformer.publish runs/models/qa-zh/1 models/qa-zh/1 --keep int8 \
        --baseline runs/models/qa-zh-scratch/1

The dropped variants (fp32 ~90 MB for MiniLM, fp16 for CUDA) stay reproducible with the
``command`` in the manifest; their file names and measured metrics are kept under
``hyperparameters.dropped_variants``. ``--baseline`` merges the test metrics of a comparison
entry (the same QA recipe without pretraining) into ``metrics`` as ``no_pretraining_*``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.transformer.common import prune_variants


def publish_entry(
    src: Path,
    dst: Path,
    keep: list[str],
    baseline: Path | None = None,
    note: str = "",
) -> dict[str, float]:
    from service.repository import load_manifest

    load_manifest(src)
    staging = dst.parent / f".{dst.name}.publish"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging)
    path = staging / "manifest.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["name"], raw["version"] = dst.parent.name, dst.name  # discovery checks the folder
    if note:
        raw["description"] += " " + note
    if baseline is not None:
        base = load_manifest(baseline)
        for k in ("em", "f1", "heldout_em", "heldout_f1", "train_seconds"):
            if k in base.metrics:
                raw["metrics"][f"no_pretraining_{k}"] = base.metrics[k]
        raw["hyperparameters"]["no_pretraining_command"] = base.command
        if "em" in base.metrics:
            raw["description"] += (
                f" Same recipe without pretraining (random init): EM {base.metrics['em']:.2f}, "
                f"F1 {base.metrics['f1']:.2f}."
            )
    dropped = [k for k in raw["variants"] if k not in keep]
    if dropped:
        raw["description"] += (
            f" Committed variant(s): {', '.join(keep)}; {', '.join(dropped)} left out for size "
            "(reproducible with the manifest's command; their metrics are in "
            "hyperparameters.dropped_variants)."
        )
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    prune_variants(staging, keep)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(dst)
    return load_manifest(dst).metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--keep", default="int8", help="comma-separated variants to keep")
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--note", default="", help="appended to the description")
    a = ap.parse_args(argv)
    keep = [k for k in a.keep.split(",") if k]
    print(json.dumps(publish_entry(a.src, a.dst, keep, a.baseline, a.note), indent=2))


if __name__ == "__main__":
    main()
