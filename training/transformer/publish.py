"""Copy a trained entry into the committed repository, keeping only some variants.

    python -m training.transformer.publish runs/models2/qa-zh/1 models/qa-zh/1 --keep int8 \
        --pretrained runs/zh-minilm-mlm --earlier runs/models/qa-zh/1 \
        --baseline runs/models2/qa-zh-scratch/1 --baseline-earlier runs/models/qa-zh-scratch/1

The dropped variants (fp32: ~90 MB for the detector, ~55 MB for qa-zh; fp16 for CUDA) stay
reproducible with the ``command`` in the manifest; their file names and measured metrics are
kept under ``hyperparameters.dropped_variants``. ``--baseline`` merges the test metrics of a
comparison entry (the same QA recipe without pretraining) into ``metrics`` as
``no_pretraining_*``; ``--pretrained`` records the base's ``pretrain_summary.json`` (command,
steps, MLM figures, the encoder it started from) under ``hyperparameters.pretraining``.
``--earlier`` / ``--baseline-earlier`` (repeatable, in order) record the commands and scores of
the rounds an entry (or its baseline) was continued from, e.g. a first fine-tuning epoch whose
best checkpoint was the ``--base-model`` of the published one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from training.transformer.common import prune_variants

# The scores a manifest takes over from a baseline or an earlier round (QA's, the detector's).
ROUND_KEYS = ("em", "f1", "heldout_em", "heldout_f1", "accuracy", "roc_auc", "dev_accuracy",
              "train_seconds")  # fmt: skip
ROUND_HYPERPARAMETERS = ("steps", "autocast")


def publish_entry(
    src: Path,
    dst: Path,
    keep: list[str],
    baseline: Path | None = None,
    note: str = "",
    pretrained: Path | None = None,
    earlier: Sequence[Path] = (),
    baseline_earlier: Sequence[Path] = (),
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
        for k in ROUND_KEYS:
            if k in base.metrics:
                raw["metrics"][f"no_pretraining_{k}"] = base.metrics[k]
        raw["hyperparameters"]["no_pretraining_command"] = base.command
        if "em" in base.metrics:
            raw["description"] += (
                f" Same recipe without pretraining (random init): EM {base.metrics['em']:.2f}, "
                f"F1 {base.metrics['f1']:.2f}."
            )
    if pretrained is not None:
        raw["hyperparameters"]["pretraining"] = pretraining_record(pretrained)
    if earlier:
        raw["hyperparameters"]["earlier_rounds"] = [round_record(p) for p in earlier]
    if baseline_earlier:
        raw["hyperparameters"]["no_pretraining_earlier_rounds"] = [
            round_record(p) for p in baseline_earlier
        ]
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


def round_record(folder: Path) -> dict:
    """An earlier training round: its command and scores (test and held-out). Only its
    manifest is read: the round's model files may stay where it ran (a GPU machine)."""
    from service.repository import load_manifest

    m = load_manifest(folder, check_files=False)
    rec = {"command": m.command, **{k: m.metrics[k] for k in ROUND_KEYS if k in m.metrics}}
    # What its command alone may not fix: the step count (a --time-budget-minutes run's
    # depends on the machine's pace) and the precision it really ran in.
    rec.update({k: m.hyperparameters[k] for k in ROUND_HYPERPARAMETERS if k in m.hyperparameters})
    return rec


PRETRAINING_KEYS = ("command", "steps", "autocast", "epochs", "seconds", "mlm_loss", "mlm_accuracy",
                    "init")  # fmt: skip


def pretraining_record(folder: Path) -> dict:
    """What a QA manifest says of its base: the pretraining command and figures."""
    summary = json.loads((folder / "pretrain_summary.json").read_text(encoding="utf-8"))
    rec = {k: summary[k] for k in PRETRAINING_KEYS if k in summary}
    for k in ("epochs", "seconds", "mlm_loss", "mlm_accuracy"):
        if k in rec:
            rec[k] = round(float(rec[k]), 4)
    rec["corpus_tokens"] = summary.get("tokens")
    rec["device"] = summary.get("config", {}).get("device")
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--keep", default="int8", help="comma-separated variants to keep")
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--note", default="", help="appended to the description")
    ap.add_argument("--pretrained", type=Path, default=None, help="the base's pretrain folder")
    ap.add_argument("--earlier", type=Path, action="append", default=[],
                    help="an entry this one was continued from (repeatable, in order)")  # fmt: skip
    ap.add_argument("--baseline-earlier", type=Path, action="append", default=[],
                    help="the same for --baseline")  # fmt: skip
    a = ap.parse_args(argv)
    keep = [k for k in a.keep.split(",") if k]
    metrics = publish_entry(
        a.src, a.dst, keep, a.baseline, a.note, a.pretrained, a.earlier, a.baseline_earlier
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
