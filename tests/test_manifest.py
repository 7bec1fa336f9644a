"""Repository entries written by training: the manifest contract, the tiny builders, and the
``nlpserve train`` / ``nlpserve evaluate`` commands end to end on fixture data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.train
pytest.importorskip("torch")

from service.preprocess.words import WordEncoder  # noqa: E402
from service.repository import discover_models, load_manifest  # noqa: E402
from tests.builders import (  # noqa: E402
    build_tiny_polarity,
    build_tiny_pos,
    tiny_polarity_corpus,
    tiny_pos_corpus,
)
from training.lstm.export import ort_session, pad_batch  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_pos(root)
    build_tiny_polarity(root)
    return root


def test_builders_write_valid_entries(repo):
    entries = {e.name: e for e in discover_models(repo)}
    assert set(entries) == {"pos-en", "polarity-en"}
    assert entries["pos-en"].path == repo / "pos-en" / "1"
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left over
    for e in entries.values():
        m = e.manifest
        assert m.version == "1"
        assert m.buckets[-1] == m.max_length
        v = m.variants["fp32"]
        assert v.file == "model.onnx" and v.precision == "fp32"
        assert v.sha256 == hashlib.sha256((e.path / v.file).read_bytes()).hexdigest()
        assert {"torch", "onnxruntime", "tokenizers", "python"} <= set(m.framework_versions)
        assert m.split is not None and sum(m.split.sizes.values()) > 0
        assert m.metrics["accuracy"] >= 0.9
        assert m.metrics["onnx_max_abs_diff"] <= 1e-4
        assert m.command.startswith("tests.builders.")
        assert m.preprocessing.kind == "words" and m.preprocessing.lowercase


def test_pos_manifest_contract(repo):
    m = load_manifest(repo / "pos-en" / "1")
    assert m.task == "pos"
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [
        ("word_ids", "int64", ["batch", "sequence"]),
        ("char_ids", "int64", ["batch", "sequence", "word"]),
        ("lengths", "int64", ["batch"]),
    ]
    assert [(t.name, t.dtype) for t in m.outputs] == [("logits", "float32")]
    assert m.preprocessing.chars_file == "chars.json"
    assert m.preprocessing.max_word_length == 16
    assert m.variants["fp32"].measured_with == "CPUExecutionProvider"
    assert "NN" in m.labels and m.labels == sorted(m.labels)


def test_polarity_manifest_contract(repo):
    m = load_manifest(repo / "polarity-en" / "1")
    assert m.task == "polarity"
    assert m.input_names() == ["word_ids", "lengths"]
    assert m.outputs[0].shape == ["batch", 2]
    assert m.labels == ["negative", "positive"]
    assert m.preprocessing.chars_file is None and m.preprocessing.max_word_length is None


def test_entries_serve_through_word_encoder(repo):
    """What the service will do: WordEncoder from the manifest -> padded batch -> ORT."""
    folder = repo / "pos-en" / "1"
    m = load_manifest(folder)
    enc = WordEncoder.load(
        folder / m.preprocessing.tokenizer_file,
        folder / m.preprocessing.chars_file,
        m.preprocessing.max_word_length,
    )
    sess = ort_session(folder / "model.onnx")
    encs = enc.encode_texts(["The big dog sees a cat.", "He owns cars."])
    logits = sess.run(None, pad_batch(encs, with_chars=True))[0]
    tags = [m.labels[i] for i in logits[0, : len(encs[0])].argmax(-1)]
    assert tags == ["DT", "JJ", "NN", "VBZ", "DT", "NN", "."]

    folder = repo / "polarity-en" / "1"
    m = load_manifest(folder)
    enc = WordEncoder.load(folder / m.preprocessing.tokenizer_file)
    sess = ort_session(folder / "model.onnx")
    encs = enc.encode_texts(["a truly wonderful film", "boring and tedious plot"])
    probs = sess.run(None, pad_batch(encs, with_chars=False))[0]
    assert [m.labels[i] for i in np.argmax(probs, -1)] == ["positive", "negative"]


def test_existing_version_is_not_overwritten(repo):
    training_log = logging.getLogger("training")
    training_log.setLevel(logging.DEBUG)  # tests/conftest.py sets it back after the test
    with pytest.raises(FileExistsError, match="already exists"):
        build_tiny_polarity(repo)
    # the builder quiets training's logs while it runs, and gives the level back (failing
    # too): a later test of those log lines must not depend on whether a builder ran first
    assert training_log.level == logging.DEBUG


# ----------------------------------------------------------------------- CLI end to end
def _write_fixture_treebank(root: Path) -> None:
    corpus = tiny_pos_corpus(n=120, seed=1)
    trees = []
    for words, tags in zip(corpus.sentences, corpus.tags, strict=True):
        leaves = " ".join(f"({t} {w})" for w, t in zip(words, tags, strict=True))
        trees.append(f"( (S {leaves} (-NONE- *T*-1) ) )")
    path = root / "nltk_data" / "corpora" / "treebank.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("treebank/combined/wsj_0001.mrg", "\n".join(trees[:60]))
        zf.writestr("treebank/combined/wsj_0002.mrg", "\n".join(trees[60:]))


def _write_fixture_polarity(root: Path) -> None:
    corpus = tiny_polarity_corpus(n=200, seed=1)
    folder = root / "nltk_data" / "corpora" / "sentence_polarity"
    folder.mkdir(parents=True)
    for label, name in ((0, "neg"), (1, "pos")):
        lines = [t for t, y in zip(corpus.texts, corpus.labels, strict=True) if y == label]
        (folder / f"rt-polarity.{name}").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("task", ["pos", "polarity"])
def test_train_and_evaluate_commands(cli, tmp_path, task):
    data = tmp_path / "data"
    (_write_fixture_treebank if task == "pos" else _write_fixture_polarity)(data)
    out = tmp_path / "models"
    size = ["--hidden", 16] + (["--word-dim", 16, "--char-filters", 16] if task == "pos" else [])
    size += ["--emb-dim", 16] if task == "polarity" else []
    args = ["train", task, "--data", data, "--out", out, "--epochs", 3, "--lr", 0.01,
            "--work-dir", tmp_path / "work"]  # fmt: skip
    res = cli(*args, *size, "--threads", 1, "--no-progress")
    assert res.exit_code == 0, res.output
    name = "pos-en" if task == "pos" else "polarity-en"
    m = load_manifest(out / name / "1")
    assert m.command  # the exact argv of the run
    files = [d.path for d in m.data]
    expected = (
        "nltk_data/corpora/treebank.zip"
        if task == "pos"
        else "nltk_data/corpora/sentence_polarity/rt-polarity.neg"
    )
    assert expected in files
    assert "-NONE-" not in m.labels
    # what both LSTM entries record: the config (not how the run looked), the run's outcome
    hp = m.hyperparameters
    assert "progress" not in hp and hp["epochs"] == 3 and hp["lr"] == 0.01
    assert hp["vocab_size"] > 2 and 1 <= hp["best_epoch"] <= hp["epochs_run"] <= 3
    assert m.split is not None
    assert m.split.unit == "sentence" and m.split.sizes["train"] > m.split.sizes["dev"] > 0
    if task == "pos":
        assert hp["n_chars"] > 2 and hp["drop_traces"] is True

    res = cli("evaluate", out / name / "1", "--data", data)
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["accuracy"] == pytest.approx(m.metrics["accuracy"], abs=1e-9)
    assert metrics["measured_with"] == "CPUExecutionProvider"
    if task == "polarity":
        _evaluate_and_record_a_variant(cli, out / name / "1", data)

    # a second run without --version gets the next integer
    res = cli(*args, "--epochs", 1, *size, "--threads", 1, "--no-progress")
    assert res.exit_code == 0, res.output
    assert (out / name / "2" / "manifest.json").is_file()

    # an existing version is refused, unless --overwrite
    again = [*args, "--epochs", 1, *size, "--threads", 1, "--no-progress", "--version", 1]
    res = cli(*again)
    assert res.exit_code != 0 and "alreadyexists" in _squash(res.output)
    res = cli(*again, "--overwrite")
    assert res.exit_code == 0, res.output
    assert load_manifest(out / name / "1").hyperparameters["epochs"] == 1  # replaced
    assert sorted(p.name for p in (out / name).iterdir()) == ["1", "2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _evaluate_and_record_a_variant(cli, folder: Path, data: Path) -> None:
    """``evaluate --variant X --record``: a real int8 quantization of the exported model is
    scored on the test split, and its entry gets the figures, the drop from fp32 and the
    provider that ran it; unknown variants and absent providers are clear errors."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from service.repository.manifest import Variant, write_manifest

    m = load_manifest(folder)
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model.int8.onnx"),
                     weight_type=QuantType.QInt8)  # fmt: skip
    variants = {**m.variants, "int8": Variant(file="model.int8.onnx", precision="int8")}
    write_manifest(folder, m.model_copy(update={"variants": variants}))

    res = cli("evaluate", folder, "--data", data, "--variant", "int8", "--record")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    entry = load_manifest(folder).variants["int8"]
    assert entry.measured_with == "CPUExecutionProvider" and out["variant"] == "int8"
    assert entry.metrics["accuracy"] == pytest.approx(out["accuracy"])
    assert entry.metrics["accuracy_drop"] == pytest.approx(m.metrics["accuracy"] - out["accuracy"])
    assert load_manifest(folder).variants["fp32"] == m.variants["fp32"]  # untouched
    # Re-recording fp32 keeps the figures evaluation does not measure (it deleted them).
    res = cli("evaluate", folder, "--data", data, "--variant", "fp32", "--record")
    assert res.exit_code == 0, res.output
    after = load_manifest(folder).variants["fp32"].metrics
    assert set(after) == set(m.variants["fp32"].metrics)
    assert after["dev_accuracy"] == m.variants["fp32"].metrics["dev_accuracy"]

    res = cli("evaluate", folder, "--data", data, "--variant", "fp16")
    assert res.exit_code != 0 and "novariant'fp16'(ithas:fp32,int8)" in _squash(res.output)
    res = cli("evaluate", folder, "--data", data, "--providers", "NoSuchExecutionProvider")
    assert res.exit_code != 0 and "lacksNoSuchExecutionProvider" in _squash(res.output)


