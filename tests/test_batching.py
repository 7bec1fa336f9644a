"""Batch forming: PendingBucket and BucketScheduler rules, with explicit clocks (no sleeps)."""

from __future__ import annotations

import numpy as np
import pytest

from service.batching import BatchPolicy, BucketScheduler, PendingBucket, WorkItem, bucket_index
from service.batching.scheduler import (
    BATCH_LANE,
    EXPLAIN_LANE,
    PREDICT_LANE,
    lanes_through,
    request_lane,
)

T0 = 1_000.0


def item(
    length: int,
    bucket: int = 0,
    at: float = T0,
    lane: str = PREDICT_LANE,
    deadline: float | None = None,
) -> WorkItem:
    return WorkItem(
        model="m",
        bucket=bucket,
        length=length,
        features={"word_ids": np.ones(length, dtype=np.int64)},
        deadline=deadline if deadline is not None else at + 60,
        lane=lane,
        enqueued_at=at,
    )


def formed(batch: list[WorkItem] | None) -> list[WorkItem]:
    """A batch ``next_batch`` must have returned: ``None`` fails here, not as a TypeError."""
    assert batch is not None, "no batch was ready"
    return batch


POLICY = BatchPolicy(max_batch_size=4, max_batch_tokens=64, max_wait_s=0.010)


# ------------------------------------------------------------------ PendingBucket
def test_max_batch_size_caps_a_batch():
    pb = PendingBucket[WorkItem]()
    for _ in range(6):
        pb.add(item(5))
    assert pb.is_full(POLICY)
    assert len(pb.take(POLICY)) == 4
    assert len(pb) == 2


def test_token_budget_counts_padded_tokens():
    # 3 x 20 = 60 fits in 64, but 4 x 20 = 80 would not.
    pb = PendingBucket[WorkItem]()
    for n in (20, 10, 5, 5):
        pb.add(item(n))
    batch = pb.take(POLICY)
    assert [it.length for it in batch] == [20, 10, 5]
    assert len(batch) * max(it.length for it in batch) <= POLICY.max_batch_tokens
    assert [it.length for it in pb.take(POLICY)] == [5]


def test_batch_mates_are_nearest_in_length_and_the_oldest_always_goes():
    policy = BatchPolicy(max_batch_size=3, max_batch_tokens=10_000, max_wait_s=0.010)
    pb = PendingBucket[WorkItem]()
    for n in (30, 8, 31, 9, 29, 10, 40):
        pb.add(item(n))
    first = pb.take(policy)
    assert [it.length for it in first] == [30, 31, 29]  # arrival order kept within a batch
    # the rest keep their arrival order: the next batch starts with the oldest left (8)
    assert [it.length for it in pb.take(policy)] == [8, 9, 10]
    assert [it.length for it in pb.take(policy)] == [40]
    assert len(pb) == 0


def test_a_long_sequence_over_the_budget_is_skipped_for_shorter_mates():
    # anchor 10: 15 is nearer than 2, but 2 x 15 = 30 > 25, so the 2 joins instead.
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=25, max_wait_s=0.010)
    pb = PendingBucket[WorkItem]()
    for n in (10, 15, 2):
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [10, 2]
    assert [it.length for it in pb.take(policy)] == [15]


def test_padding_floor_keeps_unlike_lengths_out_of_a_batch():
    # anchor 40: 38 and 36 keep the batch at >= 0.9 real/padded; 20 would drop it to
    # (40+38+36+20)/(4x40) = 0.84, so it waits for a batch of its own length.
    policy = BatchPolicy(
        max_batch_size=8, max_batch_tokens=10_000, max_wait_s=0.010, min_padding_efficiency=0.9
    )
    pb = PendingBucket[WorkItem]()
    for n in (40, 20, 38, 36, 19):
        pb.add(item(n))
    first = pb.take(policy)
    assert [it.length for it in first] == [40, 38, 36]
    assert sum(it.length for it in first) / (3 * 40) >= 0.9
    assert [it.length for it in pb.take(policy)] == [20, 19]
    # Without the floor the same queue makes one batch.
    pb = PendingBucket[WorkItem]()
    for n in (40, 20, 38, 36, 19):
        pb.add(item(n))
    assert len(pb.take(BatchPolicy(max_batch_size=8, max_batch_tokens=10_000))) == 5


