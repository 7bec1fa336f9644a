"""Explainers for served models, built from their :class:`~service.tasks.base.Task`.

The model function SHAP sees is :func:`task_scorer`: it wraps each masked text in the task's
own request type and runs it through :func:`~service.tasks.base.run_requests` with
``lane="explain"``, i.e. the same encoding, queue, batcher and ONNX session as an ordinary
request, so the explained function is exactly the served one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

from service.explain.engine import ModelExplainer, Scorer
from service.explain.segmenters import WordPieceSegmenter, WordSegmenter
from service.preprocess.tokenizer import load_tokenizer
from service.queueing.base import InferenceQueue
from service.tasks.base import Task, run_requests

EXPLAIN_LANE = "explain"

# task -> (output field of its response explained, the label that field is the probability of)
EXPLAINED_OUTPUT: dict[str, tuple[str, str]] = {
    "detect": ("machine_probability", "machine"),
    "polarity": ("positive_probability", "positive"),
}


def explainable(task: Task) -> bool:
    return task.task in EXPLAINED_OUTPUT


def task_scorer(task: Task, queue: InferenceQueue, output_field: str) -> Scorer:
    request_cls = _request_class(task)

    async def score(texts: list[str], deadline: float) -> np.ndarray:
        # model_construct: masked variants are the masker's output (never blank), and
        # re-validating thousands of them per explanation would be wasted work.
        requests = [request_cls.model_construct(text=t) for t in texts]
        # No character limit here: the client's text was checked (explain route), and a
        # variant may outgrow it ("!" -> "[MASK] "); its tokens are bounded by the model's
        # max length, since the text was cut to what the model reads before masking.
        # SHAP's batches may pass the batch size it was given by a few: each request stays
        # within what one request may need and the queue admits (else a 422).
        s = task.settings
        step = max(1, min(s.max_request_sequences, s.max_queue_depth))
        outs = []
        for i in range(0, len(requests), step):
            outs += await run_requests(
                task, queue, requests[i : i + step], deadline, lane=EXPLAIN_LANE,
                enforce_limits=False,
            )  # fmt: skip
        return np.array([float(getattr(o, output_field)) for o in outs], dtype=np.float64)

    return score


def _request_class(task: Task) -> type[BaseModel]:
    from service.api.schemas import DetectRequest, PolarityRequest

    classes: dict[str, type[BaseModel]] = {"detect": DetectRequest, "polarity": PolarityRequest}
    return classes[task.task]


def _label_for(labels: list[str], explained: str) -> Callable[[float], str]:
    """Binary models: the label the predict endpoint's argmax names. At exactly 0.5 that is
    the first in the manifest's order (``np.argmax`` takes the first of equal scores)."""
    others = [lab for lab in labels if lab != explained]
    other = others[0] if len(others) == 1 else f"not {explained}"
    wins_ties = bool(labels) and labels[0] == explained
    return lambda p: explained if p > 0.5 or (p == 0.5 and wins_ties) else other


def build_explainer(task: Task, queue: InferenceQueue) -> ModelExplainer:
    """A :class:`ModelExplainer` for a detect or polarity task (ValueError otherwise)."""
    if not explainable(task):
        raise ValueError(f"the {task.task!r} task has no explanation endpoint")
    field, explained = EXPLAINED_OUTPUT[task.task]
    manifest = task.manifest
    if task.task == "detect":
        # Our own tokenizer copy: the task's encoder switches truncation on for its object.
        tok = load_tokenizer(task.entry.path / manifest.preprocessing.tokenizer_file)
        segmenter: WordPieceSegmenter | WordSegmenter = WordPieceSegmenter(tok)
        specials = len(tok.encode("", add_special_tokens=True).ids)  # [CLS] [SEP]
        max_tokens = manifest.max_length - specials
    else:
        from service.tasks.pos import load_word_encoder

        segmenter = WordSegmenter(load_word_encoder(task.entry))
        max_tokens = manifest.max_length
    return ModelExplainer(
        name=task.name,
        version=manifest.version,
        segmenter=segmenter,
        scorer=task_scorer(task, queue, field),
        output_name=field,
        label_for=_label_for(list(manifest.labels), explained),
        max_tokens=max_tokens,
    )
