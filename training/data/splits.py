"""Deterministic, seeded train/dev/test splits.

The split depends only on ``(n, seed, ratios)``: ``nlpserve evaluate`` re-creates a model's test
split from the seed and ratios recorded in its manifest.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_RATIOS: dict[str, float] = {"train": 0.8, "dev": 0.1, "test": 0.1}


def split_indices(
    n: int, seed: int, ratios: Mapping[str, float] | None = None
) -> dict[str, list[int]]:
    """Shuffle ``range(n)`` with ``random.Random(seed)`` and cut it by ``ratios``.

    Every split but the first gets ``round(n * ratio)`` items; the first gets the rest, so the
    splits always partition ``range(n)``. Indices inside a split are ascending.
    """
    ratios = dict(ratios or DEFAULT_RATIOS)
    if not ratios:
        raise ValueError("ratios must name at least one split")
    if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    names = list(ratios)
    sizes = {name: int(round(n * ratios[name])) for name in names[1:]}
    if sum(sizes.values()) > n:
        raise ValueError(f"cannot split {n} items by {ratios}")
    sizes = {names[0]: n - sum(sizes.values()), **sizes}
    out: dict[str, list[int]] = {}
    start = 0
    for name in names:
        out[name] = sorted(order[start : start + sizes[name]])
        start += sizes[name]
    return out


def take(items: Sequence[T], indices: Sequence[int]) -> list[T]:
    return [items[i] for i in indices]


def check_evaluation_data(
    model_dir: Path,
    manifest: Any,
    files: list[Path],
    root: Path,
    sizes: dict[str, int] | None = None,
    all_recorded: bool = True,
) -> None:
    """Evaluation data against what ``manifest`` recorded: different checksums are a warning
    (the same data re-saved scores the same), different split ``sizes`` an error (a split
    re-drawn on other data can put training examples in the test split). ``all_recorded``
    False: only the recorded files among ``files`` are compared (QA reads its eval file)."""
    from training.data.checksums import compare_checksums, data_checksums
    from training.data.common import DataError

    current = data_checksums(files, root)
    read = {d.path for d in current}
    recorded = [d for d in manifest.data if all_recorded or d.path in read]
    for problem in compare_checksums(recorded, current):
        log.warning("evaluation data differs from the training data: %s", problem)
    want = manifest.split.sizes if manifest.split is not None else None
    if sizes is not None and want is not None and any(want.get(k) != v for k, v in sizes.items()):
        raise DataError(
            f"{model_dir}: data gives split sizes {sizes}, the manifest records {want}; this "
            "is not the data the model was trained on"
        )


def recreate_split(model_dir: Path, manifest: Any, corpus: Any) -> dict[str, list[int]]:
    """The split ``manifest`` records, re-created on ``corpus`` (a loaded data set with
    ``files``/``root`` and a length). Refuses data whose split sizes differ from the recorded
    ones; warns when the files' checksums differ but the sizes agree."""
    from training.data.checksums import compare_checksums, data_checksums
    from training.data.common import DataError

    if manifest.split is None:
        raise DataError(f"{model_dir}: manifest has no split; cannot re-create the test split")
    splits = split_indices(len(corpus), manifest.split.seed, manifest.split.ratios)
    sizes = {k: len(v) for k, v in splits.items()}
    for problem in compare_checksums(manifest.data, data_checksums(corpus.files, corpus.root)):
        log.warning("evaluation data differs from the training data: %s", problem)
    if sizes != manifest.split.sizes:
        raise DataError(
            f"{model_dir}: data gives split sizes {sizes}, the manifest records "
            f"{manifest.split.sizes}; this is not the data the model was trained on"
        )
    return splits
