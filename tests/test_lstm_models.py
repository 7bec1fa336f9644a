"""The torch modules and training-loop pieces (no shared data needed)."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from service.preprocess.words import PAD_ID, UNK_ID  # noqa: E402
from training.lstm.loop import eval_batches, length_batches, word_dropout  # noqa: E402
from training.lstm.models import CharCNN, PolarityClassifier, PosTagger  # noqa: E402
from training.repository import bucket_edges, next_version  # noqa: E402


def random_batch(lengths, vocab=40, n_chars=20, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    word_ids = torch.zeros(b, t, dtype=torch.long)
    char_ids = torch.zeros(b, t, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        word_ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        for j in range(n):
            k = int(torch.randint(1, width + 1, (1,), generator=g))
            char_ids[i, j, :k] = torch.randint(1, n_chars, (k,), generator=g)
    return word_ids, char_ids, torch.tensor(lengths)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_pos_tagger_shapes_and_padding_invariance():
    model = PosTagger(40, 20, 7, word_dim=8, char_dim=4, char_filters=6, hidden=8).eval()
    w, c, lens = random_batch([5, 1, 9])
    with torch.no_grad():
        out = model(w, c, lens)
        assert out.shape == (3, 9, 7) and out.dtype == torch.float32
        for i, n in enumerate([5, 1, 9]):
            alone = model(w[i : i + 1, :n], c[i : i + 1, :n], lens[i : i + 1])
            torch.testing.assert_close(alone[0], out[i, :n], atol=1e-5, rtol=0)


def test_char_cnn_ignores_extra_char_padding():
    cnn = CharCNN(20, dim=4, filters=6).eval()
    _, c, _ = random_batch([4, 2], width=8)
    wider = torch.cat([c, torch.zeros(2, 4, 5, dtype=torch.long)], dim=2)
    with torch.no_grad():
        a, b = cnn(c), cnn(wider)
    torch.testing.assert_close(a, b)
    assert torch.all(a[1, 2:] == 0)  # all-padding words get zero features


@pytest.mark.parametrize(
    ("bidirectional", "layers", "max_pool"), [(True, 1, True), (True, 2, False), (False, 1, True)]
)
def test_polarity_shapes_and_padding_invariance(bidirectional, layers, max_pool):
    model = PolarityClassifier(
        40, emb_dim=8, hidden=8, layers=layers, bidirectional=bidirectional, max_pool=max_pool
    ).eval()
    w, _, lens = random_batch([6, 1, 3, 11])
    with torch.no_grad():
        out = model(w, lens)
        assert out.shape == (4, 2)
        for i, n in enumerate([6, 1, 3, 11]):
            alone = model(w[i : i + 1, :n], lens[i : i + 1])
            torch.testing.assert_close(alone[0], out[i], atol=1e-5, rtol=0)


def test_a_few_steps_reduce_the_loss():
    model = PosTagger(40, 20, 3, word_dim=8, char_dim=4, char_filters=6, hidden=8, dropout=0.0)
    w, c, lens = random_batch([6, 4, 8, 3])
    y = (w % 3).masked_fill(w == 0, -100)  # tag = a function of the word
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(w, c, lens).reshape(-1, 3), y.reshape(-1), ignore_index=-100
        )
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_word_dropout_keeps_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0]] * 200)
    out = word_dropout(ids, 0.5)
    assert torch.all(out[:, 3:] == PAD_ID)
    dropped = (out[:, :3] == UNK_ID).float().mean()
    assert 0.35 < float(dropped) < 0.65
    assert torch.equal(word_dropout(ids, 0.0), ids)


def test_batching_covers_every_example_once():
    lengths = [random.Random(i).randint(1, 50) for i in range(333)]
    batches = length_batches(lengths, 16, random.Random(0), pool=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(333))
    assert sorted(i for b in eval_batches(lengths, 50) for i in b) == list(range(333))


def test_bucket_edges_end_at_max_length():
    lengths = np.arange(1, 101)
    edges = bucket_edges(lengths, 128)
    assert edges[-1] == 128 and edges == sorted(set(edges))
    assert all(e % 8 == 0 for e in edges[:-1])
    assert bucket_edges([], 64) == [64]
    assert bucket_edges([500, 600], 64) == [64]


def test_next_version(tmp_path):
    assert next_version(tmp_path, "pos-en") == "1"
    (tmp_path / "pos-en" / "1").mkdir(parents=True)
    (tmp_path / "pos-en" / "7").mkdir()
    (tmp_path / "pos-en" / "draft").mkdir()
    assert next_version(tmp_path, "pos-en") == "8"
