"""Pick the queue backend from the settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from service.config import Settings
from service.metrics import Metrics
from service.queueing.base import InferenceQueue
from service.repository import Manifest

if TYPE_CHECKING:  # onnxruntime: imported only where models run, never by a Redis-mode API
    from service.runtime.runner import ModelRunner


def create_queue(
    settings: Settings,
    models: Mapping[str, ModelRunner | Manifest],
    metrics: Metrics | None = None,
) -> InferenceQueue:
    """``inprocess``: ``models`` must be loaded runners. ``redis``: runners or manifests (the
    API process of a Redis deployment loads no ONNX sessions; workers do)."""
    if settings.queue == "redis":
        try:
            from service.queueing.redis_queue import RedisQueue
        except ImportError as e:  # the backend is optional: say what is missing
            raise RuntimeError(
                f"NLPSERVE_QUEUE=redis but the Redis backend is unavailable: {e}"
            ) from e
        manifests = {
            name: m if isinstance(m, Manifest) else m.manifest for name, m in models.items()
        }
        return RedisQueue(settings, manifests, metrics)
    from service.queueing.inprocess import InProcessQueue
    from service.runtime.runner import ModelRunner

    runners = {}
    for name, m in models.items():
        if not isinstance(m, ModelRunner):
            raise TypeError(f"the in-process queue needs loaded runners; {name} is a {type(m)}")
        runners[name] = m
    return InProcessQueue(runners, settings, metrics)
