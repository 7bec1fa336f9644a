"""HC3 loader (human vs ChatGPT answers, JSON lines): one :class:`DetectExample` per answer.

Each line is ``{"question", "human_answers": [...], "chatgpt_answers": [...]}``. ``null`` and
empty/whitespace answers are skipped and counted. Examples keep their question index so a
split by question (no question in two splits) is a split of :func:`question_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from training.data.common import DataError, iter_json_lines

HC3_ROW = 'HC3 JSON lines ({"question", "human_answers": [...], "chatgpt_answers": [...]})'

LABELS = ["human", "machine"]
HUMAN, MACHINE = 0, 1


@dataclass(frozen=True)
class DetectExample:
    text: str
    label: int  # 0 human, 1 machine
    question: int  # index of the question (over all files loaded together)
    source: str  # file stem, e.g. "open_qa"


@dataclass
class HC3Stats:
    questions: int = 0
    human: int = 0
    machine: int = 0
    skipped_null: int = 0
    skipped_empty: int = 0
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "questions": self.questions,
            "human_answers": self.human,
            "machine_answers": self.machine,
            "skipped_null_answers": self.skipped_null,
            "skipped_empty_answers": self.skipped_empty,
        }


def hc3_files(root: Path | str, lang: str = "en") -> list[Path]:
    """The ``*.jsonl`` files of ``<root>/hc3/<lang>/`` (or of ``root`` itself), sorted."""
    root = Path(root)
    folder = root / "hc3" / lang if (root / "hc3" / lang).is_dir() else root
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        hc3 = root / "hc3"
        have = sorted(p.name for p in hc3.iterdir() if p.is_dir()) if hc3.is_dir() else []
        where = f"{root / 'hc3' / lang} or {root}" if folder == root else str(folder)
        raise FileNotFoundError(
            f"no HC3 *.jsonl files in {where}"
            + (f" (languages here: {', '.join(have)})" if have else "")
        )
    return files


def load_hc3(files: Iterable[Path | str], stats: HC3Stats | None = None) -> list[DetectExample]:
    stats = stats if stats is not None else HC3Stats()
    out: list[DetectExample] = []
    for path in files:
        path = Path(path)
        stats.files.append(str(path))
        for row in iter_json_lines(path, HC3_ROW):
            if not isinstance(row, dict):
                raise DataError(f"{path}: not {HC3_ROW}: a row is {type(row).__name__}")
            q = stats.questions
            stats.questions += 1
            for key, label in (("human_answers", HUMAN), ("chatgpt_answers", MACHINE)):
                answers = row.get(key) or []
                if not isinstance(answers, list):
                    raise DataError(f"{path}: not {HC3_ROW}: {key} is {type(answers).__name__}")
                for ans in answers:
                    if ans is None:
                        stats.skipped_null += 1
                        continue
                    text = str(ans).strip()
                    if not text:
                        stats.skipped_empty += 1
                        continue
                    if label == HUMAN:
                        stats.human += 1
                    else:
                        stats.machine += 1
                    out.append(DetectExample(text, label, q, path.stem))
    return out
