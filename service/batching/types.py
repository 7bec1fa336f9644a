"""What travels through a queue: one sequence to run, and the rules that group them."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from service import tracecontext
from service.ids import new_id


class Reach:
    """Whether any sequence of a request reached a model: in process, taken into a batch; in
    Redis mode, sent to the streams (a worker may run it, and the replica cannot tell). A
    request none of whose items did used no model time: the client's rate limit gives its
    tokens back (service/api/client_quota.py, ``admit``)."""

    __slots__ = ("reached",)

    def __init__(self) -> None:
        self.reached = False


# The request being served's, where its tokens may come back: the items it makes take it.
REACH: ContextVar[Reach | None] = ContextVar("reach", default=None)


@dataclass
class WorkItem:
    """One sequence for one model: already tokenized, not yet padded.

    ``features`` maps each model input (except ``lengths``, derived at batch time) to an
    array whose first axis is the sequence axis. ``deadline`` and ``enqueued_at`` are on
    ``time.monotonic()`` (a wall-clock step moves neither); the Redis backend puts them on the
    Redis server's clock for the trip to a worker (service/clock.py).
    """

    model: str
    bucket: int
    length: int
    features: dict[str, np.ndarray]
    deadline: float
    lane: str = "predict"  # "explain" work runs only when no "predict" work waits
    id: str = field(default_factory=new_id)
    enqueued_at: float = field(default_factory=time.monotonic)
    # Seconds of the batch it ran in, set by the queue with its result (0.0 before, or when a
    # worker did not report it): the Server-Timing header's `inference`.
    run_s: float = 0.0
    # The trace of the request it serves: made while serving one, it takes that request's
    # (a worker's, from the entry). Its log lines carry the ids (logs off the request's task:
    # the batch's thread, the worker).
    trace: tracecontext.TraceContext | None = field(default_factory=tracecontext.CURRENT.get)
    # Its request's (None: nobody asks): the queue marks it as the item reaches a model.
    reach: Reach | None = field(default_factory=REACH.get, compare=False, repr=False)

    def log_fields(self) -> dict[str, str]:
        """``extra=`` of a log line about this item: its id and its request's trace ids."""
        fields = {"item_id": self.id}
        if self.trace is not None:
            fields.update(self.trace.log_fields())
        return fields

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) >= self.deadline


# The items a queue batches: a worker's carry where they came from in Redis.
ItemT = TypeVar("ItemT", bound=WorkItem)


@dataclass(frozen=True)
class BatchPolicy:
    """When a bucket's pending work becomes a batch.

    A batch closes when it holds ``max_batch_size`` sequences, when one more sequence would
    push ``batch size x longest length`` over ``max_batch_tokens``, or when its oldest
    sequence has waited ``max_wait_s`` (the queues skip that wait while an inference thread
    is idle: ``BucketScheduler.next_batch(no_wait=True)``) or any of its sequences half the
    time it had left to its deadline when queued (``PendingBucket.flush_at``). A sequence
    joins a batch only if the batch's padding efficiency (real / padded tokens) stays at or
    above ``min_padding_efficiency``.
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait_s: float = 0.005
    min_padding_efficiency: float = 0.0

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_batch_tokens < 1
            or self.max_wait_s < 0
            or not 0.0 <= self.min_padding_efficiency <= 1.0
        ):
            raise ValueError(f"invalid batch policy {self}")