def test_padding_floor_never_leaves_the_oldest_behind():
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=10_000, min_padding_efficiency=1.0)
    pb = PendingBucket[WorkItem]()
    for n in (7, 3, 7, 5):
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [7, 7]
    assert [it.length for it in pb.take(policy)] == [3]
    assert [it.length for it in pb.take(policy)] == [5]


@pytest.mark.parametrize("floor", [-0.1, 1.1])
def test_padding_floor_outside_0_1_is_rejected(floor):
    with pytest.raises(ValueError):
        BatchPolicy(min_padding_efficiency=floor)


def test_a_sequence_over_the_budget_still_runs_alone():
    pb = PendingBucket[WorkItem]()
    pb.add(item(100))
    pb.add(item(3))
    assert [it.length for it in pb.take(POLICY)] == [100]
    assert [it.length for it in pb.take(POLICY)] == [3]


def test_wait_rule():
    pb = PendingBucket[WorkItem]()
    pb.add(item(5, at=T0))
    assert not pb.ready(POLICY, now=T0 + 0.005)
    assert pb.time_to_ready(POLICY, now=T0 + 0.004) == pytest.approx(0.006)
    assert pb.ready(POLICY, now=T0 + 0.011)


def test_a_short_deadline_ends_the_wait_half_way_to_it():
    """A sequence waits for company at most half the time it had left when queued: with a
    2 s max wait, one whose client allowed 500 ms (X-Deadline-Ms) was held to its deadline
    and never ran. The earliest such sequence in the bucket decides, not only the oldest."""
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=64, max_wait_s=2.0)
    pb = PendingBucket[WorkItem]()
    pb.add(item(5, at=T0))  # 60 s deadline: its own limit is the max wait (T0 + 2)
    assert pb.time_to_ready(policy, now=T0) == pytest.approx(2.0)
    pb.add(item(5, at=T0 + 0.1, deadline=T0 + 0.6))  # 500 ms: flushed by T0 + 0.35
    assert not pb.ready(policy, now=T0 + 0.3)
    assert pb.time_to_ready(policy, now=T0 + 0.3) == pytest.approx(0.05)
    assert pb.ready(policy, now=T0 + 0.35)
    s = BucketScheduler[WorkItem](policy)
    s.add(item(5, at=T0, deadline=T0 + 0.2))
    assert s.next_wakeup(now=T0) == pytest.approx(0.1)
    assert s.next_batch(now=T0 + 0.05) is None
    assert len(formed(s.next_batch(now=T0 + 0.1))) == 1


def test_readiness_checks_look_at_each_sequence_once():
    """The scheduler asks whether a bucket is ready (is_full, then flush_at) at every
    submission: going over every waiting sequence each time, forming a 256-sequence batch
    cost ~19 ms of event loop. What they found is kept; only sequences added since are read."""
    reads = 0

    class Counted(WorkItem):
        def __getattribute__(self, name: str) -> object:
            nonlocal reads
            reads += name in ("length", "deadline")
            return super().__getattribute__(name)

    policy = BatchPolicy(max_batch_size=256, max_batch_tokens=1_000_000, max_wait_s=2.0)
    pb = PendingBucket[WorkItem]()
    for n in range(255):
        # enqueued_at given: its default (time.monotonic()) is below T0 on a machine up
        # for under 17 minutes, where the first sequence has waited its max_wait already.
        pb.add(
            Counted(
                model="m", bucket=0, length=5, features={}, deadline=T0 + 60 + n, enqueued_at=T0
            )
        )
        assert not pb.ready(policy, now=T0)
        assert pb.time_to_ready(policy, now=T0) is not None
    assert reads <= 3 * 255  # was 130,560: every sequence at every check


