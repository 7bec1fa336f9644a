"""SQuAD-v1-format loader (CMRC 2018, DRCD): one :class:`QAExample` per question.

CMRC 2018 has answers whose ``answer_start`` does not point at their text (``-1`` or another
offset). The loader re-searches the answer text in the context, taking the occurrence nearest
to the recorded offset; answers whose text is nowhere in the context keep their text (the
metric still uses it) but get ``start = -1``, and training skips examples without any
locatable answer. :class:`LoadStats` counts both cases for the training log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.data.common import DataError, read_json

SQUAD_SHAPE = 'SQuAD-v1 JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]})'


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset into the context; -1 when the text is not in the context

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    id: str
    article: str  # article/paragraph id: the unit to split by
    question: str
    context: str
    answers: tuple[Answer, ...]

    @property
    def first_located(self) -> Answer | None:
        return next((a for a in self.answers if a.start >= 0), None)


@dataclass
class LoadStats:
    questions: int = 0
    answers: int = 0
    realigned: int = 0  # text found at another offset than answer_start
    unfindable: int = 0  # text not in the context at all
    no_located_answer: int = 0  # questions whose answers are all unfindable
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "questions": self.questions,
            "answers": self.answers,
            "realigned_answers": self.realigned,
            "unfindable_answers": self.unfindable,
            "questions_without_located_answer": self.no_located_answer,
        }


def locate_answer(context: str, text: str, start: int) -> int:
    """``start`` if the text is there, else the occurrence nearest to ``start``, else -1."""
    if not text:
        return -1
    if start >= 0 and context[start : start + len(text)] == text:
        return start
    best, i = -1, context.find(text)
    while i >= 0:
        if best < 0 or abs(i - start) < abs(best - start):
            best = i
        i = context.find(text, i + 1)
    return best


def load_squad(path: Path | str, stats: LoadStats | None = None) -> list[QAExample]:
    """Every question of a SQuAD-v1 JSON file, answers located in their context."""
    stats = stats if stats is not None else LoadStats()
    stats.files.append(str(path))
    raw = read_json(path, SQUAD_SHAPE)
    try:
        return _squad_examples(raw, stats)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: not {SQUAD_SHAPE}: {type(e).__name__} {e}") from e


def _squad_examples(raw: dict, stats: LoadStats) -> list[QAExample]:
    out: list[QAExample] = []
    for article in raw["data"]:
        for p_i, para in enumerate(article["paragraphs"]):
            context = para["context"]
            art_id = str(para.get("id") or f"{article.get('id', article.get('title', ''))}-{p_i}")
            for qa in para["qas"]:
                answers = []
                for a in qa.get("answers", []):
                    text, start = a["text"], int(a.get("answer_start", -1))
                    found = locate_answer(context, text, start)
                    stats.answers += 1
                    if found < 0:
                        stats.unfindable += 1
                    elif found != start:
                        stats.realigned += 1
                    answers.append(Answer(text, found))
                stats.questions += 1
                ex = QAExample(str(qa["id"]), art_id, qa["question"], context, tuple(answers))
                if ex.first_located is None:
                    stats.no_located_answer += 1
                out.append(ex)
    return out
