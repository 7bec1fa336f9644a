"""Build REAL tiny trained repository entries for tests, in a few seconds, without shared data.

    from tests.builders import build_tiny_pos, build_tiny_polarity
    pos_dir = build_tiny_pos(tmp_path)            # -> tmp_path/"pos-en"/"1"
    pol_dir = build_tiny_polarity(tmp_path)       # -> tmp_path/"polarity-en"/"1"

    python -m tests.builders DIR                  # both, into DIR (the BERT ones:
                                                  # python -m tests.builders_bert DIR)

Both go through the same code as ``nlpserve train pos|polarity`` (WordEncoder, packed BiLSTM,
ONNX export, repository writer), on small synthetic corpora generated here. The entries pass
``load_manifest`` and the ONNX contract is the real one; the tiny models fit their toy data
(a few tags / obvious sentiment words), not real English.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from training.data.common import TaggedCorpus, TextCorpus

POS_LEXICON: dict[str, list[str]] = {
    "DT": ["the", "a", "this", "every"],
    "JJ": ["big", "small", "red", "happy", "old", "quick"],
    "NN": ["dog", "cat", "house", "tree", "car", "bird", "man", "park"],
    "NNS": ["dogs", "cats", "houses", "trees", "cars", "birds"],
    "VBZ": ["sees", "likes", "chases", "owns", "finds"],
    "VBD": ["saw", "liked", "chased", "owned", "found"],
    "IN": ["in", "near", "with", "behind"],
    "PRP": ["he", "she", "it"],
    "RB": ["quickly", "slowly", "often"],
    "CC": ["and", "but"],
    ".": [".", "!"],
    ",": [","],
}
POSITIVE = ["great", "wonderful", "brilliant", "moving", "funny", "charming", "superb", "fresh"]
NEGATIVE = ["terrible", "boring", "dull", "awful", "tedious", "bland", "clumsy", "stale"]
FILLER = [
    "the", "movie", "film", "story", "acting", "is", "was", "really", "quite", "a", "and",
    "plot", "cast", "this", "it", "very", "director", "script", "so", "truly",
]  # fmt: skip


def _noun_phrase(rng: random.Random) -> list[tuple[str, str]]:
    if rng.random() < 0.2:
        return [(rng.choice(POS_LEXICON["PRP"]), "PRP")]
    plural = rng.random() < 0.3
    out = [] if plural else [(rng.choice(POS_LEXICON["DT"]), "DT")]
    for _ in range(rng.choice([0, 0, 1, 2])):
        out.append((rng.choice(POS_LEXICON["JJ"]), "JJ"))
    tag = "NNS" if plural else "NN"
    return out + [(rng.choice(POS_LEXICON[tag]), tag)]


def tiny_pos_corpus(n: int = 240, seed: int = 0) -> TaggedCorpus:
    """Synthetic tagged sentences: NP V NP (IN NP) (, CC NP V NP) . with capitalised starts."""
    rng = random.Random(seed)
    sentences, tags = [], []
    for _ in range(n):
        sent = _noun_phrase(rng)
        if rng.random() < 0.3:
            sent.append((rng.choice(POS_LEXICON["RB"]), "RB"))
        verb = rng.choice(["VBZ", "VBD"])
        sent += [(rng.choice(POS_LEXICON[verb]), verb)] + _noun_phrase(rng)
        if rng.random() < 0.4:
            sent += [(rng.choice(POS_LEXICON["IN"]), "IN")] + _noun_phrase(rng)
        if rng.random() < 0.2:
            sent += [(",", ","), (rng.choice(POS_LEXICON["CC"]), "CC")] + _noun_phrase(rng)
            sent += [(rng.choice(POS_LEXICON["VBZ"]), "VBZ")] + _noun_phrase(rng)
        sent.append((rng.choice(POS_LEXICON["."]), "."))
        words = [w for w, _ in sent]
        words[0] = words[0].capitalize()
        sentences.append(words)
        tags.append([t for _, t in sent])
    return TaggedCorpus(sentences, tags, source="tiny-synthetic")


def tiny_polarity_corpus(n: int = 400, seed: int = 0) -> TextCorpus:
    """Synthetic reviews: filler words around one or two sentiment words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        cues = POSITIVE if label else NEGATIVE
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        for _ in range(rng.choice([1, 1, 2])):
            words.insert(rng.randint(0, len(words)), rng.choice(cues))
        if rng.random() < 0.3:
            words.append(rng.choice([".", "!"]))
        texts.append(" ".join(words))
        labels.append(label)
    return TextCorpus(texts, labels, ["negative", "positive"], source="tiny-synthetic")


@contextlib.contextmanager
def _training_logs_quiet() -> Iterator[None]:
    """The training code's INFO lines off while a builder trains, and its logger's level given
    back after: left at WARNING, it silenced those lines in every later test of the session
    (a test of the epoch line failed whenever a builder had run before it)."""
    logger = logging.getLogger("training")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_tiny_pos(root: Path, *, name: str = "pos-en", version: str = "1", seed: int = 0) -> Path:
    """Train a tiny POS tagger on synthetic data; write ``root/name/version``; return it."""
    import torch

    from training.lstm.pos import PosConfig, run_pos

    torch.set_num_threads(1)
    cfg = PosConfig(
        epochs=6,
        patience=6,
        batch_size=16,
        lr=1e-2,
        word_dim=16,
        char_dim=8,
        char_filters=16,
        hidden=16,
        dropout=0.1,
        word_dropout=0.02,
        min_count=1,
        max_length=64,
        seed=seed,
        progress=False,
        dataset="tiny-synthetic",
    )
    with _training_logs_quiet():
        return run_pos(
            tiny_pos_corpus(seed=seed),
            root,
            cfg,
            name=name,
            version=version,
            command="tests.builders.build_tiny_pos",
            description="TINY TEST MODEL trained on synthetic sentences (tests/builders.py).",
        )


def build_tiny_polarity(
    root: Path, *, name: str = "polarity-en", version: str = "1", seed: int = 0
) -> Path:
    """Train a tiny polarity classifier on synthetic data; write ``root/name/version``."""
    import torch

    from training.lstm.polarity import PolarityConfig, run_polarity

    torch.set_num_threads(1)
    cfg = PolarityConfig(
        epochs=6,
        patience=6,
        batch_size=16,
        lr=1e-2,
        emb_dim=16,
        nb_dims=4,
        hidden=16,
        dropout=0.1,
        word_dropout=0.0,
        min_count=1,
        max_length=32,
        seed=seed,
        progress=False,
    )
    with _training_logs_quiet():
        return run_polarity(
            tiny_polarity_corpus(seed=seed),
            root,
            cfg,
            name=name,
            version=version,
            command="tests.builders.build_tiny_polarity",
            description="TINY TEST MODEL trained on synthetic reviews (tests/builders.py).",
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.builders DIR``: build the tiny pos-en and polarity-en into DIR."""
    import sys
    import time

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m tests.builders DIR\n"
              "  builds the tiny LSTM models DIR/pos-en/1 and DIR/polarity-en/1 "
              "(the BERT ones: python -m tests.builders_bert DIR)", file=sys.stderr)  # fmt: skip
        return 2
    target = Path(args[0])
    for name, build in (("pos-en", build_tiny_pos), ("polarity-en", build_tiny_polarity)):
        if (target / name / "1").exists():
            print(f"{target / name / '1'} already exists: not rebuilt (remove it to rebuild)")
            continue
        t = time.time()
        print(build(target), f"{time.time() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