def test_what_readiness_keeps_is_forgotten_when_sequences_leave():
    """A removal (expired, dropped, taken) starts the kept readiness over: the sequence
    that set the earliest flush or filled the batch may be the one gone."""
    policy = BatchPolicy(max_batch_size=3, max_batch_tokens=64, max_wait_s=2.0)
    pb = PendingBucket[WorkItem]()
    pb.add(item(5, at=T0))
    pb.add(item(5, at=T0, deadline=T0 + 1.0))  # flush by T0 + 0.5
    assert pb.time_to_ready(policy, now=T0) == pytest.approx(0.5)
    assert [it.deadline for it in pb.drop_expired(now=T0 + 1.0)] == [T0 + 1.0]
    assert pb.time_to_ready(policy, now=T0 + 1.0) == pytest.approx(1.0)  # the max wait again
    pb.add(item(5, at=T0 + 1.0))
    assert not pb.is_full(policy)
    pb.add(item(5, at=T0 + 1.0))
    assert pb.is_full(policy)
    assert len(pb.take(policy)) == 3 and len(pb) == 0
    pb.add(item(5, at=T0 + 1.0))
    assert not pb.is_full(policy)
    s = BucketScheduler[WorkItem](policy)
    short = item(5, at=T0, deadline=T0 + 0.2)
    s.add(item(5, at=T0))
    s.add(short)
    assert s.next_wakeup(now=T0) == pytest.approx(0.1)
    assert s.drop(lambda it: it is short) == [short]
    assert s.next_wakeup(now=T0) == pytest.approx(2.0)


def test_bucket_index_edges():
    edges = [8, 16, 64]
    assert [bucket_index(n, edges) for n in (1, 8, 9, 16, 17, 64)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        bucket_index(65, edges)


# ------------------------------------------------------------------ BucketScheduler
def test_nothing_ready_before_max_wait_unless_full():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, at=T0))
    assert s.next_batch(now=T0 + 0.001) is None
    assert s.next_wakeup(now=T0 + 0.001) == pytest.approx(0.009)
    for _ in range(3):
        s.add(item(5, at=T0 + 0.001))
    batch = s.next_batch(now=T0 + 0.001)  # 4 = max batch size: full, runs at once
    assert batch is not None and len(batch) == 4
    assert s.next_wakeup(now=T0 + 0.002) is None


def test_buckets_never_mix_and_oldest_ready_bucket_goes_first():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(30, bucket=2, at=T0 + 0.002))
    s.add(item(3, bucket=0, at=T0))
    s.add(item(4, bucket=0, at=T0 + 0.003))
    now = T0 + 0.5
    first = formed(s.next_batch(now))
    second = formed(s.next_batch(now))
    assert [it.bucket for it in first] == [0, 0]
    assert [it.bucket for it in second] == [2]
    assert s.next_batch(now) is None


def test_no_wait_takes_unready_buckets():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, at=T0))
    assert s.next_batch(now=T0) is None
    assert len(formed(s.next_batch(now=T0, no_wait=True))) == 1


def test_explain_lane_waits_while_predict_work_is_pending():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, bucket=0, at=T0, lane=EXPLAIN_LANE))
    s.add(item(5, bucket=1, at=T0 + 0.009, lane=PREDICT_LANE))
    # The explain item is ready (waited 10 ms) but a predict item is still filling its batch.
    now = T0 + 0.011
    assert s.next_batch(now) is None
    assert s.next_wakeup(now) == pytest.approx(0.008)
    batch = formed(s.next_batch(T0 + 0.020))
    assert [it.lane for it in batch] == [PREDICT_LANE]
    assert [it.lane for it in formed(s.next_batch(T0 + 0.020))] == [EXPLAIN_LANE]


