"""Loading a ``tokenizer.json`` and encoding texts with it: shared by every encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

CLS_NAMES = ("[CLS]", "<s>")
SEP_NAMES = ("[SEP]", "</s>")
PAD_NAMES = ("[PAD]", "<pad>")


def special_id(tokenizer: Tokenizer, names: Sequence[str]) -> int:
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has none of the special tokens {list(names)}")


def encode_all(tokenizer: Tokenizer, texts: Sequence[str], **kwargs: Any) -> list[Encoding]:
    """``tokenizer.encode_batch``, except one text (the common request) is encoded on the
    calling thread: the batch call hands even a single text to tokenizers' thread pool,
    whose wake-up costs CPU on another core, where a model batch may be running."""
    if len(texts) == 1:
        return [tokenizer.encode(texts[0], **kwargs)]
    return tokenizer.encode_batch(list(texts), **kwargs)


def encode_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[Encoding]:
    """Encodings whose ids, type ids and overflow are :func:`encode_all`'s but whose offsets
    are left zero (``encode_batch_fast``): ~20% less tokenizer time per text, for encoders
    that never map tokens back to characters. One text is still encoded on the calling
    thread (tokenizers runs a batch of one serially)."""
    return tokenizer.encode_batch_fast(list(texts))


def join_overlapping(offsets: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """Token character spans with each span that overlaps the one before joined into it,
    and the index of the first token of each joined span.

    A normalizer can turn one character into several tokens that all map back to it:
    lowercasing "İ" gives "i" + U+0307, accent stripping decomposes a Hangul syllable into
    its jamo. Read as substrings, those tokens repeat the character ("3İ", "İstanbul").
    """
    spans: list[tuple[int, int]] = []
    first: list[int] = []
    for i, (s, e) in enumerate(offsets):
        if spans and s < spans[-1][1]:
            spans[-1] = (spans[-1][0], max(e, spans[-1][1]))
        else:
            spans.append((s, e))
            first.append(i)
    return spans, first


def load_tokenizer(tokenizer_file: Path | str) -> Tokenizer:
    """Load ``tokenizer.json`` with any saved padding/truncation switched off.

    The encoders here pad and truncate themselves; a tokenizer file saved by HF may carry
    fixed padding (e.g. to 128) that would otherwise leak into every encoding.
    """
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    return tok
