"""``nlpserve train pos|polarity`` from the command line: what is refused before any data is
read or any training done (output folder, names, numbers), the ONNX parity gate, stdout that
holds only the JSON report, and CoNLL-U found under the data root."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import tiny_polarity_corpus, tiny_pos_corpus

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TINY_POS = ["--hidden", 8, "--word-dim", 8, "--char-filters", 8, "--threads", 1]
TINY_POLARITY = ["--hidden", 8, "--emb-dim", 8, "--nb-dims", 4, "--threads", 1]


def flat(output: str) -> str:
    """Typer's error box, as one line of words (the box wraps long messages)."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.fixture
def no_training(monkeypatch):
    """Loading data or training fails the test: the checks must come first."""
    import training.data.polarity
    import training.lstm.polarity
    import training.lstm.pos

    def boom(*a, **k):
        raise AssertionError("data was loaded or a model trained before the checks")

    for module, attr in (
        (training.lstm.pos, "load_pos_corpus"),
        (training.lstm.pos, "run_pos"),
        (training.data.polarity, "load_polarity"),
        (training.lstm.polarity, "run_polarity"),
    ):
        monkeypatch.setattr(module, attr, boom)


def write_conllu_root(root: Path, n: int = 80) -> Path:
    """A data root holding ``ud_english_ewt/tiny.conllu``, as the README lays it out."""
    corpus = tiny_pos_corpus(n=n, seed=3)
    lines = []
    for i, (words, tags) in enumerate(zip(corpus.sentences, corpus.tags, strict=True), 1):
        lines.append(f"# sent_id = {i}")
        for j, (w, t) in enumerate(zip(words, tags, strict=True), 1):
            lines.append(f"{j}\t{w}\t{w.lower()}\tX\t{t}\t_\t0\tdep\t_\t_")
        lines.append("")
    folder = root / "ud_english_ewt"
    folder.mkdir(parents=True)
    (folder / "tiny.conllu").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_polarity_root(root: Path, n: int = 120) -> Path:
    corpus = tiny_polarity_corpus(n=n, seed=2)
    folder = root / "nltk_data" / "corpora" / "sentence_polarity"
    folder.mkdir(parents=True)
    for label, name in ((0, "neg"), (1, "pos")):
        lines = [t for t, y in zip(corpus.texts, corpus.labels, strict=True) if y == label]
        (folder / f"rt-polarity.{name}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ------------------------------------------------------------- output checked before training
@pytest.mark.parametrize("task", ["pos", "polarity"])
def test_existing_version_is_refused_before_training(cli, no_training, tmp_path, task):
    name = f"{task}-en"
    (tmp_path / "out" / name / "1").mkdir(parents=True)
    res = cli("train", task, "--data", tmp_path, "--out", tmp_path / "out", "--version", 1)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("nlpserve: FileExistsError: ") and "already exists" in res.stderr
    # without --version: the next integer (2), which is free: on to loading the data
    res = cli("train", task, "--data", tmp_path, "--out", tmp_path / "out")
    assert isinstance(res.exception, AssertionError), res.output


def test_existing_version_is_one_line_exit_2():
    """Through ``main``: FileExistsError is one of the CLI's one-line user errors."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "out" / "polarity-en" / "7").mkdir(parents=True)
        proc = subprocess.run(
            [sys.executable, "-m", "service.cli", "train", "polarity", "--data", tmp,
             "--out", f"{tmp}/out", "--version", "7"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("nlpserve: FileExistsError: ")
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("task", ["pos", "polarity"])
@pytest.mark.parametrize(
    ("option", "value", "what"),
    [("--version", "../evil", "version"), ("--name", "a/b", "name"), ("--name", ".x", "name")],
)
def test_bad_name_or_version_is_a_usage_error(
    cli, no_training, tmp_path, task, option, value, what
):
    res = cli("train", task, "--data", tmp_path, "--out", tmp_path / "out", option, value)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}': {what} '{value}'" in flat(res.output)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("task", ["pos", "polarity"])
def test_unwritable_out_is_refused_before_training(cli, no_training, tmp_path, task):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = cli("train", task, "--data", tmp_path, "--out", afile / "models")
    assert res.exit_code == 2, res.output
    assert "cannot write the model repository" in flat(res.output)
    if Path("/proc/self").is_dir():  # a folder nobody can create anything in
        res = cli("train", task, "--data", tmp_path, "--out", "/proc/nlpserve-test-models")
        assert res.exit_code == 2, res.output
        assert "cannot write the model repository" in flat(res.output)


def test_check_writable_creates_nothing(tmp_path):
    from training.repository import check_writable

    check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_text("")
        check_writable(tmp_path / "f" / "models")


# ------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    ("task", "args"),
    [
        ("pos", ["--hidden", 0]),
        ("pos", ["--layers", 0]),
        ("pos", ["--dropout", 1.5]),
        ("pos", ["--dropout", 1]),
        ("pos", ["--dropout", -0.1]),
        ("pos", ["--word-dim", 0]),
        ("pos", ["--char-filters", 0]),
        ("pos", ["--min-count", 0]),
        ("pos", ["--patience", 0]),
        ("pos", ["--threads", 0]),
        ("pos", ["--seed", -1]),
        ("polarity", ["--hidden", -3]),
        ("polarity", ["--layers", 0]),
        ("polarity", ["--emb-dim", 0]),
        ("polarity", ["--nb-dims", -1]),
        ("polarity", ["--dropout", 1.5]),
        ("polarity", ["--patience", 0]),
        ("polarity", ["--seed", 2**32]),
    ],
)
def test_out_of_range_numbers_are_usage_errors(cli, no_training, tmp_path, task, args):
    res = cli("train", task, "--data", tmp_path, "--out", tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert args[0] in flat(res.output) and "Traceback" not in res.output


def test_nb_dims_over_emb_dim_is_refused_with_the_limit(cli, no_training, tmp_path):
    res = cli("train", "polarity", "--data", tmp_path, "--out", tmp_path / "o", "--nb-dims", 200)
    assert res.exit_code == 2, res.output
    assert "--nb-dims" in flat(res.output) and "over the limit, --emb-dim (100)" in flat(res.output)


def test_train_polarity_does_not_clamp_nb_dims():
    from training.lstm.polarity import PolarityConfig, train_polarity

    with pytest.raises(ValueError, match="nb_dims 20"):
        train_polarity(tiny_polarity_corpus(n=20), PolarityConfig(emb_dim=8, nb_dims=20))


# ------------------------------------------------------------------------------ parity gate
def test_check_parity():
    from training.lstm.export import PARITY_TOLERANCE, ParityError, check_parity

    assert check_parity(PARITY_TOLERANCE) == PARITY_TOLERANCE
    assert check_parity(0.0) == 0.0
    for bad in (PARITY_TOLERANCE * 1.01, 0.5, math.nan, math.inf):
        with pytest.raises(ParityError, match="tolerance"):
            check_parity(bad)


def test_polarity_export_that_differs_is_not_published(cli, tmp_path, monkeypatch):
    """The reviewer's probe (+0.5 on the measured difference): one line, exit 1, nothing
    written (no version folder, no staging folder)."""
    import training.lstm.polarity as pol

    real = pol.max_abs_diff
    monkeypatch.setattr(pol, "max_abs_diff", lambda *a, **k: real(*a, **k) + 0.5)
    data = write_polarity_root(tmp_path / "data")
    out = tmp_path / "out"
    res = cli("train", "polarity", "--data", data, "--out", out, "--epochs", 1, *TINY_POLARITY,
              "--no-progress", "--work-dir", tmp_path / "work")  # fmt: skip
    assert res.exit_code == 1, res.output
    assert res.stdout == ""
    assert res.stderr.startswith("nlpserve: polarity-en: ONNX Runtime and PyTorch outputs differ")
    assert "0.5 > tolerance 0.001" in res.stderr
    assert not out.exists() or list(out.rglob("*")) == []


def test_pos_export_with_nan_difference_is_not_published(tmp_path, monkeypatch):
    import training.lstm.pos as pos
    from training.lstm.export import ParityError

    monkeypatch.setattr(pos, "max_abs_diff", lambda *a, **k: math.nan)
    cfg = pos.PosConfig(epochs=1, hidden=8, word_dim=8, char_dim=4, char_filters=8,
                        max_length=32, progress=False)  # fmt: skip
    torch.set_num_threads(1)
    with pytest.raises(ParityError, match="nan > tolerance"):
        pos.run_pos(tiny_pos_corpus(n=60), tmp_path, cfg, command="test")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- stdout: the JSON report and only it
def test_fit_progress_lines_go_to_stderr(capsys):
    from training.lstm.loop import fit

    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    fit(
        model,
        train_step=lambda batch: model(x[batch]).pow(2).mean(),
        make_batches=lambda _e: [[0, 1, 2, 3], [4, 5, 6, 7]],
        evaluate=lambda: 0.5,
        epochs=2,
        patience=5,
        lr=1e-2,
        progress=True,
        desc="toy",
    )
    out, err = capsys.readouterr()
    assert out == ""
    assert "toy epoch 1: loss" in err


def test_train_pos_conllu_under_the_data_root_with_progress(cli, tmp_path):
    """``--format conllu --data <root>`` reads ``<root>/ud_english_ewt/*.conllu`` (README's
    layout); with progress on, stdout is still exactly the JSON report; the recorded data
    paths are relative to the root, and ``evaluate`` re-creates the same test split."""
    from service.repository import load_manifest

    data = write_conllu_root(tmp_path / "data")
    out = tmp_path / "out"
    res = cli("train", "pos", "--format", "conllu", "--tag-field", "xpos", "--data", data,
              "--out", out, "--epochs", 1, *TINY_POS, "--progress",
              "--work-dir", tmp_path / "work")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["path"] == str(out / "pos-en" / "1")
    assert "pos epoch 1: loss" in res.stderr
    m = load_manifest(out / "pos-en" / "1")
    assert [d.path for d in m.data] == ["ud_english_ewt/tiny.conllu"]
    assert m.hyperparameters["dataset"] == "conllu" and "NN" in m.labels
    assert m.metrics["onnx_max_abs_diff"] < 1e-4

    res = cli("evaluate", out / "pos-en" / "1", "--data", data)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(report["metrics"]["accuracy"])


def test_conllu_data_root_without_the_folder_says_where_it_looked(tmp_path):
    from training.data.common import DataError
    from training.lstm.pos import load_pos_corpus

    with pytest.raises(DataError, match="ud_english_ewt"):
        load_pos_corpus(tmp_path, "conllu")


def test_move_into_place_replaces_a_version_without_a_gap(tmp_path):
    """--overwrite: the transformer publish deleted the old version before renaming the new
    one in (an interrupt between the two lost both); now both trainers rename it aside."""
    from training.repository import move_into_place

    final, staging = tmp_path / "m" / "1", tmp_path / ".m-1.staging"
    final.mkdir(parents=True)
    (final / "old.onnx").write_text("old")
    staging.mkdir()
    (staging / "new.onnx").write_text("new")
    assert move_into_place(staging, final) == final
    assert [p.name for p in final.iterdir()] == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left aside
