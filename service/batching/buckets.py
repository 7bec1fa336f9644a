"""Length buckets: which bucket a sequence of a given length belongs to."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


def bucket_index(length: int, edges: Sequence[int]) -> int:
    """Index of the first bucket whose upper edge holds ``length`` (edges ascending).

    Raises ``ValueError`` past the last edge: callers truncate or reject before this.
    """
    i = bisect_left(edges, length)
    if i == len(edges):
        raise ValueError(f"length {length} exceeds the largest bucket ({edges[-1]})")
    return i
