"""Word-level encoding for the LSTM models: HF ``tokenizers`` word vocab + character ids.

Training builds the vocabulary with :func:`build_word_tokenizer` and encodes its data with the
same :class:`WordEncoder` the service uses, so what the model saw and what it is served are
one code path.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from service.preprocess.tokenizer import encode_all, join_overlapping

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

# Penn-Treebank-like word splitting, good enough for free text: abbreviations (U.S.),
# numbers (3.5, 1,000), clitics split off (do n't, John 's), hyphenated words, punctuation.
# What polarity-en/1 was trained with (its training splits raw text with it).
PTB_PATTERN = (
    r"(?:[A-Za-z]\.){2,}"
    r"|\d+(?:[.,:/]\d+)*"
    r"|\w+(?=n't\b)"
    r"|n't\b|'(?:s|re|ve|ll|d|m|S|RE|VE|LL|D|M)\b"
    r"|\w+(?:-\w+)*"
    r"|\.\.\.|--|``|''|[^\s\w]"
)

# Splitting as the Penn Treebank writes its tokens, for the POS tagger: it is trained on the
# treebank's own tokens, so a text request should be cut the same way. It runs on each
# whitespace-separated piece, so a period is told apart only by the piece it ends:
# * abbreviations keep their periods: U.S., N.J.-based, initials (J.), titles, company
#   suffixes, months and US states (Mr., Corp., Oct., Calif.) -- as the treebank writes
#   them, also at the end of a sentence (where the treebank adds a "." of its own). The
#   pattern sees lowercased text: abbreviations that are also words (No., Ill., Mass.,
#   Wash., Mar.) are left out, else "I said no." would keep its period;
# * numbers stay whole (3.5, 1,000, 1/2), with what is joined to them (1980s, 40-year-old);
# * clitics are split off (do n't, John 's), decades kept ('80s);
# * words joined by -, & or / stay one word (state-owned, S&P, Macmillan/McGraw-Hill);
# * other punctuation is a word of its own.
# A committed model reads its pattern from its own tokenizer.json, not from here.
_ABBREVIATIONS = (
    "mr|mrs|ms|messrs|mmes|dr|prof|rep|sen|gov|lt|capt|sgt|rev|st|jr|sr"
    "|corp|inc|co|cos|ltd|bros|vs|etc"
    "|jan|feb|apr|jun|jul|aug|sep|sept|oct|nov|dec"
    "|ala|ariz|ark|calif|colo|conn|fla|kan|ky|md|mich|minn|neb|nev|okla|tenn|tex|va|vt|wis|wyo"
    "|[a-z]"
)
TREEBANK_PATTERN = (
    r"(?:[A-Za-z]\.){2,}(?:-\w+)*"
    rf"|(?i:{_ABBREVIATIONS})\.$"
    r"|\d+(?:[.,:/]\d+)*(?:[A-Za-z]+)?(?:-\w+)*"
    r"|\w+(?=n't\b)"
    r"|n't\b|'(?:s|re|ve|ll|d|m|S|RE|VE|LL|D|M)\b|'\d+s\b"
    r"|\w+(?:[-&/]\w+)*"
    r"|\.\.\.|--|``|''|[^\s\w]"
)


# Characters a reader does not see and no training text holds: format characters (zero-width
# space and joiners, BOM, soft hyphen, bidi controls) and C0 controls other than whitespace.
# Split as they were, "a\u200bb" gave the words "a", "\u200b", "b" (a tag for an invisible
# word). Removed before splitting; C1 controls stay (rt-polarity holds cp1252 dashes and quotes
# read as U+0091-U+0097, and polarity-en/1 has them as words).
INVISIBLE_PATTERN = r"[\p{Cf}\x00-\x08\x0E-\x1F\x7F]"


@dataclass(frozen=True)
class WordEncoding:
    """One sequence: surface tokens, word ids [T] and (optionally) char ids [T, W]."""

    tokens: list[str]
    word_ids: np.ndarray
    char_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.tokens)


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(pattern), "isolated")]
    )


def build_word_tokenizer(
    words: Iterable[str], *, lowercase: bool = True, pattern: str = PTB_PATTERN
) -> Tokenizer:
    """A WordLevel tokenizer over ``words`` (already normalised) with <pad>=0, <unk>=1,
    splitting text with ``pattern`` (:data:`PTB_PATTERN` or :data:`TREEBANK_PATTERN`)."""
    vocab = {PAD: PAD_ID, UNK: UNK_ID}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer(pattern)
    return tok


def build_char_vocab(tokens: Iterable[str], min_count: int = 1) -> list[str]:
    """Character vocabulary, most frequent first, index 0 = pad and 1 = unk."""
    counts: dict[str, int] = {}
    for t in tokens:
        for c in t:
            counts[c] = counts.get(c, 0) + 1
    chars = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: -counts[c])
    return [PAD, UNK, *chars]


# A prefix of this many characters per token wanted is split first (English words average
# ~5 characters with their space): most long texts need one pass over 8 x (max_tokens + 1).
PREFIX_CHARS_PER_TOKEN = 8

# A text without whitespace can also be cut right after a character that both patterns make
# a word of its own and that none of their other parts reads past: neither a word character
# nor whitespace, nor one of . , : / - & ' ` (joined to what is around them). A prefix cut
# there splits into the text's own first words, as at whitespace; cut at whitespace only,
# 20,000 "!" (or emoji) were split whole, 20,000 words, ~70x an English text's cost.
# Python's \w is not the tokenizer's (combining marks, circled letters): each candidate is
# checked by the tokenizer's own regex (WordEncoder._isolates).
_CUT_CANDIDATE = re.compile(r"[^\w\s.,:/&'`-]")
_CUT_CHECK = r"[\w\s.,:/&'`-]"
_CUT_TRIES = 16  # candidates checked per prefix: a run of word-like marks costs no more


class WordEncoder:
    """Turns texts or token lists into word ids (+ char ids) the way the model was trained."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chars: Sequence[str] | None = None,
        max_word_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer  # as saved with the model
        # What splits texts and normalises words: the saved tokenizer, invisible characters
        # removed first (the offsets still index the text as sent).
        self.splitter = Tokenizer.from_str(tokenizer.to_str())
        invisible = normalizers.Replace(Regex(INVISIBLE_PATTERN), "")
        saved = tokenizer.normalizer
        self.splitter.normalizer = (
            normalizers.Sequence([invisible, saved]) if saved is not None else invisible
        )
        self.normalize = self.splitter.normalizer.normalize_str
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.char_index = {c: i for i, c in enumerate(chars)} if chars else None
        if self.char_index is not None and not max_word_length:
            raise ValueError("max_word_length is required with a character vocabulary")
        self.max_word_length = max_word_length
        self._isolates = _isolating(tokenizer, self.normalize)

    @classmethod
    def load(
        cls,
        tokenizer_file: Path,
        chars_file: Path | None = None,
        max_word_length: int | None = None,
    ) -> WordEncoder:
        chars = json.loads(Path(chars_file).read_text("utf-8")) if chars_file else None
        return cls(Tokenizer.from_file(str(tokenizer_file)), chars, max_word_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        """Split raw texts into surface tokens (original case), batch-encoded by tokenizers.

        Tokens of one character are one word (:func:`join_overlapping`): the treebank
        pattern cut "3İstanbul", lowercased to "3i̇stanbul", after the "i".

        With ``max_tokens``, a text may be split only as far as its first ``max_tokens + 1``
        tokens (the caller reads ``max_tokens`` and needs to know whether there were more):
        splitting a 20,000-character text whole made ~4,000 Python strings of which a
        polarity model reads 96, and a burst of such requests cost ~250 MB.
        """
        if max_tokens is not None:
            return [self._split_prefix(t, max_tokens) for t in texts]
        out = []
        for text, enc in zip(texts, encode_all(self.splitter, texts), strict=True):
            spans, _ = join_overlapping(enc.offsets)
            out.append([text[s:e] for s, e in spans])
        return out

    def _split_prefix(self, text: str, max_tokens: int) -> list[str]:
        """The tokens of ``text``, or of a prefix of it that has more than ``max_tokens``.

        The pre-tokenizer splits at whitespace first, so the tokens of a prefix cut at a
        space (or tab, newline) are the text's own first tokens. The prefix doubles until it
        holds more than ``max_tokens`` tokens or is the whole text."""
        limit = PREFIX_CHARS_PER_TOKEN * (max_tokens + 1)
        while len(text) > limit:
            spaced = max(text.rfind(c, 0, limit) for c in " \t\n")
            cut = max(spaced, self._after_isolated(text, limit))
            if cut > 0:
                tokens = self.split([text[:cut]])[0]
                if len(tokens) > max_tokens:
                    return tokens[: max_tokens + 1]
            limit *= 2
        return self.split([text])[0][: max_tokens + 1]

    def _after_isolated(self, text: str, limit: int) -> int:
        """One past the last character of ``text[:limit]`` that the pattern makes a word of
        its own (:data:`_CUT_CANDIDATE`), 0 when none is found (or the pattern is not known)."""
        if self._isolates is None:
            return 0
        backwards = text[:limit][::-1]
        for tries, m in enumerate(_CUT_CANDIDATE.finditer(backwards)):
            if tries == _CUT_TRIES:
                break
            if self._isolates(m.group()):
                return limit - m.start()
        return 0

    def encode_texts(
        self, texts: Sequence[str], max_tokens: int | None = None
    ) -> list[WordEncoding]:
        """Encodings of ``texts``; with ``max_tokens``, of their first ``max_tokens + 1``
        tokens at least (:meth:`split`)."""
        return self.encode_tokens(self.split(texts, max_tokens))

    def encode_tokens(self, sentences: Sequence[Sequence[str]]) -> list[WordEncoding]:
        return [self._encode(list(tokens)) for tokens in sentences]

    def _encode(self, tokens: list[str]) -> WordEncoding:
        norm = self.normalize
        ids = np.fromiter(
            (self.vocab.get(norm(t), UNK_ID) for t in tokens), dtype=np.int64, count=len(tokens)
        )
        chars = None
        if self.char_index is not None and self.max_word_length:  # both or neither (__init__)
            w = self.max_word_length
            chars = np.zeros((len(tokens), w), dtype=np.int64)
            for i, t in enumerate(tokens):
                cs = [self.char_index.get(c, UNK_ID) for c in t[:w]]
                chars[i, : len(cs)] = cs
        return WordEncoding(tokens, ids, chars)


def _isolating(
    tokenizer: Tokenizer, normalize: Callable[[str], str]
) -> Callable[[str], bool] | None:
    """Whether a character is one a text may be cut after (:data:`_CUT_CANDIDATE`), for a
    tokenizer that splits as :func:`build_word_tokenizer` with one of this module's patterns
    (a lowercase normalizer or none); None for any other: its text is cut at whitespace only.
    The character as normalized must hold no character the patterns join to another."""
    cfg = json.loads(tokenizer.to_str())
    pre = cfg.get("pre_tokenizer") or {}
    splits = [
        {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
        for p in (PTB_PATTERN, TREEBANK_PATTERN)
    ]
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2 or steps[0] != {"type": "WhitespaceSplit"}:
        return None
    if steps[1] not in splits:
        return None
    if cfg.get("normalizer") not in (None, {"type": "Lowercase"}):
        return None
    check = pre_tokenizers.Split(Regex(_CUT_CHECK), "removed")

    @functools.lru_cache(maxsize=1024)
    def isolates(c: str) -> bool:
        norm = normalize(c)  # invisible characters are removed: no cut after those
        return bool(norm) and check.pre_tokenize_str(norm) == [(norm, (0, len(norm)))]

    return isolates
