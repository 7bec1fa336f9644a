"""Machine-generated text detection with the BERT sequence classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.api.schemas import DetectRequest, DetectResponse, DetectWindow
from service.batching import WorkItem
from service.config import Settings
from service.preprocess.classify import ClassifyEncoder, ClassifyEncoding, softmax
from service.repository import ModelEntry
from service.tasks.base import Prepared, Task, encode_in_chunks


class DetectTask(Task):
    """``{"text"}`` -> human/machine. Texts over ``max_length`` tokens (specials included) are
    cut to their head and answered with ``"truncated": true``; with ``"windows": true`` they
    are read whole, each window its own sequence in the queue."""

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
        whole = [r.text for r in requests if r.windows]
        heads = iter(self.encoder.encode([r.text for r in requests if not r.windows]))
        # (no empty tokenizer call for the usual request, without windows: ~2 us each)
        windowed = iter(self.encoder.encode_windows(whole) if whole else ())
        out = []
        for r in requests:
            if not r.windows:
                enc = next(heads)
                # len(enc): as read; the untruncated length is never computed (the tokenizer
                # stops at max_length)
                out.append(Prepared([self._item(enc, deadline, lane)], tokens=len(enc),
                                    truncated=enc.truncated))  # fmt: skip
                continue
            windows = next(windowed)
            items = [self._item(w.encoding, deadline, lane) for w in windows]
            spans = [(w.start, w.end, w.text_tokens) for w in windows]
            tokens = sum(len(w.encoding) for w in windows)
            out.append(Prepared(items, {"windows": spans}, tokens=tokens))
        return out

    def encode_request(  # type: ignore[override]
        self, requests: Sequence[DetectRequest], deadline: float, lane: str
    ) -> list[Prepared]:
        """:meth:`encode` in chunks (:func:`encode_in_chunks`) when an item has windows: 48
        texts of 20,000 characters in windows, ~1,900 of them, were all tokenized (~0.45 s of
        CPU) to answer a 422 that the first few decide."""
        if not any(r.windows for r in requests):  # one sequence each: encoded at once
            return self.encode(requests, deadline, lane)
        return encode_in_chunks(
            self, requests, lambda chunk: self.encode(chunk, deadline, lane), lambda p: len(p.items)
        )

    def _item(self, enc: ClassifyEncoding, deadline: float, lane: str) -> WorkItem:
        feats = {
            "input_ids": enc.input_ids,
            "attention_mask": np.ones_like(enc.input_ids),
            "token_type_ids": enc.token_type_ids,
        }
        return self.item(feats, len(enc), deadline, lane)

    def probabilities(self, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Every label's probability, in ``labels`` order."""
        return softmax(outputs[0]["logits"])

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> DetectResponse:
        spans = prepared.meta.get("windows")
        if spans is None:
            label, machine = self._read(self.probabilities(outputs))
            return DetectResponse(
                label=label, machine_probability=machine, truncated=prepared.truncated
            )
        each = [softmax(o["logits"]) for o in outputs]
        # The whole text's: the windows' mean log-probabilities, each window weighing its share
        # of the text's tokens, made probabilities again (for two labels: the mean log-odds).
        # On the HC3 test split's long texts this ranks as well as the head alone or better,
        # where the mean of probabilities, pulled towards 0.5, ranked worse (bench/README.md).
        weights = np.array([max(n, 1) for _, _, n in spans], dtype=np.float64)
        logs = np.log(np.maximum(np.stack(each), np.finfo(np.float64).tiny))
        label, machine = self._read(softmax((logs * weights[:, None]).sum(axis=0) / weights.sum()))
        windows = []
        for (start, end, _), probs in zip(spans, each, strict=True):
            w_label, w_machine = self._read(probs)
            windows.append(
                DetectWindow(start=start, end=end, label=w_label, machine_probability=w_machine)
            )
        return DetectResponse(
            label=label, machine_probability=machine, truncated=False, windows=windows
        )

    def _read(self, probs: np.ndarray) -> tuple[str, float]:
        """(the top label, P(machine): 0 for a label set without one) of ``probs``."""
        k = int(np.argmax(probs))
        return self.labels[k], float(probs[self.machine]) if self.machine >= 0 else 0.0

    def outcome(self, result: Any) -> tuple[str, float | None]:
        if isinstance(result, dict):  # a V2 row: the label's own probability
            # observed only where /v1's answer has it too: the same item, either protocol
            return result["label"], result["probability"] if self.binary else None
        # the top class of two: P(machine) or 1 - P(machine); another label set has no such
        # field to read (not observed)
        p = result.machine_probability
        return result.label, max(p, 1.0 - p) if self.binary else None