def test_batch_lane_runs_after_predict_and_before_explain():
    """Batch-priority work waits for every predict item (even one filling its batch), and
    goes before explanations queued earlier."""
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, bucket=0, at=T0, lane=EXPLAIN_LANE))
    s.add(item(5, bucket=0, at=T0 + 0.001, lane=BATCH_LANE))
    s.add(item(5, bucket=1, at=T0 + 0.009, lane=PREDICT_LANE))
    assert s.next_batch(T0 + 0.011) is None  # predict still filling: nothing else runs
    order = [formed(s.next_batch(T0 + 0.020))[0].lane for _ in range(3)]
    assert order == [PREDICT_LANE, BATCH_LANE, EXPLAIN_LANE]
    assert s.depth(lanes=lanes_through(PREDICT_LANE)) == 0


def test_request_lane_and_the_lanes_ahead_of_it():
    assert request_lane([PREDICT_LANE, BATCH_LANE]) == BATCH_LANE
    assert request_lane([EXPLAIN_LANE, PREDICT_LANE]) == EXPLAIN_LANE
    assert request_lane([PREDICT_LANE]) == PREDICT_LANE
    assert request_lane(["bulk"]) is None and request_lane([]) is None
    assert lanes_through(PREDICT_LANE) == (PREDICT_LANE,)
    assert lanes_through(BATCH_LANE) == (PREDICT_LANE, BATCH_LANE)
    assert (
        lanes_through(EXPLAIN_LANE)
        == lanes_through(None)
        == (
            PREDICT_LANE,
            BATCH_LANE,
            EXPLAIN_LANE,
        )
    )


def test_unknown_lane_rejected():
    with pytest.raises(ValueError, match="lane"):
        BucketScheduler[WorkItem](POLICY).add(item(3, lane="bulk"))


def test_drop_expired_and_drop_predicate():
    s = BucketScheduler[WorkItem](POLICY)
    late = item(5, deadline=T0 + 1)
    ok = item(6, deadline=T0 + 100)
    gone = item(7)
    for it in (late, ok, gone):
        s.add(it)
    assert s.drop_expired(now=T0 + 2) == [late]
    assert s.drop(lambda it: it is gone) == [gone]
    assert len(s) == 1 and s.depth(bucket=0) == 1
    assert s.oldest_deadline() == ok.deadline


def test_depths_per_bucket_cover_all_lanes():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(3, bucket=0))
    s.add(item(3, bucket=0, lane=EXPLAIN_LANE))
    s.add(item(9, bucket=1))
    assert s.depths() == {0: 2, 1: 1}
    assert s.depth(lane=EXPLAIN_LANE) == 1


def test_pad_batch_to_a_wider_grid_repeats_the_last_row():
    from service.batching import pad_batch
    from service.repository.manifest import TensorSpec

    specs = [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"]),
             TensorSpec(name="lengths", dtype="int64", shape=["batch"])]  # fmt: skip
    items = [
        WorkItem("m", 0, 2, {"input_ids": np.array([5, 6])}, 1e12),
        WorkItem("m", 0, 3, {"input_ids": np.array([7, 8, 9])}, 1e12),
    ]
    exact = pad_batch(items, specs)
    assert exact["input_ids"].shape == (2, 3)
    wide = pad_batch(items, specs, width=8, rows=4)
    assert wide["input_ids"].shape == (4, 8)
    assert (wide["input_ids"][:2, :3] == exact["input_ids"]).all()
    assert (wide["input_ids"][2:, :3] == [7, 8, 9]).all() and not wide["input_ids"][:, 3:].any()
    assert wide["lengths"].tolist() == [2, 3, 3, 3]