def _squash(text: str) -> str:
    """The error text without whitespace and the box drawing rich wraps it in."""
    return re.sub(r"[\s\u2500-\u257f]+", "", text)


def test_missing_data_is_a_clear_error(cli, tmp_path):
    res = cli("train", "pos", "--data", tmp_path / "nowhere", "--out", tmp_path)
    assert res.exit_code != 0
    assert "nowhere" in _squash(res.output) and "doesnotexist" in _squash(res.output)
    res = cli("train", "polarity", "--data", tmp_path, "--out", tmp_path / "m")
    assert res.exit_code != 0
    assert "nosentencepolaritydata" in _squash(res.output)


# ----------------------------------------------------------------------- committed artifacts
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "target"), [("pos-en", 0.95), ("polarity-en", 0.77)])
def test_committed_artifact_meets_target_and_reevaluates(name, target):
    from tests.test_data_loaders import REAL
    from training.lstm.commands import evaluate_polarity, evaluate_pos

    folder = ROOT / "models" / name / "1"
    if not (folder / "manifest.json").is_file():
        pytest.skip(f"{folder} not present")
    m = load_manifest(folder)
    assert m.metrics["accuracy"] >= target
    assert m.metrics["onnx_max_abs_diff"] <= 1e-4
    if REAL is None:
        pytest.skip("shared data not available")
    evaluate = evaluate_pos if m.task == "pos" else evaluate_polarity
    got = evaluate(folder, REAL, None, None)  # the fp32 file, on the CPU
    assert got["accuracy"] == pytest.approx(m.metrics["accuracy"], abs=1e-9)


