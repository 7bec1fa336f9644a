"""ONNX export of the packed LSTMs: ORT vs PyTorch parity, and batch-composition invariance
(a sequence alone == the same sequence padded in a batch with longer ones)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from training.lstm.export import (  # noqa: E402
    POLARITY_AXES,
    POLARITY_INPUTS,
    POLARITY_OUTPUTS,
    POS_AXES,
    POS_INPUTS,
    POS_OUTPUTS,
    export_onnx,
    max_abs_diff,
    ort_session,
)
from training.lstm.models import PolarityClassifier, PosTagger  # noqa: E402

VOCAB, N_CHARS, N_TAGS, WIDTH, MAX_T = 60, 30, 9, 16, 40
TOL = 1e-4


def make_inputs(lengths, seed=0, width=WIDTH):
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(lengths)
    word_ids = np.zeros((b, t), np.int64)
    char_ids = np.zeros((b, t, width), np.int64)
    for i, n in enumerate(lengths):
        word_ids[i, :n] = rng.integers(1, VOCAB, n)
        for j in range(n):
            k = rng.integers(1, width + 1)
            char_ids[i, j, :k] = rng.integers(1, N_CHARS, k)
    return {"word_ids": word_ids, "char_ids": char_ids, "lengths": np.asarray(lengths, np.int64)}


def valid_mask(feed):
    t = feed["word_ids"].shape[1]
    return np.arange(t)[None, :] < feed["lengths"][:, None]


@pytest.fixture(scope="module")
def pos(tmp_path_factory):
    torch.manual_seed(0)
    model = PosTagger(VOCAB, N_CHARS, N_TAGS, word_dim=16, char_dim=8, char_filters=12, hidden=16)
    model.eval()
    path = tmp_path_factory.mktemp("pos") / "model.onnx"
    export_onnx(
        model,
        make_inputs([4, 2]),
        path,
        input_names=POS_INPUTS,
        output_names=POS_OUTPUTS,
        dynamic_axes=POS_AXES,
    )
    return model, ort_session(path), path


@pytest.fixture(scope="module", params=[(True, 1), (True, 2), (False, 1)], ids=str)
def polarity(request, tmp_path_factory):
    bidirectional, layers = request.param
    torch.manual_seed(0)
    model = PolarityClassifier(
        VOCAB, emb_dim=16, hidden=16, layers=layers, bidirectional=bidirectional
    ).eval()
    path = tmp_path_factory.mktemp("polarity") / "model.onnx"
    ex = make_inputs([4, 2])
    export_onnx(
        model,
        {k: ex[k] for k in POLARITY_INPUTS},
        path,
        input_names=POLARITY_INPUTS,
        output_names=POLARITY_OUTPUTS,
        dynamic_axes=POLARITY_AXES,
    )
    return model, ort_session(path), path


LENGTHS = [[1], [MAX_T], [1, MAX_T], [7, 1, 13, MAX_T, 2], [3] * 6, [25, 24, 1, 1]]


def test_onnx_graph_contract(pos, polarity):
    for (_, _, path), names in ((pos, POS_INPUTS), (polarity, POLARITY_INPUTS)):
        g = onnx.load(str(path)).graph
        assert [i.name for i in g.input] == names
        assert [o.name for o in g.output] == ["logits"]
        for i in g.input:
            assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
            dims = [d.dim_param for d in i.type.tensor_type.shape.dim]
            assert all(dims), f"{i.name} has a fixed axis: {dims}"
        assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        # pack_padded_sequence became ONNX LSTM nodes fed with sequence_lens
        lstms = [n for n in g.node if n.op_type == "LSTM"]
        assert lstms and all(len(n.input) >= 5 and n.input[4] for n in lstms)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_pos_onnx_matches_torch(pos, lengths):
    model, sess, _ = pos
    feed = make_inputs(lengths, seed=len(lengths))
    assert max_abs_diff(model, sess, feed, POS_INPUTS, valid_mask(feed)) <= TOL


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_polarity_onnx_matches_torch(polarity, lengths):
    model, sess, _ = polarity
    feed = {k: v for k, v in make_inputs(lengths, seed=len(lengths)).items() if k != "char_ids"}
    assert max_abs_diff(model, sess, feed, POLARITY_INPUTS) <= TOL


def test_pos_alone_equals_batched(pos):
    _, sess, _ = pos
    lengths = [1, 5, MAX_T, 12]
    feed = make_inputs(lengths, seed=3)
    batched = sess.run(None, feed)[0]
    for i, n in enumerate(lengths):
        alone = sess.run(
            None,
            {
                "word_ids": feed["word_ids"][i : i + 1, :n],
                "char_ids": feed["char_ids"][i : i + 1, :n],
                "lengths": feed["lengths"][i : i + 1],
            },
        )[0]
        assert alone.shape == (1, n, N_TAGS)
        assert np.abs(alone[0] - batched[i, :n]).max() <= TOL


def test_pos_char_width_is_dynamic(pos):
    _, sess, _ = pos
    feed = make_inputs([6, 3], seed=4)
    wider = dict(feed, char_ids=np.pad(feed["char_ids"], ((0, 0), (0, 0), (0, 8))))
    assert np.abs(sess.run(None, feed)[0] - sess.run(None, wider)[0]).max() <= TOL


def test_polarity_alone_equals_batched(polarity):
    _, sess, _ = polarity
    lengths = [1, 9, MAX_T, 2]
    feed = make_inputs(lengths, seed=5)
    batched = sess.run(None, {k: feed[k] for k in POLARITY_INPUTS})[0]
    for i, n in enumerate(lengths):
        alone = sess.run(
            None,
            {"word_ids": feed["word_ids"][i : i + 1, :n], "lengths": feed["lengths"][i : i + 1]},
        )[0]
        assert np.abs(alone[0] - batched[i]).max() <= TOL


def test_polarity_empty_row_reads_one_padding_step(polarity):
    """lengths are clamped to >= 1 inside the model: an empty text (length 0) gives the same
    logits as one <pad> step, never the -1e4 of an empty max-pool."""
    _, sess, _ = polarity
    word_ids = np.array([[0, 0, 0], [5, 6, 7]], np.int64)
    zero = sess.run(None, {"word_ids": word_ids, "lengths": np.array([0, 3], np.int64)})[0]
    one = sess.run(None, {"word_ids": word_ids[:1, :1], "lengths": np.array([1], np.int64)})[0]
    assert np.abs(zero[0] - one[0]).max() <= TOL
    assert np.abs(zero[0]).max() < 100
