"""Part-of-speech tagging with the word-level LSTM tagger."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.api.schemas import PosRequest, PosResponse
from service.config import Settings
from service.preprocess.classify import softmax
from service.preprocess.words import WordEncoder
from service.repository import ModelEntry
from service.tasks.base import InputError, Prepared, Task, where


def load_word_encoder(entry: ModelEntry) -> WordEncoder:
    pre = entry.manifest.preprocessing
    return WordEncoder.load(
        entry.path / pre.tokenizer_file,
        entry.path / pre.chars_file if pre.chars_file else None,
        pre.max_word_length,
    )


class PosTask(Task):
    """``{"text"}`` or ``{"tokens"}`` -> one tag per token.

    Sentences longer than the model's ``max_length`` tokens are REJECTED (422
    ``input_too_long``), not truncated: silently returning tags for only part of the text
    would look like a complete answer. Clients split long documents into sentences.
    """

    task = "pos"

    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        super().__init__(entry, settings)
        self.encoder = load_word_encoder(entry)
        self.labels = self.manifest.labels

    def texts(self, request: PosRequest) -> list[tuple[str, str]]:  # type: ignore[override]
        if request.text is not None:
            return [("text", request.text)]
        return [("tokens", " ".join(request.tokens or []))]  # what the model reads

    def encode(self, requests: Sequence[PosRequest], deadline: float, lane: str) -> list[Prepared]:  # type: ignore[override]
        n = len(requests)
        # One batch-encode call for every raw text of the request, split only as far as one
        # token past the limit: a text over it is refused, and 48 texts of 20,000 characters
        # split whole took ~0.9 s (~2.7 s of punctuation) of CPU to answer that 422.
        text_idx = [i for i, r in enumerate(requests) if r.text is not None]
        texts = [requests[i].text or "" for i in text_idx]
        encoded = dict(
            zip(text_idx, self.encoder.encode_texts(texts, self.max_length), strict=True)
        )
        out = []
        for i, req in enumerate(requests):
            if req.tokens is not None and len(req.tokens) > self.max_length:
                raise self._too_long(f"{where(i, n)}the text has {len(req.tokens)} tokens")
            enc = encoded[i] if i in encoded else self.encoder.encode_tokens([req.tokens or []])[0]
            if len(enc) == 0:
                raise InputError("empty_text", f"{where(i, n)}the text contains no words")
            if len(enc) > self.max_length:  # a text: split no further than this
                more = f"more than {self.max_length}"
                raise self._too_long(f"{where(i, n)}the text has {more} tokens")
            feats = {"word_ids": enc.word_ids}
            if enc.char_ids is not None:
                feats["char_ids"] = enc.char_ids
            item = self.item(feats, len(enc), deadline, lane)
            meta = {"tokens": enc.tokens, "scores": req.scores}
            out.append(Prepared([item], meta, tokens=len(enc)))
        return out

    def _too_long(self, what: str) -> InputError:
        return InputError(
            "input_too_long",
            f"{what}; {self.name} tags at most {self.max_length} per request (split it into "
            "sentences)",
        )

    def decode(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> PosResponse:
        logits = outputs[0]["logits"]  # [T, n_tags]
        best = np.argmax(logits, axis=-1)
        tags = [self.labels[k] for k in best.tolist()]
        scores = None
        if prepared.meta["scores"]:
            probs = softmax(logits)
            scores = probs[np.arange(len(best)), best].tolist()
        return PosResponse(tokens=prepared.meta["tokens"], tags=tags, scores=scores)