def _committed_model(name: str, task_cls):
    """``request -> response`` through the service's own task code and runner, on the
    committed ``models/<name>`` (skips where it is absent)."""
    from service.repository import discover_models
    from service.runtime.runner import ModelRunner
    from service.runtime.session import create_session
    from tests.service_support import make_settings

    entries = [e for e in discover_models(ROOT / "models") if e.manifest.name == name]
    if not entries:
        pytest.skip(f"models/{name} not present")
    settings = make_settings(ROOT / "models")
    task = task_cls(entries[0], settings)
    runner = ModelRunner(entries[0], create_session(entries[0].path, entries[0].manifest,
                                                    settings), settings)  # fmt: skip

    def respond(request):
        (prepared,) = task.encode([request], deadline=0.0, lane="test")
        return task.decode(prepared, runner.run_batch(prepared.items))

    return respond


def _demo_value(pattern: str) -> str:
    import html
    import re

    page = (ROOT / "service" / "static" / "index.html").read_text("utf-8")
    found = re.search(pattern, page, re.S)
    assert found is not None, pattern
    return html.unescape(found.group(1))


def test_committed_detector_labels_the_docs_examples_as_the_docs_say():
    """The examples users meet first (`/docs`: ChatGPT-like, then human; the demo page's
    default text, ChatGPT-like) get those labels from the committed `detector-en`, through
    the service's own task code."""
    from service.api.schemas import DETECT_EXAMPLES, DetectRequest
    from service.tasks.detect import DetectTask

    detect = _committed_model("detector-en", DetectTask)
    demo = _demo_value(r'<textarea id="detect-text"[^>]*>(.*?)</textarea>')
    labels = [detect(DetectRequest(text=t)).label for t in [*DETECT_EXAMPLES, demo]]
    assert labels == ["machine", "human", "machine"]


