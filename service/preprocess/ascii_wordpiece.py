"""BERT WordPiece encoding of ASCII text in plain Python: the detector's hot path.

On the CPU the API's event loop tokenizes every request, and HF ``tokenizers`` spends ~100 µs
on a 70-token English text, mostly on per-character alignment bookkeeping that an encoder
without offsets never reads (``bench/README.md``). For ASCII text the BERT pipeline is
simple enough to restate exactly, and a dict lookup per word is ~4× faster:

* ``BertNormalizer``: ``clean_text`` drops control characters except ``\\t\\n\\r``, which
  become spaces; accents and Chinese characters do not occur in ASCII; ``lowercase`` is
  ``str.lower``. A ``Sequence`` of Unicode normal forms before it is the identity on ASCII.
* ``BertPreTokenizer``: split on whitespace; every ASCII character that is neither a letter
  nor a digit is punctuation, a word of its own.
* ``WordPiece``: a word longer than ``max_input_chars_per_word`` is ``unk``; otherwise the
  longest vocabulary prefix, then the longest ``##`` continuation, and so on; a word with no
  match at some point is ``unk`` as a whole.
* the post-processor's single-sequence template ``[CLS] $A [SEP]`` (type ids 0), and
  ``longest_first`` truncation from the right to ``max_length`` tokens, specials included.

:meth:`AsciiWordPiece.encode` returns ``None`` for anything else (non-ASCII text, text that
contains an added token such as ``[SEP]``), and :meth:`AsciiWordPiece.from_tokenizer` returns
``None`` for a tokenizer whose pipeline is not the one above; the caller then uses
``tokenizers``. ``tests/test_ascii_wordpiece.py`` checks the ids against ``tokenizers`` on
every ASCII character and on random ASCII text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer

_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}  # the identity on ASCII
# clean_text: \t \n \r become spaces, the other ASCII control characters are dropped
_CLEAN: dict[int, str | None] = {c: None for c in (*range(32), 127)} | dict.fromkeys(b"\t\n\r", " ")


def _bert_normalizer(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``BertNormalizer`` config if ``cfg`` is one (optionally after Unicode normal
    forms) that cleans text; else ``None``."""
    if cfg is None:
        return None
    if cfg.get("type") == "Sequence":
        *forms, last = cfg.get("normalizers") or [None]
        if last is None or any(f.get("type") not in _UNICODE_FORMS for f in forms):
            return None
        cfg = last
    if cfg.get("type") != "BertNormalizer" or not cfg.get("clean_text", False):
        return None
    return cfg


def _single_template(cfg: dict[str, Any] | None) -> tuple[int, int] | None:
    """(first, last) special ids of a ``[X] $A [Y]`` single-sequence post-processor."""
    if cfg is None:
        return None
    if cfg.get("type") == "BertProcessing":
        return int(cfg["cls"][1]), int(cfg["sep"][1])
    if cfg.get("type") != "TemplateProcessing":
        return None
    single = cfg.get("single") or []
    if len(single) != 3 or any(next(iter(p.values())).get("type_id") != 0 for p in single):
        return None
    first, seq, last = single
    if "SpecialToken" not in first or "Sequence" not in seq or "SpecialToken" not in last:
        return None
    ids = []
    for piece in (first, last):
        special = cfg["special_tokens"].get(piece["SpecialToken"]["id"], {})
        if len(special.get("ids", [])) != 1:
            return None
        ids.append(int(special["ids"][0]))
    return ids[0], ids[1]


