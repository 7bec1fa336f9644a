"""One queue interface, two backends: in-process (default) and Redis Streams (scale-out)."""

from service.queueing.base import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceFailedError,
    InferenceQueue,
    QueueError,
    QueueFullError,
)

__all__ = [
    "BackendUnavailableError",
    "DeadlineExceededError",
    "InferenceFailedError",
    "InferenceQueue",
    "QueueError",
    "QueueFullError",
]
