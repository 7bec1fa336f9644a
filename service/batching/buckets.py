"""Length buckets: a model's bucket edges, and which bucket a sequence of a given length
belongs to."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # service.config imports this package: annotations only
    from service.config import Settings
    from service.repository import Manifest


def bucket_index(length: int, edges: Sequence[int]) -> int:
    """Index of the first bucket whose upper edge holds ``length`` (edges ascending).

    Raises ``ValueError`` past the last edge: callers truncate or reject before this.
    """
    i = bisect_left(edges, length)
    if i == len(edges):
        raise ValueError(f"length {length} exceeds the largest bucket ({edges[-1]})")
    return i


def bucket_edges(manifest: Manifest, settings: Settings) -> list[int]:
    """The model's bucket edges: NLPSERVE_BUCKETS override, else the manifest's."""
    override = settings.buckets.get(manifest.name)
    if not override:
        return list(manifest.buckets)
    edges = sorted({e for e in override if 0 < e < manifest.max_length})
    return [*edges, manifest.max_length]
