"""One module per task: request -> WorkItems -> model outputs -> response."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from service.config import Settings
from service.repository import ModelEntry
from service.tasks.base import InputError, Prepared, Task, run_requests

# task name -> "module:Class"; imported lazily so a repository without transformer models
# never imports the QA/detector code paths.
TASK_CLASSES: dict[str, str] = {
    "pos": "service.tasks.pos:PosTask",
    "polarity": "service.tasks.polarity:PolarityTask",
    "qa": "service.tasks.qa:QATask",
    "detect": "service.tasks.detect:DetectTask",
}


def task_class(task: str) -> type[Task]:
    module, _, cls = TASK_CLASSES[task].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_tasks(entries: Iterable[ModelEntry], settings: Settings) -> dict[str, Task]:
    """A :class:`Task` per model (by model name): loads tokenizers and vocabularies."""
    return {e.manifest.name: task_class(e.manifest.task)(e, settings) for e in entries}


__all__ = [
    "TASK_CLASSES",
    "InputError",
    "Prepared",
    "Task",
    "build_tasks",
    "run_requests",
    "task_class",
]