def test_committed_qa_answers_the_docs_examples():
    """The QA examples users meet first (`/docs`' request schema, the README's curl, the demo
    page's passage and question) get the span a reader expects from the committed `qa-zh`."""
    from service.api.schemas import QARequest
    from service.tasks.qa import QATask

    qa = _committed_model("qa-zh", QATask)
    question, context = (QARequest.model_fields[f].examples for f in ("question", "context"))
    assert question and context
    schema = QARequest(question=question[0], context=context[0])
    readme = (ROOT / "README.md").read_text("utf-8")
    curl = re.search(r"curl -s localhost:8000/v1/qa -d '(\{.*?\})'", readme)
    assert curl is not None
    demo = QARequest(
        question=_demo_value(r'<input id="qa-question"[^>]*value="([^"]*)"'),
        context=_demo_value(r'<textarea id="qa-context"[^>]*>(.*?)</textarea>'),
    )
    answers = [qa(r) for r in (schema, QARequest(**json.loads(curl.group(1))), demo)]
    assert "两万千米" in answers[0].answer and "两万千米" in answers[1].answer
    assert answers[2].answer == "8851.8千米"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=os.environ | (env or {}), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_damaged_model_file_is_refused_by_its_checksum(model_repo, tmp_path):
    """The manifest's sha256 is checked: `nlpserve models`, `serve` and a session load all
    refuse a damaged ONNX file, the CLI in one line (exit 2), not a traceback."""
    import shutil

    from service.config import Settings
    from service.repository import ManifestError, load_manifest
    from service.runtime.session import create_session

    src = model_repo / "polarity-en" / "1"
    repo = tmp_path / "repo"
    shutil.copytree(src, repo / "polarity-en" / "1")
    manifest = load_manifest(repo / "polarity-en" / "1")
    variant = manifest.variants["fp32"]
    assert variant.sha256  # the exporter records it
    assert _cli("models", "--models", str(repo)).returncode == 0
    with open(repo / "polarity-en" / "1" / variant.file, "ab") as f:
        f.write(b"\0")
    out = _cli("models", "--models", str(repo))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "invalid model repository" in out.stderr and "sha256" in out.stderr
    out = _cli("serve", "--models", str(repo), "--port", "0")
    assert out.returncode == 2 and "sha256" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ManifestError, match="sha256"):
        create_session(repo / "polarity-en" / "1", manifest, Settings(model_dir=repo))


def test_a_qa_tokenizer_whose_pair_template_the_windows_cannot_follow_is_refused_in_one_line(
    model_repo, tmp_path
):
    """A QA model whose tokenizer.json puts the context before the question: `serve` stops
    in one line (exit 2) naming the file, not a traceback out of the app's startup."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "qa-zh" / "1", repo / "qa-zh" / "1")
    path = repo / "qa-zh" / "1" / "tokenizer.json"
    spec = json.loads(path.read_text())
    pair = spec["post_processor"]["pair"]
    assert [next(iter(p)) for p in pair] == ["SpecialToken", "Sequence", "SpecialToken",
                                             "Sequence", "SpecialToken"]  # fmt: skip
    pair[1], pair[3] = pair[3], pair[1]  # [CLS] $B [SEP] $A [SEP]
    path.write_text(json.dumps(spec))
    out = _cli("serve", "--models", str(repo), "--port", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("nlpserve: invalid model repository: "), last
    assert f"{path}: cannot build QA windows: tokenizer pair template" in last, last


def test_in_redis_mode_the_worker_checks_model_files_the_api_never_opens_them(model_repo, tmp_path):
    """The worker, which loads the sessions, refuses a damaged ONNX file; a Redis-mode API
    runs no model, so it starts without hashing files it never reads (every variant of every
    model: seconds for large models, on each replica's start)."""
    import shutil
    import signal

    import httpx

    from service.repository import load_manifest
    from tests.redis_support import free_port

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "polarity-en" / "1", repo / "polarity-en" / "1")
    variant = load_manifest(repo / "polarity-en" / "1").variants["fp32"]
    with open(repo / "polarity-en" / "1" / variant.file, "ab") as f:
        f.write(b"\0")
    redis_env = {
        "NLPSERVE_QUEUE": "redis",
        "NLPSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    out = _cli("worker", "--models", str(repo), "--metrics-port", "0", env=redis_env)
    assert out.returncode == 2 and "sha256" in out.stderr and "Traceback" not in out.stderr
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(repo), "--port", str(port)],
        env=os.environ | redis_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(300):  # up (not ready: no Redis there), or exited
            if api.poll() is not None:
                break
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert api.poll() is None, api.communicate()[0]
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            api.communicate(timeout=30)
        finally:
            if api.poll() is None:
                api.kill()
                api.wait()


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("variant", "../../other/model.onnx"),
        ("variant", "/work/models/x/1/model.onnx"),
        ("tokenizer", "../polarity-en/1/tokenizer.json"),
        ("chars", "sub/chars.json"),
    ],
)
def test_a_manifest_names_only_files_in_its_own_folder(model_repo, tmp_path, where, bad):
    """A manifest could point the server at any file it could read (``../../x.onnx``);
    with no sha256 recorded nothing caught it."""
    import json
    import shutil

    from service.repository import ManifestError, load_manifest

    folder = tmp_path / "pos-en" / "1"
    shutil.copytree(model_repo / "pos-en" / "1", folder)
    raw = json.loads((folder / "manifest.json").read_text())
    if where == "variant":
        raw["variants"]["fp32"]["file"] = bad
        raw["variants"]["fp32"]["sha256"] = None
    else:
        raw["preprocessing"][f"{where}_file"] = bad
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="name a file in the version folder"):
        load_manifest(folder)


