"""The NLTK Penn Treebank sample (``treebank.zip`` or an extracted ``treebank/`` folder).

Reads the bracketed parses in ``treebank/combined/*.mrg`` with a small parser of its own (no
NLTK download needed) and keeps the pre-terminals as ``(word, tag)`` pairs.

* ``-NONE-`` tokens (traces and empty elements such as ``*T*-1`` or ``0``) are dropped by
  default: they are not words of the sentence and never occur in served text.
* Bracket escapes are turned back into the characters the service will see
  (``-LRB-`` -> ``(``, ``-RCB-`` -> ``}``, ``\\/`` -> ``/``, ``\\*`` -> ``*``); tags keep
  their treebank names (``-LRB-``...).
"""

from __future__ import annotations

import re
from pathlib import Path

from training.data.common import (
    DataError,
    TaggedCorpus,
    data_root,
    first_existing,
    nltk_candidates,
    open_zip,
)

TRACE_TAG = "-NONE-"
UNESCAPE = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LCB-": "{",
    "-RCB-": "}",
    "-LSB-": "[",
    "-RSB-": "]",
}
_PRETERMINAL = re.compile(r"\(([^\s()]+)\s+([^\s()]+)\s*\)")
EXPECTED = (
    "expected the NLTK Penn Treebank sample: treebank.zip or an extracted treebank/ folder "
    "with combined/*.mrg (directly, or under corpora/ or nltk_data/corpora/)"
)


def unescape_word(word: str) -> str:
    word = UNESCAPE.get(word, word)
    return word.replace("\\/", "/").replace("\\*", "*")


def split_trees(text: str, source: str) -> list[str]:
    """Top-level bracketed trees of one ``.mrg`` file."""
    trees, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "(":
            if depth == 0:
                start = i
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise DataError(f"{source}: unbalanced ')' at offset {i}; {EXPECTED}")
            if depth == 0:
                trees.append(text[start : i + 1])
        elif depth == 0 and not ch.isspace():
            raise DataError(
                f"{source}: text outside a bracketed tree at offset {i}; expected Penn Treebank "
                "bracketed parses (.mrg)"
            )
    if depth != 0:
        raise DataError(f"{source}: unbalanced '(' (file ends inside a tree); {EXPECTED}")
    return trees


def parse_mrg(
    text: str, source: str = "<mrg>", *, drop_traces: bool = True, unescape: bool = True
) -> list[list[tuple[str, str]]]:
    """Sentences of ``(word, tag)`` from the text of one ``.mrg`` file."""
    sentences = []
    for tree in split_trees(text, source):
        pairs = []
        for tag, word in _PRETERMINAL.findall(tree):
            if drop_traces and tag == TRACE_TAG:
                continue
            pairs.append((unescape_word(word) if unescape else word, tag))
        if pairs:
            sentences.append(pairs)
    return sentences


def _locate(path: Path) -> Path:
    """The treebank zip, or the ``treebank`` folder holding ``combined/``."""
    if not path.exists():
        raise DataError(f"{path}: data path not found; {EXPECTED}")
    if path.is_file():
        if path.suffix != ".zip":
            raise DataError(f"{path}: not a zip file; {EXPECTED}")
        return path
    if (path / "combined").is_dir():
        return path
    found = first_existing(nltk_candidates(path, "treebank"))
    if found is None:
        raise DataError(f"{path}: no Penn Treebank sample found; {EXPECTED}")
    if found.is_dir() and not (found / "combined").is_dir():
        raise DataError(f"{found}: folder has no combined/ subfolder; {EXPECTED}")
    return found


def load_treebank(
    path: Path | str, *, drop_traces: bool = True, unescape: bool = True
) -> TaggedCorpus:
    """Load every sentence of the sample (3,914 in the NLTK copy), in file order."""
    path = Path(path)
    found = _locate(path)
    files: list[Path] = []
    texts: list[tuple[str, str]] = []  # (source name, text)
    if found.is_file():
        with open_zip(found) as zf:
            names = sorted(
                n
                for n in zf.namelist()
                if n.endswith(".mrg") and n.rsplit("/", 2)[-2:-1] == ["combined"]
            )
            if not names:
                raise DataError(f"{found}: zip holds no combined/*.mrg files; {EXPECTED}")
            for n in names:
                texts.append((f"{found}:{n}", zf.read(n).decode("utf-8", errors="replace")))
        files.append(found)
    else:
        mrgs = sorted((found / "combined").glob("*.mrg"))
        if not mrgs:
            raise DataError(f"{found / 'combined'}: no *.mrg files; {EXPECTED}")
        for f in mrgs:
            texts.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
        files.extend(mrgs)
    sentences, tags = [], []
    for source, text in texts:
        for sent in parse_mrg(text, source, drop_traces=drop_traces, unescape=unescape):
            sentences.append([w for w, _ in sent])
            tags.append([t for _, t in sent])
    if not sentences:
        raise DataError(f"{found}: no tagged sentences found; {EXPECTED}")
    return TaggedCorpus(sentences, tags, files, data_root(path), source="treebank")
