"""``nlpserve import detector|qa``: tiny fine-tuned checkpoints (saved with save_pretrained,
as a user's would be) put into a repository as they are, served over real HTTP and compared
with PyTorch on the checkpoint itself; the refusals through the real CLI; ``--data`` on the
shared files and ``nlpserve evaluate`` agreeing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.builders_bert import _tokenizer, detector_examples, qa_examples
from tests.data_support import REPO, shared_data

pytestmark = pytest.mark.train

LONG = "additionally it is important to note that overall " * 20  # past max_length
TEXTS = ["i think my dog ate it lol", "furthermore in conclusion various aspects", LONG]
QA_CONTEXT = "中国的首都是北京，它有三千多年的历史。" * 5  # several 64-token windows
QA_WINDOWS = ["--max-length", "64", "--doc-stride", "16", "--max-query-length", "16"]


def _config(vocab_size: int, distil: bool = False, **kw):
    from transformers import BertConfig, DistilBertConfig

    if distil:
        return DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2,
                                hidden_dim=64, max_position_embeddings=128, **kw)  # fmt: skip
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      **kw)  # fmt: skip


def _save(folder: Path, model_cls, config, seed: int = 0) -> Path:
    """A randomly initialised ``model_cls`` saved as a fine-tuned checkpoint would be: its
    head's weights are in the file, so it loads without new weights."""
    import torch

    from training.transformer.pretrain import save_hf_tokenizer

    torch.manual_seed(seed)
    model_cls(config).save_pretrained(str(folder))
    save_hf_tokenizer(_tokenizer(_texts()), folder)
    return folder


def _texts() -> list[str]:
    return [e.text for e in detector_examples()] + [e.context + e.question for e in qa_examples()]


def _vocab() -> int:
    return _tokenizer(_texts()).get_vocab_size()


def _named(**kw) -> dict:
    return {"id2label": {0: "Human", 1: "MACHINE"}, "label2id": {"Human": 0, "MACHINE": 1}, **kw}


