"""CoNLL-U files (Universal Dependencies): one token per line, UPOS or XPOS tags.

Multiword-token ranges (``1-2``) and empty nodes (``1.1``) are skipped: the syntactic words
of a range are listed on their own lines and carry the tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from training.data.common import DataError, TaggedCorpus, data_root

TagField = Literal["upos", "xpos"]
_COLUMN = {"upos": 3, "xpos": 4}


def parse_conllu(
    text: str, source: str = "<conllu>", *, tag_field: TagField = "upos"
) -> list[list[tuple[str, str]]]:
    if tag_field not in _COLUMN:
        raise ValueError(f"tag_field must be 'upos' or 'xpos', got {tag_field!r}")
    col = _COLUMN[tag_field]
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise DataError(
                f"{source}:{lineno}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}"
            )
        tid = cols[0]
        if "-" in tid or "." in tid:
            continue
        if not tid.isdigit():
            raise DataError(f"{source}:{lineno}: expected an integer token ID, got {tid!r}")
        tag = cols[col]
        if tag == "_":
            raise DataError(f"{source}:{lineno}: token has no {tag_field.upper()} tag ('_')")
        current.append((cols[1], tag))
    if current:
        sentences.append(current)
    return sentences


def load_conllu(
    paths: Path | str | Sequence[Path | str], *, tag_field: TagField = "upos"
) -> TaggedCorpus:
    """Load one ``.conllu`` file, several, or every ``*.conllu`` in a folder (sorted)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.conllu"))
            if not found:
                raise DataError(f"{p}: folder holds no *.conllu files; expected CoNLL-U data")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(
                f"{p}: data path not found; expected a .conllu file or a folder of them"
            )
    sentences, tags = [], []
    for f in files:
        text = f.read_text(encoding="utf-8")
        parsed = parse_conllu(text, str(f), tag_field=tag_field)
        if not parsed:
            raise DataError(f"{f}: no sentences found; expected CoNLL-U data")
        for sent in parsed:
            sentences.append([w for w, _ in sent])
            tags.append([t for _, t in sent])
    root = data_root(Path(paths[0])) if len(paths) == 1 else None
    return TaggedCorpus(sentences, tags, files, root, source=f"conllu:{tag_field}")