def test_work_items_get_distinct_hex_ids():
    ids = [item(3).id for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize("seed", range(60))
def test_random_traffic_keeps_every_batching_rule(seed):
    """Seeded random arrivals, expiries, lanes, policies and clocks: every batch holds one
    (bucket, lane), its bucket's oldest sequence, at most max_batch_size sequences and (when
    not alone) the token budget and padding floor; the bucket chosen is a ready one whose
    oldest waited longest; next_wakeup() == 0 means a batch comes; nothing is lost or
    taken twice."""
    import random

    rng = random.Random(seed)
    policy = BatchPolicy(
        max_batch_size=rng.randint(1, 8),
        max_batch_tokens=rng.randint(1, 200),
        max_wait_s=rng.choice([0.0, 0.001, 0.01, 0.1]),
        min_padding_efficiency=rng.choice([0.0, 0.5, 0.95, 1.0]),
    )
    edges = sorted(rng.sample(range(1, 100), rng.randint(1, 4)))
    sched = BucketScheduler[WorkItem](policy)
    now, added, gone = T0, set(), set()
    for _ in range(200):
        now += rng.choice([0.0, 0.0005, 0.002, 0.02])
        for _ in range(rng.randint(0, 4)):
            length = rng.randint(0, edges[-1])
            lane = rng.choice([PREDICT_LANE, PREDICT_LANE, EXPLAIN_LANE])
            dl = now + rng.choice([0.01, 1.0, 100.0])
            it = item(length, bucket_index(length, edges), at=now, lane=lane, deadline=dl)
            added.add(it.id)
            sched.add(it)
        gone |= {it.id for it in sched.drop_expired(now)}
        no_wait = rng.random() < 0.3
        oldest = {k: pb.items[0] for k, pb in sched._pending.items() if pb.items}
        ready = {
            k for k, pb in sched._pending.items() if pb.items and (no_wait or pb.ready(policy, now))
        }
        wakeup = sched.next_wakeup(now)
        batch = sched.next_batch(now, no_wait=no_wait)
        if wakeup == 0:
            assert batch
        if batch is None:
            continue
        key = (batch[0].bucket, batch[0].lane)
        assert key in ready and all((b.bucket, b.lane) == key for b in batch)
        assert oldest[key] in batch
        waits = [now - oldest[k].enqueued_at for k in ready if k[1] == key[1]]
        assert now - oldest[key].enqueued_at == max(waits)
        assert len(batch) <= policy.max_batch_size
        if len(batch) > 1:
            longest = max(b.length for b in batch)
            assert len(batch) * longest <= policy.max_batch_tokens
            real = sum(b.length for b in batch)
            assert real >= policy.min_padding_efficiency * len(batch) * longest - 1e-9
        assert not {b.id for b in batch} & gone
        gone |= {b.id for b in batch}
    waiting = {it.id for it in sched.items()}
    assert waiting | gone == added and not waiting & gone


# ------------------------------------------------------------------ boundaries (mutation audit)
def test_a_batch_exactly_at_the_token_budget_is_full_and_taken_whole():
    # 4 x 16 = 64 == max_batch_tokens: a 5th sequence cannot join, so there is nothing to
    # wait for, and the four fit the budget exactly (the budget is inclusive).
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=64, max_wait_s=0.010)
    pb = PendingBucket[WorkItem]()
    for _ in range(4):
        pb.add(item(16))
    assert pb.is_full(policy) and pb.ready(policy, now=T0)
    assert pb.time_to_ready(policy, now=T0) == 0.0
    assert [it.length for it in pb.take(policy)] == [16, 16, 16, 16]


def test_is_full_counts_the_longest_waiting_sequence_not_the_last_one():
    # 30 then two 2s: any batch with the 30 pads to 30, so 3 x 30 = 90 > 64: full already.
    policy = BatchPolicy(max_batch_size=8, max_batch_tokens=64, max_wait_s=0.010)
    pb = PendingBucket[WorkItem]()
    for n in (30, 2, 2):
        pb.add(item(n))
    assert pb.is_full(policy) and pb.ready(policy, now=T0)
    assert [it.length for it in pb.take(policy)] == [30, 2]


