"""Pang & Lee sentence polarity (rt-polaritydata v1.0): ``rt-polarity.pos`` / ``.neg``.

Accepts the NLTK ``sentence_polarity.zip`` (or its extracted folder) and the original
distribution folder. The NLTK copy is UTF-8; the original files are latin-1: each file is
decoded as UTF-8 with a latin-1 fallback. One sentence per line.
"""

from __future__ import annotations

from pathlib import Path

from training.data.common import (
    DataError,
    TextCorpus,
    data_root,
    decode_text,
    first_existing,
    nltk_candidates,
    open_zip,
)

LABELS = ["negative", "positive"]
FILES = {"negative": "rt-polarity.neg", "positive": "rt-polarity.pos"}
EXPECTED = (
    "expected rt-polarity.pos and rt-polarity.neg: sentence_polarity.zip (NLTK) or a folder "
    "holding both files (directly, as sentence_polarity/, or under corpora/ or "
    "nltk_data/corpora/)"
)


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES.values())


def _locate(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: data path not found; {EXPECTED}")
    if path.is_file():
        if path.suffix != ".zip":
            raise DataError(f"{path}: not a zip file; {EXPECTED}")
        return path
    if _has_files(path):
        return path
    for c in (path / "rt-polaritydata", *nltk_candidates(path, "sentence_polarity")):
        if c.is_file() or (c.is_dir() and _has_files(c)):
            return c
    if first_existing(nltk_candidates(path, "sentence_polarity")) is not None:
        raise DataError(f"{path}: sentence_polarity found but incomplete; {EXPECTED}")
    raise DataError(f"{path}: no sentence polarity data found; {EXPECTED}")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_polarity(path: Path | str) -> TextCorpus:
    """All negative sentences (label 0) followed by all positive ones (label 1)."""
    path = Path(path)
    found = _locate(path)
    texts: list[str] = []
    labels: list[int] = []
    files: list[Path] = []
    if found.is_file():
        with open_zip(found) as zf:
            names = zf.namelist()
            for label, fname in enumerate(FILES[n] for n in LABELS):
                member = next((n for n in names if n.rsplit("/", 1)[-1] == fname), None)
                if member is None:
                    raise DataError(f"{found}: zip has no {fname}; {EXPECTED}")
                lines = _lines(decode_text(zf.read(member), f"{found}:{member}"))
                texts += lines
                labels += [label] * len(lines)
        files.append(found)
    else:
        for label, fname in enumerate(FILES[n] for n in LABELS):
            f = found / fname
            lines = _lines(decode_text(f.read_bytes(), str(f)))
            texts += lines
            labels += [label] * len(lines)
            files.append(f)
    for name in LABELS:
        if labels.count(LABELS.index(name)) == 0:
            raise DataError(f"{found}: {FILES[name]} holds no sentences; {EXPECTED}")
    return TextCorpus(texts, labels, list(LABELS), files, data_root(path), source="rt-polarity")