def test_cli_on_a_missing_or_empty_repository_says_so_in_one_line(tmp_path):
    out = _cli("models", "--models", str(tmp_path / "nope"))
    assert out.returncode == 2 and "folder not found" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli("models", "--models", str(tmp_path))
    assert out.returncode == 2 and "no models in" in out.stderr
    out = _cli("serve", "--port", "99999")
    assert out.returncode == 2 and "NLPSERVE_PORT" in out.stderr


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "x y"])
def test_model_names_and_versions_are_one_plain_folder(bad):
    """`--name ../../x` wrote a model outside the repository."""
    from service.repository.manifest import check_path_component
    from training.repository import version_folder

    with pytest.raises(ValueError, match="one folder name"):
        check_path_component("name", bad)
    with pytest.raises(ValueError):
        version_folder(Path("models"), bad, "1")
    with pytest.raises(ValueError):
        version_folder(Path("models"), "detector-en", bad)
    assert version_folder(Path("models"), "qa-zh", "2.1") == Path("models/qa-zh/2.1")


def test_training_cli_reports_missing_data_in_one_line(model_repo, tmp_path):
    """A data error deep in a command (here: `evaluate` finds no treebank) is one line."""
    out = _cli("evaluate", str(model_repo / "pos-en" / "1"), "--data", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("nlpserve: DataError: ") and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["train", "detector", "--base-model"],
        ["train", "qa", "--base-model"],
        ["pretrain", "--init-from"],
    ],
)
def test_an_unusable_base_model_is_one_line_naming_what_is_missing(cli, tmp_path, command):
    """A missing folder, a folder that is no checkpoint, and a hub id the offline cache lacks
    each get a one-line reason before any data is read (was: a transformers traceback).
    The real process for the hub id (HF_HUB_OFFLINE is read at import; the one line and exit
    status 2 are main()'s for any BaseModelError); the folders in-process, each process
    start costing seconds of torch and transformers imports."""
    from training.transformer.common import BaseModelError

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    folders = {tmp_path / "nope": "no such folder", empty: "no tokenizer.json or vocab.txt"}
    for folder, reason in folders.items():
        res = cli(*command, folder, "--data", tmp_path, "--out", tmp_path / "m")
        assert isinstance(res.exception, BaseModelError), res.output
        said = str(res.exception)
        assert said.startswith(f"base model {folder}: ") and reason in said, said
    base = "nlpserve-test/not-cached"
    out = _cli(*command, base, "--data", str(tmp_path), "--out", str(tmp_path / "m"),
               env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"nlpserve: BaseModelError: base model {base}: "), out.stderr
    assert "not in the local Hugging Face cache" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train", "polarity", "--epochs", "0"],  # published an untrained model
        ["train", "pos", "--batch-size", "0"],
        ["train", "polarity", "--lr", "-1"],
        ["train", "detector", "--max-length", "0"],
        ["train", "detector", "--max-train-examples", "0"],  # silently meant "all"
        ["train", "detector", "--warmup-ratio", "5"],
        ["train", "qa", "--holdout-ratio", "1.5"],
        ["train", "qa", "--negative-ratio", "-1"],
        ["pretrain", "--mlm-probability", "0"],
        ["train", "qa", "--doc-stride", "-1"],
        ["train", "qa", "--max-eval-examples", "0"],
        ["pretrain", "--max-steps", "-5"],
    ],
)
def test_training_options_out_of_range_are_refused_before_any_work(cli, tmp_path, args):
    res = cli(*args, "--data", tmp_path, "--out", tmp_path / "m")
    assert res.exit_code == 2 and "Invalid value for" in res.output, res.output