def test_time_to_ready_is_zero_when_full_or_overdue_never_negative():
    pb = PendingBucket[WorkItem]()
    pb.add(item(5, at=T0))
    assert pb.time_to_ready(POLICY, now=T0 + 1.0) == 0.0  # overdue: 0, not -0.99
    full = PendingBucket[WorkItem]()
    for _ in range(POLICY.max_batch_size):
        full.add(item(5, at=T0))
    assert full.time_to_ready(POLICY, now=T0) == 0.0  # full: ready now, no max wait


def test_next_wakeup_is_the_soonest_bucket():
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, bucket=1, at=T0))  # 10 ms to go
    for _ in range(POLICY.max_batch_size):
        s.add(item(3, bucket=0, at=T0))  # full: ready now
    assert s.next_wakeup(now=T0) == 0.0
    assert [it.bucket for it in formed(s.next_batch(now=T0))] == [0] * POLICY.max_batch_size
    assert s.next_wakeup(now=T0 + 0.004) == pytest.approx(0.006)


def test_equally_near_batch_mates_go_oldest_first_and_keep_arrival_order():
    policy = BatchPolicy(max_batch_size=2, max_batch_tokens=10_000)
    pb = PendingBucket[WorkItem]()
    for n in (10, 12, 8):  # 12 and 8 are both 2 away from the oldest: the older 12 joins
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [10, 12]
    policy = BatchPolicy(max_batch_size=3, max_batch_tokens=10_000)
    pb = PendingBucket[WorkItem]()
    for n in (10, 20, 11):  # 11 is chosen before 20, but the batch keeps arrival order
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [10, 20, 11]


def test_batch_mates_come_only_from_the_lookahead_window():
    # max_batch_size 2: take() looks at 4 x 2 = 8 sequences, the oldest included. The 10 in
    # 9th place is not among them, so the oldest 10 goes with a 50.
    policy = BatchPolicy(max_batch_size=2, max_batch_tokens=10_000)
    pb = PendingBucket[WorkItem]()
    for n in (10, *[50] * 7, 10):
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [10, 50]


def test_a_candidate_under_the_padding_floor_does_not_stop_the_search():
    # Floor 0.855, oldest 10: the nearer 7 gives 17/20 = 0.85 (out), the farther 14 gives
    # 24/28 = 0.857 (in).
    policy = BatchPolicy(max_batch_size=4, max_batch_tokens=10_000, min_padding_efficiency=0.855)
    pb = PendingBucket[WorkItem]()
    for n in (10, 7, 14):
        pb.add(item(n))
    assert [it.length for it in pb.take(policy)] == [10, 14]
    assert [it.length for it in pb.take(policy)] == [7]


def test_an_item_is_expired_at_its_deadline():
    s = BucketScheduler[WorkItem](POLICY)
    it = item(5, deadline=T0 + 1)
    s.add(it)
    assert s.drop_expired(now=T0 + 0.999) == []
    assert s.drop_expired(now=T0 + 1) == [it]


def test_drop_predicate_matching_only_the_oldest_and_the_earliest_deadline():
    s = BucketScheduler[WorkItem](POLICY)
    first, second, third = item(5, deadline=T0 + 9), item(6, deadline=T0 + 3), item(7)
    for it in (first, second, third):
        s.add(it)
    assert s.oldest_deadline() == T0 + 3
    assert s.drop(lambda it: it is first) == [first]
    assert list(s.items()) == [second, third]


def test_a_lane_whose_turn_it_is_not_never_asks_for_a_wakeup():
    # Only explanation work, overdue: a caller forming a batch ahead (lane=predict) gets no
    # batch and no wakeup (a 0 here would spin its loop until a thread frees up).
    s = BucketScheduler[WorkItem](POLICY)
    s.add(item(5, at=T0, lane=EXPLAIN_LANE))
    now = T0 + 1.0
    assert s.next_batch(now, lane=PREDICT_LANE) is None
    assert s.next_wakeup(now, lane=PREDICT_LANE) is None
    assert s.next_wakeup(now) == 0.0
    assert [it.lane for it in formed(s.next_batch(now, lane=EXPLAIN_LANE))] == [EXPLAIN_LANE]
