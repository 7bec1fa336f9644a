"""Extractive question answering with the BERT span model, over context windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.schemas import QARequest, QAResponse, QASpan
from service.config import Settings
from service.preprocess.qa import EMPTY_ANSWER, QAEncoder, QAWindow, decode_spans
from service.repository import ManifestError, ModelEntry
from service.tasks.base import Prepared, Task, encode_in_chunks

DEFAULT_DOC_STRIDE = 128
DEFAULT_MAX_QUERY_LENGTH = 64
DEFAULT_MAX_ANSWER_LENGTH = 30
# nlpserve_predictions_total's labels for QA: an answer span, or an empty answer
ANSWER, NO_ANSWER = "answer", "no_answer"


class QATask(Task):
    """``{"question", "context"}`` -> the best answer span over all windows of the context.

    Each window is its own sequence in the queue (windows of one long context usually share
    the top bucket and run in one batch). Questions longer than the manifest's
    ``max_query_length`` tokens are cut to it.
    """

    task = "qa"
    outcomes = (ANSWER, NO_ANSWER)

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        super().__init__(entry, settings)
        pre = self.manifest.preprocessing
        try:
            self.encoder = QAEncoder.load(
                entry.path / pre.tokenizer_file,
                max_length=self.max_length,
                doc_stride=pre.doc_stride or DEFAULT_DOC_STRIDE,
                max_query_length=getattr(pre, "max_query_length", None) or DEFAULT_MAX_QUERY_LENGTH,
            )
        except ValueError as e:  # a pair template or window sizes it cannot serve: one line
            raise ManifestError(
                f"{entry.path / pre.tokenizer_file}: cannot build QA windows: {e}"
            ) from e
        self.max_answer_length = pre.max_answer_length or DEFAULT_MAX_ANSWER_LENGTH

    def texts(self, request: QARequest) -> list[tuple[str, str]]:  # type: ignore[override]
        return [("question", request.question), ("context", request.context)]

    def encode(self, requests: Sequence[QARequest], deadline: float, lane: str) -> list[Prepared]:  # type: ignore[override]
        questions, contexts = [r.question for r in requests], [r.context for r in requests]
        encoded = self.encoder.encode_counted(questions, contexts)
        return self._prepared(requests, encoded, deadline, lane)

    def encode_request(  # type: ignore[override]
        self, requests: Sequence[QARequest], deadline: float, lane: str
    ) -> list[Prepared]:
        return self._prepared(requests, self._encode_within_limit(requests), deadline, lane)

    def _prepared(
        self,
        requests: Sequence[QARequest],
        encoded: list[tuple[list[QAWindow], int, int]],
        deadline: float,
        lane: str,
    ) -> list[Prepared]:
        max_query = self.encoder.max_query_length
        out = []
        for req, (windows, q_tokens, c_tokens) in zip(requests, encoded, strict=True):
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
            meta = {
                "context": req.context,
                "windows": windows,
                "top_k": req.top_k,
                "max_answer_length": req.max_answer_length or self.max_answer_length,
            }
            # a long context is read whole (in windows); a long question is cut, silently
            cut = q_tokens > max_query
            out.append(Prepared(items, meta, tokens=q_tokens + c_tokens, truncated=cut))
        return out

    def _encode_within_limit(
        self, requests: Sequence[QARequest]
    ) -> list[tuple[list[QAWindow], int, int]]:
        """Each item's windows and token counts, its windows counted from its token counts
        before they are cut (:func:`encode_in_chunks`): 48 contexts of 20,000 characters,
        ~5,000 windows, were all tokenized and cut (up to ~3.4 s of CPU) to answer a 422
        that the first 5 decide."""
        enc = self.encoder
        pairs = encode_in_chunks(
            self,
            requests,
            lambda chunk: enc.tokenize([r.question for r in chunk], [r.context for r in chunk]),
            lambda pair: enc.window_count(len(pair[0].ids), len(pair[1].ids)),
        )
        return [enc.windows_of(q, c) for q, c in pairs]

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> QAResponse:
        meta = prepared.meta
        top_k = meta["top_k"]
        spans = decode_spans(
            meta["context"],
            meta["windows"],
            [o["start_logits"] for o in outputs],
            [o["end_logits"] for o in outputs],
            max_answer_length=meta["max_answer_length"],
            top_k=top_k or 1,
        )
        best = spans[0] if spans else EMPTY_ANSWER  # its probability is 0
        listed = None
        if top_k is not None:
            listed = [QASpan(answer=a.text, start=a.start, end=a.end, score=a.probability)
                      for a in spans]  # fmt: skip
        return QAResponse(
            answer=best.text,
            start=best.start,
            end=best.end,
            score=best.probability,
            answers=listed,
        )

    def outcome(self, result: Any) -> tuple[str, float | None]:
        # An empty answer (no valid span in any window) has score 0 by definition: counted,
        # but not a confidence.
        answer, score = (
            (result["answer"], result["score"])
            if isinstance(result, dict)
            else (result.answer, result.score)
        )
        return (ANSWER, score) if answer else (NO_ANSWER, None)