def test_a_given_doc_stride_keeps_the_default_question_length_where_both_fit():
    """`train qa --max-length 128 --doc-stride 32` ran with --max-query-length 64 before the
    defaults were fitted to the window: it still does (not a third of the window, 41), and so
    does a window where 64 fits beside the default stride."""
    from training.transformer.commands import qa_windows

    assert qa_windows(128, 32, None) == (32, 64)
    assert qa_windows(128, 60, None) == (60, 64)  # 128 - 64 - 3 - 1: the largest beside 64
    assert qa_windows(128, 61, None) == (61, 41)  # 64 leaves no room for it: fitted
    assert qa_windows(196, None, None) == (128, 64)
    assert qa_windows(195, None, None) == (64, 64)  # 128 does not fit beside 64 here
    assert qa_windows(72, 2, None) == (2, 64)  # 64 + 3 specials + 5 passage tokens


def test_qa_windows_not_given_fit_max_length_and_given_ones_are_refused_in_one_line():
    """--doc-stride / --max-query-length not given: 128 / 64 where they fit, else fitted to
    the window (was: typer's usage box for the defaults with --max-length 128); given ones
    that do not fit: one line naming the largest that would."""
    from training.transformer.commands import qa_windows

    assert qa_windows(384, None, None) == (128, 64)
    assert qa_windows(256, None, None) == (128, 64)  # the defaults, where they fit
    assert qa_windows(512, None, None, specials=4) == (128, 64)
    assert qa_windows(128, None, None) == (42, 41)  # a third of 125 tokens, half of the rest
    assert qa_windows(128, None, 16) == (54, 16)
    assert qa_windows(128, 100, 16) == (100, 16)
    for window in range(9 + 3, 600):
        stride, query = qa_windows(window, None, None)
        assert 1 <= query <= window - 3 - 5 and 0 <= stride < window - query - 3, window
    res = _cli("train", "qa", "--max-length", "64", "--doc-stride", "400")
    assert res.returncode == 2 and res.stderr.strip() == (
        "nlpserve: WindowError: --doc-stride 400 must be below the context part of a window "
        "(--max-length 64 minus --max-query-length 20 minus 3 special tokens = 41): at most 40"
    ), res.stderr
    res = _cli("train", "qa", "--max-length", "64", "--max-query-length", "64")
    assert res.returncode == 2 and res.stderr.strip().endswith(": at most 56"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _cli("train", "qa", "--max-length", "64")  # the windows fit: on to the next check
    assert "--max-query-length 20 and --doc-stride 20" in res.stderr, res.stderr
    assert "--base-model is required" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_onnx_file_onnxruntime_cannot_open_stops_the_command_in_one_line(
    model_repo, tmp_path, command
):
    """Bytes that are no ONNX model (no sha256 recorded to catch them first) failed `serve`'s
    lifespan with a traceback and uvicorn's exit status 3, and `worker` with a traceback."""
    import json
    import shutil

    from tests.redis_support import free_port

    folder = tmp_path / "repo" / "polarity-en" / "1"
    shutil.copytree(model_repo / "polarity-en" / "1", folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["variants"]["fp32"]["sha256"] = None
    (folder / "manifest.json").write_text(json.dumps(raw))
    (folder / raw["variants"]["fp32"]["file"]).write_bytes(b"not an onnx model\n" * 8)
    env = {"NLPSERVE_PORT": "0", "NLPSERVE_METRICS_PORT": "0"}
    if command == "worker":  # loads its models before it connects
        env |= {"NLPSERVE_QUEUE": "redis", "NLPSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}"}
    out = _cli(command, "--models", str(tmp_path / "repo"), env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("nlpserve: cannot load model: polarity-en/1: cannot open "), last
    assert f"{folder / raw['variants']['fp32']['file']}: " in last and "INVALID_PROTOBUF" in last
