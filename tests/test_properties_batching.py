"""Properties of service/batching's pure parts: padding a batch and splitting its outputs
back, bucket routing, and forming one batch from a bucket's pending sequences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.batching import BatchPolicy, PendingBucket, WorkItem, bucket_index
from service.batching.assemble import LENGTHS_INPUT, pad_batch, split_outputs
from service.repository.manifest import TensorSpec

INPUTS = [
    TensorSpec(name="word_ids", dtype="int64", shape=["batch", "sequence"]),
    TensorSpec(name="char_ids", dtype="int64", shape=["batch", "sequence", 3]),
    TensorSpec(name=LENGTHS_INPUT, dtype="int64", shape=["batch"]),
]
# What an echoing model returns: its two sequence inputs, and one value per row.
OUTPUTS = [
    TensorSpec(name="word_ids", dtype="int64", shape=["batch", "sequence"]),
    TensorSpec(name="char_ids", dtype="int64", shape=["batch", "sequence", 3]),
    TensorSpec(name="score", dtype="float32", shape=["batch", 2]),
]
nonzero = st.integers(1, 2**40)  # real data is never the padding value, so padding shows


@st.composite
def work_items(draw: st.DrawFn, max_length: int = 12) -> WorkItem:
    n = draw(st.integers(0, max_length))
    return WorkItem(
        model="m",
        bucket=0,
        length=n,
        features={
            "word_ids": draw(hnp.arrays(np.int64, (n,), elements=nonzero)),
            "char_ids": draw(hnp.arrays(np.int64, (n, 3), elements=nonzero)),
        },
        deadline=1e12,
        id="item",  # not the default's random id: strategies must not use `random`
        enqueued_at=0.0,
    )


@given(
    st.lists(work_items(), min_size=1, max_size=6),
    st.none() | st.integers(0, 16),
    st.none() | st.integers(0, 9),
)
def test_a_padded_batch_splits_back_into_each_items_own_rows(items, width, rows) -> None:
    feeds = pad_batch(items, INPUTS, width=width, rows=rows)
    longest = max(it.length for it in items)
    n_rows = max(len(items), rows or 0)
    assert feeds["word_ids"].shape == (n_rows, max(longest, width or 0))
    order = items + [items[-1]] * (n_rows - len(items))  # extra rows repeat the last item
    assert feeds[LENGTHS_INPUT].tolist() == [it.length for it in order]
    for i, it in enumerate(order):
        for name in ("word_ids", "char_ids"):
            assert not feeds[name][i, it.length :].any()  # padding is 0, after the item
    scores = np.arange(n_rows * 2, dtype=np.float32).reshape(n_rows, 2)
    outputs = {"word_ids": feeds["word_ids"], "char_ids": feeds["char_ids"], "score": scores}
    back = split_outputs(outputs, items, OUTPUTS)
    assert len(back) == len(items)
    for i, (it, out) in enumerate(zip(items, back, strict=True)):
        assert np.array_equal(out["word_ids"], it.features["word_ids"])
        assert np.array_equal(out["char_ids"], it.features["char_ids"])
        assert np.array_equal(out["score"], scores[i])


@given(st.lists(st.integers(1, 512), min_size=1, max_size=6, unique=True), st.integers(0, 600))
def test_a_length_goes_to_the_first_bucket_that_holds_it(edges, length) -> None:
    edges = sorted(edges)
    if length > edges[-1]:
        with pytest.raises(ValueError):
            bucket_index(length, edges)
        return
    i = bucket_index(length, edges)
    assert length <= edges[i] and (i == 0 or edges[i - 1] < length)
    assert bucket_index(max(0, length - 1), edges) <= i  # monotone


policies = st.builds(
    BatchPolicy,
    max_batch_size=st.integers(1, 6),
    max_batch_tokens=st.integers(1, 80),
    min_padding_efficiency=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)


@given(policies, st.lists(st.integers(0, 30), min_size=1, max_size=40))
def test_take_keeps_every_rule_and_loses_nothing(policy, lengths) -> None:
    pending = PendingBucket[WorkItem]()
    items = [
        WorkItem("m", 0, n, {}, deadline=1e12, id=str(i), enqueued_at=float(i))
        for i, n in enumerate(lengths)
    ]
    for it in items:
        pending.add(it)
    batch = pending.take(policy)
    assert batch[0] is items[0]  # the oldest always goes
    assert len(batch) <= policy.max_batch_size
    ids = [int(it.id) for it in batch]
    assert ids == sorted(ids)  # arrival order
    # Batch mates come from the lookahead window only.
    assert max(ids) < 4 * policy.max_batch_size
    if len(batch) > 1:
        longest = max(it.length for it in batch)
        assert len(batch) * longest <= policy.max_batch_tokens
        real = sum(it.length for it in batch)
        assert real >= policy.min_padding_efficiency * len(batch) * longest - 1e-9
    # The rest wait in arrival order, in front of nothing new: nothing lost or duplicated.
    assert list(pending.items) == [it for it in items if it not in batch]
