"""Machine-generated text detection with the BERT sequence classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.schemas import DetectRequest, DetectResponse
from service.config import Settings
from service.preprocess.classify import ClassifyEncoder, softmax
from service.repository import ModelEntry
from service.tasks.base import Prepared, Task


class DetectTask(Task):
    """``{"text"}`` -> human/machine. Texts over ``max_length`` tokens (specials included) are
    cut to their head and answered with ``"truncated": true``."""

    task = "detect"

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        super().__init__(entry, settings)
        pre = self.manifest.preprocessing
        self.encoder = ClassifyEncoder.load(entry.path / pre.tokenizer_file, self.max_length)
        self.labels = self.manifest.labels
        self.outcomes = self.labels
        self.machine = self.labels.index("machine") if "machine" in self.labels else -1
        self.binary = len(self.labels) == 2 and self.machine >= 0

    def texts(self, request: DetectRequest) -> list[tuple[str, str]]:  # type: ignore[override]
        return [("text", request.text)]

    def encode(  # type: ignore[override]
        self, requests: Sequence[DetectRequest], deadline: float, lane: str
    ) -> list[Prepared]:
        out = []
        for enc in self.encoder.encode([r.text for r in requests]):
            feats = {
                "input_ids": enc.input_ids,
                "attention_mask": np.ones_like(enc.input_ids),
                "token_type_ids": enc.token_type_ids,
            }
            item = self.item(feats, len(enc), deadline, lane)
            # len(enc): as read; the untruncated length is never computed (the tokenizer
            # stops at max_length)
            out.append(Prepared([item], tokens=len(enc), truncated=enc.truncated))
        return out

    def probabilities(self, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Every label's probability, in ``labels`` order."""
        return softmax(outputs[0]["logits"])

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> DetectResponse:
        probs = self.probabilities(outputs)
        k = int(np.argmax(probs))
        return DetectResponse(
            label=self.labels[k],
            machine_probability=float(probs[self.machine]) if self.machine >= 0 else 0.0,
            truncated=prepared.truncated,
        )

    def outcome(self, result: Any) -> tuple[str, float | None]:
        if isinstance(result, dict):  # a V2 row: the label's own probability
            # observed only where /v1's answer has it too: the same item, either protocol
            return result["label"], result["probability"] if self.binary else None
        # the top class of two: P(machine) or 1 - P(machine); another label set has no such
        # field to read (not observed)
        p = result.machine_probability
        return result.label, max(p, 1.0 - p) if self.binary else None