class AsciiWordPiece:
    """Exact ``[CLS] wordpieces [SEP]`` ids of ASCII texts for one BERT tokenizer."""

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        unk_id: int,
        prefix: str,
        max_chars: int,
        lowercase: bool,
        first_id: int,
        last_id: int,
        added: list[str],
        max_length: int,
    ) -> None:
        if max_length < 2:
            raise ValueError("max_length must leave room for the two special tokens")
        # A word longer than max_chars is unk even when the vocabulary has it: keep such
        # entries out of the whole-word table, so one dict lookup decides most words.
        self.words = {w: i for w, i in vocab.items() if len(w) <= max_chars}
        self.continuations = {w[len(prefix) :]: i for w, i in vocab.items() if w.startswith(prefix)}
        self.unk_id = unk_id
        self.max_chars = max_chars
        self.lowercase = lowercase
        self.first_id, self.last_id = first_id, last_id
        # Added tokens are matched in the raw text before normalization; any text holding
        # one (in any case) goes to tokenizers, which knows the matching rules.
        self.added = sorted({a.lower() for a in added if a})
        self.max_pieces = max_length - 2
        letters = "a-z0-9" if lowercase else "A-Za-z0-9"
        self.pattern = re.compile(rf"[{letters}]+|[^{letters}\s]")
        # Past this many characters the words are found lazily, up to the truncation point:
        # a long text then costs what its first max_length tokens cost.
        self.eager_chars = 16 * max_length

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, max_length: int) -> AsciiWordPiece | None:
        """The fast encoder of ``tokenizer``, or ``None`` where its pipeline differs."""
        if max_length < 2:  # no room for [CLS] and [SEP]: tokenizers' rules, not restated
            return None
        cfg = json.loads(tokenizer.to_str())
        model, norm = cfg.get("model") or {}, _bert_normalizer(cfg.get("normalizer"))
        specials = _single_template(cfg.get("post_processor"))
        if (
            model.get("type") != "WordPiece"
            or norm is None
            or (cfg.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
            or specials is None
            or model.get("unk_token") not in model.get("vocab", {})
        ):
            return None
        return cls(
            model["vocab"],
            unk_id=model["vocab"][model["unk_token"]],
            # "" is a prefix too (every vocabulary entry then continues a word): only a
            # missing one means the default
            prefix=model.get("continuing_subword_prefix", "##"),
            max_chars=int(model.get("max_input_chars_per_word", 100)),
            lowercase=bool(norm.get("lowercase", True)),
            first_id=specials[0],
            last_id=specials[1],
            added=[a["content"] for a in cfg.get("added_tokens") or []],
            max_length=max_length,
        )

    def _pieces(self, word: str) -> list[int]:
        """WordPiece of a word that is not whole in the vocabulary."""
        if len(word) > self.max_chars:
            return [self.unk_id]
        out: list[int] = []
        start, n = 0, len(word)
        table = self.words
        while start < n:
            for end in range(n, start, -1):
                i = table.get(word[start:end])
                if i is not None:
                    out.append(i)
                    start = end
                    break
            else:
                return [self.unk_id]
            table = self.continuations
        return out

    def encode(self, text: str) -> tuple[list[int], bool] | None:
        """(ids with specials, whether tokens were cut), or ``None``: use ``tokenizers``."""
        if not text.isascii():
            return None
        folded = text.lower()
        if self.added and any(a in folded for a in self.added):
            return None  # special tokens match the raw text
        if not text.isprintable():  # control characters (\t \n \r included): clean them
            text = text.translate(_CLEAN)
            folded = text.lower()
            if self.added and any(a in folded for a in self.added):
                return None  # the other added tokens match the normalized text
        ids = [self.first_id]
        stop = self.max_pieces + 1  # one piece past the limit tells truncation apart
        words = self.words
        norm = folded if self.lowercase else text
        if len(norm) <= self.eager_chars:
            found: Iterable[str] = self.pattern.findall(norm)  # faster per word
        else:
            found = (m.group() for m in self.pattern.finditer(norm))
        for w in found:
            i = words.get(w)
            if i is not None:
                ids.append(i)
            else:
                ids += self._pieces(w)
            if len(ids) > stop:
                break
        truncated = len(ids) > stop
        del ids[stop:]
        ids.append(self.last_id)
        return ids, truncated
