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


def load_tokenizer(tokenizer_file: Path | str) -> Tokenizer:
    """Load ``tokenizer.json`` with any saved padding/truncation switched off.

    The encoders here pad and truncate themselves; a tokenizer file saved by HF may carry
    fixed padding (e.g. to 128) that would otherwise leak into every encoding.
    """
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    return tok
