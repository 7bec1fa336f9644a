"""Shared pieces of the dataset loaders: the error type, corpus containers, path resolution."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Missing data or a file in the wrong format; the message names the path and what was
    expected there."""


class TrainingError(ValueError):
    """A run that cannot give a usable model with these options (the loss diverged, the export
    does not compute what the trained model does); nothing is published."""


@dataclass
class TaggedCorpus:
    """Sentences of tokens with one tag per token."""

    sentences: list[list[str]]
    tags: list[list[str]]
    # Files whose bytes were read (a zip counts as one file) and the root they are relative to.
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.sentences)

    def tagset(self) -> list[str]:
        return sorted({t for ts in self.tags for t in ts})


@dataclass
class TextCorpus:
    """Texts with one integer label each (an index into ``label_names``)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def read_json(path: Path | str, expected: str) -> Any:
    """A JSON file's content; a file that is no JSON is a DataError naming it and what was
    ``expected`` there."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not {expected} ({e})") from e


def iter_json_lines(path: Path, expected: str) -> Iterator[Any]:
    """The rows of a JSON-lines file, blank lines skipped; a bad line is a DataError naming
    the file and line."""
    with path.open(encoding="utf-8") as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the bad line below)
                if line.strip():
                    yield json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not {expected} ({e})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e


def data_root(path: Path) -> Path:
    """The folder that recorded data paths are relative to: ``path`` itself, or its parent
    when ``path`` is a file."""
    return path if path.is_dir() else path.parent


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from e


def first_existing(candidates: Iterable[Path]) -> Path | None:
    for c in candidates:
        if c.exists():
            return c
    return None


def nltk_candidates(root: Path, corpus: str) -> Iterator[Path]:
    """Where an NLTK corpus may sit under ``root``: extracted folder first, then the zip."""
    for base in (root, root / "corpora", root / "nltk_data" / "corpora"):
        yield base / corpus
        yield base / f"{corpus}.zip"


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 (the NLTK copies), falling back to latin-1 (the original distributions)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
