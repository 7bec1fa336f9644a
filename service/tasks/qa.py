"""Extractive question answering with the BERT span model, over context windows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.api.schemas import QARequest, QAResponse
from service.config import Settings
from service.preprocess.qa import QAEncoder, decode_best_span
from service.repository import ModelEntry
from service.tasks.base import Prepared, Task

DEFAULT_DOC_STRIDE = 128
DEFAULT_MAX_QUERY_LENGTH = 64
DEFAULT_MAX_ANSWER_LENGTH = 30


class QATask(Task):
    """``{"question", "context"}`` -> the best answer span over all windows of the context.

    Each window is its own sequence in the queue (windows of one long context usually share
    the top bucket and run in one batch). Questions longer than the manifest's
    ``max_query_length`` tokens are cut to it.
    """

    task = "qa"

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        super().__init__(entry, settings)
        pre = self.manifest.preprocessing
        self.encoder = QAEncoder.load(
            entry.path / pre.tokenizer_file,
            max_length=self.max_length,
            doc_stride=pre.doc_stride or DEFAULT_DOC_STRIDE,
            max_query_length=getattr(pre, "max_query_length", None) or DEFAULT_MAX_QUERY_LENGTH,
        )
        self.max_answer_length = pre.max_answer_length or DEFAULT_MAX_ANSWER_LENGTH

    def texts(self, request: QARequest) -> list[tuple[str, str]]:  # type: ignore[override]
        return [("question", request.question), ("context", request.context)]

    def encode(self, requests: Sequence[QARequest], deadline: float, lane: str) -> list[Prepared]:  # type: ignore[override]
        all_windows = self.encoder.encode_batch(
            [r.question for r in requests], [r.context for r in requests]
        )
        out = []
        for req, windows in zip(requests, all_windows, strict=True):
            items = [
                self.item(
                    {
                        "input_ids": w.input_ids,
                        "attention_mask": w.attention_mask,
                        "token_type_ids": w.token_type_ids,
                    },
                    len(w),
                    deadline,
                    lane,
                )
                for w in windows
            ]
            out.append(Prepared(items, {"context": req.context, "windows": windows}))
        return out

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> QAResponse:
        ans = decode_best_span(
            prepared.meta["context"],
            prepared.meta["windows"],
            [o["start_logits"] for o in outputs],
            [o["end_logits"] for o in outputs],
            max_answer_length=self.max_answer_length,
        )
        found = ans.window >= 0
        return QAResponse(
            answer=ans.text,
            start=ans.start,
            end=ans.end,
            score=ans.probability if found else 0.0,
        )
