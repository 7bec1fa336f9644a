"""Sentence polarity with the word-level LSTM classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.schemas import PolarityRequest, PolarityResponse
from service.config import Settings
from service.preprocess.classify import softmax
from service.repository import ModelEntry
from service.tasks.base import InputError, Prepared, Task, where
from service.tasks.pos import load_word_encoder


class PolarityTask(Task):
    """``{"text"}`` -> positive/negative. Texts over ``max_length`` tokens are truncated to
    their first ``max_length`` tokens and answered with ``"truncated": true``."""

    task = "polarity"

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        super().__init__(entry, settings)
        self.encoder = load_word_encoder(entry)
        self.labels = self.manifest.labels
        self.outcomes = self.labels
        self.positive = self.labels.index("positive") if "positive" in self.labels else -1
        self.binary = len(self.labels) == 2 and self.positive >= 0

    def texts(self, request: PolarityRequest) -> list[tuple[str, str]]:  # type: ignore[override]
        return [("text", request.text)]

    def encode(  # type: ignore[override]
        self, requests: Sequence[PolarityRequest], deadline: float, lane: str
    ) -> list[Prepared]:
        n = len(requests)
        out = []
        texts = [r.text for r in requests]
        for i, enc in enumerate(self.encoder.encode_texts(texts, max_tokens=self.max_length)):
            if len(enc) == 0:
                raise InputError("empty_text", f"{where(i, n)}the text contains no words")
            truncated = len(enc) > self.max_length
            ids = enc.word_ids[: self.max_length]
            # len(ids): as read; the encoder reads no further than max_length + 1 tokens
            item = self.item({"word_ids": ids}, len(ids), deadline, lane)
            out.append(Prepared([item], tokens=len(ids), truncated=truncated))
        return out

    def probabilities(self, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Every label's probability, in ``labels`` order."""
        return softmax(outputs[0]["logits"][None, :])[0]

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> PolarityResponse:
        probs = self.probabilities(outputs)
        k = int(np.argmax(probs))
        return PolarityResponse(
            label=self.labels[k],
            positive_probability=float(probs[self.positive]) if self.positive >= 0 else 0.0,
            truncated=prepared.truncated,
        )

    def outcome(self, result: Any) -> tuple[str, float | None]:
        if isinstance(result, dict):  # a V2 row: the label's own probability
            # observed only where /v1's answer has it too: the same item, either protocol
            return result["label"], result["probability"] if self.binary else None
        # the top class of two: P(positive) or 1 - P(positive); another label set has no such
        # field to read (not observed)
        p = result.positive_probability
        return result.label, max(p, 1.0 - p) if self.binary else None