def _nlpserve(*args: str | Path, env: dict[str, str] | None = None):
    """The real command line, in a process of its own."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    argv = [sys.executable, "-m", "service.cli", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import (
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertModel,
        DistilBertForQuestionAnswering,
        DistilBertForSequenceClassification,
    )

    root, v = tmp_path_factory.mktemp("checkpoints"), _vocab()
    return {
        "det": _save(root / "det", BertForSequenceClassification, _config(v, **_named())),
        # transformers' default names: LABEL_0, LABEL_1
        "unnamed": _save(root / "unnamed", BertForSequenceClassification, _config(v), seed=1),
        "qa": _save(root / "qa", BertForQuestionAnswering, _config(v)),
        "distil-det": _save(
            root / "distil-det",
            DistilBertForSequenceClassification,
            _config(v, distil=True, **_named()),
        ),
        "distil-qa": _save(
            root / "distil-qa", DistilBertForQuestionAnswering, _config(v, distil=True)
        ),
        "encoder": _save(root / "encoder", BertModel, _config(v)),
        "three": _save(root / "three", BertForSequenceClassification, _config(v, num_labels=3)),
        # roberta-base-openai-detector's names: "fake" means other things to other classifiers
        "fake-real": _save(
            root / "fake-real",
            BertForSequenceClassification,
            _config(v, id2label={0: "Fake", 1: "Real"}),
            seed=2,
        ),  # fmt: skip
        "ai-human": _save(
            root / "ai-human",
            BertForSequenceClassification,
            _config(v, id2label={0: "AI", 1: "human-written"}),
            seed=3,
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def repo(cli, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "models"
    common = ["--out", out, "--no-progress", "--threads", "1"]
    runs = [
        ["detector", "--from", checkpoints["det"], "--max-length", "32", *common],
        ["detector", "--from", checkpoints["unnamed"], "--labels", "machine,human",
         "--name", "detector-rev", "--max-length", "32", "--variants", "fp32", *common],
        ["qa", "--from", checkpoints["qa"], *QA_WINDOWS, "--variants", "fp32,int8", *common],
        ["detector", "--from", checkpoints["distil-det"], "--name", "detector-distil",
         "--max-length", "32", "--variants", "fp32", *common],
        ["qa", "--from", checkpoints["distil-qa"], "--name", "qa-distil", *QA_WINDOWS,
         "--variants", "fp32", *common],
        # id2label AI, human-written: read as machine, human
        ["detector", "--from", checkpoints["ai-human"], "--name", "detector-ai",
         "--max-length", "32", "--variants", "fp32", *common],
    ]  # fmt: skip
    for args in runs:
        res = cli("import", *args)
        assert res.exit_code == 0, (args, res.output, res.exception)
    return out


def _torch_machine_probability(folder: Path, texts: list[str], max_length: int, machine: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    return torch.softmax(logits, -1)[:, machine].numpy()


async def test_imported_detectors_serve_the_checkpoints_probabilities(
    repo: Path, checkpoints: dict[str, Path]
):
    """machine_probability over HTTP is torch's softmax on the checkpoint, for a text past
    max_length too; labels from id2label (any case, or synonyms: AI, human-written), from
    --labels in reversed order, and DistilBERT (no token_type_ids)."""
    from service.repository import load_manifest
    from tests.service_support import live_server, make_settings

    cases = {"detector-en": ("det", 1), "detector-rev": ("unnamed", 0),
             "detector-distil": ("distil-det", 1), "detector-ai": ("ai-human", 0)}  # fmt: skip
    assert load_manifest(repo / "detector-rev" / "1").labels == ["machine", "human"]
    assert load_manifest(repo / "detector-distil" / "1").input_names() == [
        "input_ids", "attention_mask"
    ]  # fmt: skip
    async with live_server(make_settings(repo, variant="fp32")) as srv, srv.client() as c:
        for name, (ck, machine) in cases.items():
            m = load_manifest(repo / name / "1")
            assert m.labels[machine] == "machine" and m.max_length == 32
            want = _torch_machine_probability(checkpoints[ck], TEXTS, 32, machine)
            r = await c.post(f"/v1/detect?model={name}",
                             json={"inputs": [{"text": t} for t in TEXTS]})  # fmt: skip
            assert r.status_code == 200, r.text
            got = [o["machine_probability"] for o in r.json()["outputs"]]
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)
            assert r.json()["outputs"][2]["truncated"] is True
            labels = ["machine" if p > 0.5 else "human" for p in want]
            assert [o["label"] for o in r.json()["outputs"]] == labels
        # metrics without --data: the parity figure only; the listing shows it as it is
        r = await c.get("/v1/models")
        assert r.status_code == 200, r.text
        info = {m["name"]: m for m in r.json()["models"]}
        assert set(info["detector-en"]["metrics"]) == {"onnx_parity_max_abs_diff"}
        assert info["detector-en"]["variant_metrics"] == {}
        assert info["detector-en"]["architecture"] == "BertForSequenceClassification"


async def test_imported_qa_matches_torch_logits_and_answers(
    repo: Path, checkpoints: dict[str, Path]
):
    """start/end logits of the served ONNX file equal the checkpoint's on the service's own
    windows (DistilBERT's too), and /v1/qa answers a span of the context."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from service.preprocess.qa import QAEncoder
    from service.repository import load_manifest
    from tests.service_support import live_server, make_settings
    from training.transformer.export import onnx_feeds, ort_session

    for name, ck in (("qa-zh", "qa"), ("qa-distil", "distil-qa")):
        folder = repo / name / "1"
        m = load_manifest(folder)
        pre = m.preprocessing
        assert (m.max_length, pre.doc_stride, pre.max_query_length) == (64, 16, 16)
        enc = QAEncoder.load(folder / "tokenizer.json", 64, 16, 16)
        windows = enc.encode("中国的首都是哪里？", QA_CONTEXT)
        assert len(windows) > 1
        batch = enc.collate(windows)
        sess = ort_session(folder / m.variants["fp32"].file)
        got = sess.run(["start_logits", "end_logits"], onnx_feeds(sess, batch))
        model = AutoModelForQuestionAnswering.from_pretrained(str(checkpoints[ck])).eval()
        feeds = {k: torch.from_numpy(v) for k, v in onnx_feeds(sess, batch).items()}
        with torch.no_grad():
            out = model(**feeds)
        live = batch["attention_mask"] == 1
        for g, w in zip(got, (out.start_logits, out.end_logits), strict=True):
            np.testing.assert_allclose(g[live], w.numpy()[live], atol=1e-4)
    assert "token_type_ids" not in load_manifest(repo / "qa-distil" / "1").input_names()
    async with live_server(make_settings(repo)) as srv, srv.client() as c:
        for name in ("qa-zh", "qa-distil"):
            body = {"question": "中国的首都是哪里？", "context": QA_CONTEXT}
            r = await c.post(f"/v1/qa?model={name}", json=body)
            assert r.status_code == 200, r.text
            a = r.json()
            assert QA_CONTEXT[a["start"] : a["end"]] == a["answer"], a


def test_the_manifest_records_what_was_imported(cli, repo: Path, checkpoints: dict[str, Path]):
    from service.repository import load_manifest
    from training.repository import checkpoint_digest, portable_path

    res = cli("models", "--models", repo)
    assert res.exit_code == 0, res.output
    listed = {(e := json.loads(line))["name"]: e for line in res.stdout.splitlines()}
    assert set(listed["qa-zh"]["metrics"]) == {"onnx_parity_max_abs_diff"}
    # an imported entry says so, and that no held-out data scored it
    assert listed["qa-zh"]["imported_from"] == portable_path(str(checkpoints["qa"]))
    assert listed["qa-zh"]["scored_on_held_out_data"] is False

    m = load_manifest(repo / "detector-en" / "1")
    assert m.architecture == "BertForSequenceClassification"
    assert sorted(m.variants) == ["fp16", "fp32", "int8"]
    assert m.metrics["onnx_parity_max_abs_diff"] < 1e-3 and m.split is None and m.data == []
    assert m.buckets == [8, 16, 32]  # 1/8, 1/4, 1/2 of max_length, and max_length
    src = m.hyperparameters["imported_from"]
    assert src["loaded_from"] == "local folder"
    assert src["sha256"] == checkpoint_digest(checkpoints["det"])
    assert "model.safetensors" in src["sha256"]
    assert m.hyperparameters["id2label"] == {"0": "Human", "1": "MACHINE"}
    assert m.hyperparameters["labels_from"] == "id2label"
    assert load_manifest(repo / "detector-rev" / "1").hyperparameters["labels_from"] == "--labels"
    ai = load_manifest(repo / "detector-ai" / "1")
    assert ai.labels == ["machine", "human"]
    assert ai.hyperparameters["labels_from"] == "id2label synonyms"
    assert "no training" in m.description and "no --data" in m.description


def _one_line_refusal(res: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_refusals_are_one_line_and_exit_2(checkpoints: dict[str, Path], tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from service.repository import load_manifest

    out = tmp_path / "models"
    common: list[str | Path] = ["--out", out, "--no-progress"]
    refused = {
        ("detector", "encoder"): ("no trained classification head", "classifier.weight",
                                  f"nlpserve train detector --base-model {checkpoints['encoder']}"),
        ("qa", "det"): ("no trained question-answering head", "nlpserve train qa"),
        ("detector", "three"): ("head has 3 outputs", "LABEL_2", "nlpserve train detector"),
        ("detector", "unnamed"): ("{0: 'LABEL_0', 1: 'LABEL_1'}", "--labels machine,human"),
        ("detector", "fake-real"): (
            "its id2label {0: 'Fake', 1: 'Real'} does not say which output is human and which "
            "machine: pass --labels human,machine if output 0 ('Fake') means human-written, or "
            "--labels machine,human if it means machine-generated",),
    }  # fmt: skip
    contradicting = ["--labels", "machine,human"]  # the checkpoint's id2label: Human, MACHINE
    with ThreadPoolExecutor(len(refused) + 1) as pool:  # side by side: each starts torch
        runs = {key: pool.submit(_nlpserve, "import", key[0], "--from", checkpoints[key[1]],
                                 *(QA_WINDOWS if key[0] == "qa" else []), *common)
                for key in refused}  # fmt: skip
        contradiction = pool.submit(_nlpserve, "import", "detector", "--from", checkpoints["det"],
                                    *contradicting, *common)  # fmt: skip
        for key, fragments in refused.items():
            _one_line_refusal(runs[key].result(), *fragments)
        _one_line_refusal(contradiction.result(), "contradicts the checkpoint's id2label")
    assert not out.exists()  # nothing written, not even a staging folder
    res = _nlpserve("import", "detector", "--from", checkpoints["det"], "--labels", "human,machine",
                    "--max-length", "16", "--variants", "fp32", *common)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(out / "detector-en" / "1")
    # the command as given, paths relative to where it ran (the repository root here)
    ck, rel_out = os.path.relpath(checkpoints["det"], REPO), os.path.relpath(out, REPO)
    assert load_manifest(out / "detector-en" / "1").command == (
        f"nlpserve import detector --from {ck} --labels human,machine --max-length 16 "
        f"--variants fp32 --out {rel_out} --no-progress"
    )
    res = _nlpserve("import", "detector", "--from", checkpoints["det"], "--version", "1",
                    *common)  # fmt: skip
    _one_line_refusal(res, "FileExistsError", "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["detector-en"]


def test_qa_windows_default_to_what_fits_the_checkpoints_positions(
    cli, checkpoints: dict[str, Path], tmp_path: Path
):
    """A checkpoint with 128 positions: --doc-stride / --max-query-length not given are fitted
    to its window (was: typer's usage box refusing the defaults 128 / 64); given ones that do
    not fit are refused in one line naming the largest that would."""
    from service.repository import load_manifest

    out = tmp_path / "models"
    common: list[str | Path] = ["--out", out, "--no-progress", "--variants", "fp32"]
    res = cli("import", "qa", "--from", checkpoints["qa"], *common)
    assert res.exit_code == 0, (res.output, res.exception)
    m = load_manifest(out / "qa-zh" / "1")
    assert m.max_length == 128
    assert (m.preprocessing.doc_stride, m.preprocessing.max_query_length) == (42, 41)
    assert (m.hyperparameters["doc_stride"], m.hyperparameters["max_query_length"]) == (42, 41)
    res = _nlpserve("import", "qa", "--from", checkpoints["qa"], "--doc-stride", "128", *common)
    _one_line_refusal(res, "WindowError: --doc-stride 128 must be below the context part",
                      "--max-query-length 41", "at most 83")  # fmt: skip
    assert sorted(p.name for p in (out / "qa-zh").iterdir()) == ["1"]


def test_a_hub_id_loads_from_the_local_cache_and_records_its_revision(
    checkpoints: dict[str, Path], tmp_path: Path
):
    """A hub id is loaded as --base-model is: from the Hugging Face cache, offline; the
    manifest records the cached revision and its files' sha256."""
    from service.repository import load_manifest
    from training.repository import checkpoint_digest

    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-detector" / "snapshots" / revision
    shutil.copytree(checkpoints["det"], snapshot)
    (cache / "models--someone--tiny-detector" / "refs").mkdir()
    (cache / "models--someone--tiny-detector" / "refs" / "main").write_text(revision)
    out = tmp_path / "models"
    env = {"HF_HUB_CACHE": str(cache)}
    res = _nlpserve("import", "detector", "--from", "someone/tiny-detector", "--out", out,
                    "--variants", "fp32", "--no-progress", env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    src = load_manifest(out / "detector-en" / "1").hyperparameters["imported_from"]
    assert src == {"given": "someone/tiny-detector", "loaded_from": "Hugging Face cache",
                   "revision": revision, "sha256": checkpoint_digest(snapshot)}  # fmt: skip
    # not in the cache: the --base-model line, offline
    res = _nlpserve("import", "detector", "--from", "someone/elsewhere", "--out", out, env=env)
    _one_line_refusal(res, "checkpoint someone/elsewhere: it is not in the local Hugging Face")


def test_data_scores_the_import_and_evaluate_agrees(cli, checkpoints: dict[str, Path], tmp_path):
    """--data: the HC3 test split train scores on (seed, ratios, lang) and a CMRC dev sample;
    `nlpserve evaluate` re-scores each version to the same figures."""
    from service.repository import load_manifest

    hc3, cmrc = shared_data("hc3/en"), shared_data("cmrc2018/cmrc2018_dev.json")
    if hc3 is None or cmrc is None:
        pytest.skip("the shared HC3 and CMRC 2018 files are not here")
    out = tmp_path / "models"
    common = ["--out", out, "--no-progress", "--threads", "1", "--variants", "fp32,int8"]
    runs = {
        "detector-rev": ["detector", "--from", checkpoints["unnamed"], "--labels",
                         "machine,human", "--name", "detector-rev", "--max-length", "32",
                         "--data", hc3],
        "qa-zh": ["qa", "--from", checkpoints["qa"], *QA_WINDOWS, "--data", cmrc,
                  "--max-eval-examples", "30"],
    }  # fmt: skip
    for name, args in runs.items():
        res = cli("import", *args, *common)
        assert res.exit_code == 0, (res.output, res.exception)
        folder = out / name / "1"
        m = load_manifest(folder)
        assert m.split is not None and m.data and "optimistically" in m.description
        keys = ("accuracy", "roc_auc") if m.task == "detect" else ("em", "f1")
        assert set(keys) <= set(m.metrics) and set(keys) <= set(m.variants["int8"].metrics)
        res = cli("evaluate", folder, "--data", hc3 if m.task == "detect" else cmrc)
        assert res.exit_code == 0, (res.output, res.exception)
        again = json.loads(res.stdout)
        for k in keys:
            assert again[k] == pytest.approx(m.metrics[k], abs=1e-9), k
    m = load_manifest(out / "detector-rev" / "1")
    assert m.split is not None and m.split.seed == 13 and m.split.unit == "question"
    assert m.metrics["test_examples"] == m.split.sizes["test"]


def test_an_export_that_differs_from_pytorch_leaves_nothing_behind(cli, tmp_path: Path):
    """NaN weights: the parity check refuses the export, and the staging folder goes."""
    import torch
    from transformers import BertForSequenceClassification

    from training.data.common import TrainingError

    folder = _save(tmp_path / "nan", BertForSequenceClassification, _config(_vocab(), **_named()))
    model = BertForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(str(folder))
    out = tmp_path / "models"
    res = cli("import", "detector", "--from", folder, "--out", out, "--variants", "fp32",
              "--no-progress")  # fmt: skip
    assert isinstance(res.exception, TrainingError), res.output
    assert "does not match PyTorch" in str(res.exception)
    assert list(out.iterdir()) == []  # no version folder, no .detector-en-1.staging


def test_ctrl_c_mid_export_leaves_nothing_and_says_so(tmp_path: Path):
    """SIGINT while the ONNX files are written (a MiniLM-sized BERT, 6 x 384, with a saved
    head: seconds of export): exit status 130, one line on stderr (was: none), no version or
    staging folder."""
    import signal
    import time

    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=_vocab(), hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536,
                        max_position_embeddings=512, **_named())  # fmt: skip
    folder = _save(tmp_path / "minilm-sized", BertForSequenceClassification, config)
    out = tmp_path / "models"
    argv = [sys.executable, "-m", "service.cli", "import", "detector", "--from", folder, "--out",
            out, "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        # a test run started in the background ignores SIGINT, and its children would too
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    staging = out / ".detector-en-1.staging"
    deadline = time.monotonic() + 120
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staging.exists(), "the export never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1:] == [
        "nlpserve: interrupted: the run stopped; its unpublished files were removed"
    ], err
    assert list(out.iterdir()) == []
