"""Padding a batch to its longest sequence, and splitting the outputs back per sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.batching.types import WorkItem
from service.repository.manifest import TensorSpec

LENGTHS_INPUT = "lengths"  # models that take sequence lengths get them derived here
SEQUENCE_AXIS = "sequence"


def pad_batch(
    items: Sequence[WorkItem],
    inputs: Sequence[TensorSpec],
    width: int | None = None,
    rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Stack ``items`` into model feeds padded (with 0) to the batch's longest sequence, or to
    ``width`` when given; ``rows`` > len(items) appends copies of the last item (real data,
    so no row is all padding), whose outputs the caller drops."""
    longest = max(it.length for it in items)
    width = max(width or longest, longest)
    order = list(items) + [items[-1]] * max(0, (rows or 0) - len(items))
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name == LENGTHS_INPUT:
            feeds[spec.name] = np.array([it.length for it in order], dtype=spec.dtype)
            continue
        first = items[0].features[spec.name]
        out = np.zeros((len(order), width, *first.shape[1:]), dtype=spec.dtype)
        for i, it in enumerate(order):
            arr = it.features[spec.name]
            out[i, : arr.shape[0]] = arr
        feeds[spec.name] = out
    return feeds


def split_outputs(
    outputs: dict[str, np.ndarray], items: Sequence[WorkItem], specs: Sequence[TensorSpec]
) -> list[dict[str, np.ndarray]]:
    """One dict of outputs per item; sequence-shaped outputs cut back to the item's length."""
    per_item: list[dict[str, np.ndarray]] = [{} for _ in items]
    for spec in specs:
        value = outputs[spec.name]
        has_seq = len(spec.shape) > 1 and spec.shape[1] == SEQUENCE_AXIS
        for i, it in enumerate(items):
            per_item[i][spec.name] = value[i, : it.length] if has_seq else value[i]
    return per_item
