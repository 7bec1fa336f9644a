"""``nlpserve import`` of checkpoints that are not WordPiece BERTs: RoBERTa (byte-level BPE,
``<s> q </s></s> c </s>``, one segment embedding, positions numbered after the padding
index), XLM-R and ALBERT (SentencePiece Unigram), each a tiny fine-tuned checkpoint with a
tokenizer trained here, saved with save_pretrained as a user's would be; served over real
HTTP and compared with PyTorch and the checkpoint's own HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.builders_bert import detector_examples, qa_examples

pytestmark = pytest.mark.train

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's and XLM-R's ids 0-4
LONG = "additionally it is important to note that overall " * 30  # past 128 tokens
TEXTS = [
    "i think my dog ate it lol",
    "Furthermore, in conclusion, various aspects should be considered.",
    "Café naïve — 中国的首都 😀 <mask> is </s> here",  # non-ASCII, special tokens typed in
    LONG,
]
QUESTION = "Where was the meeting held?"
CONTEXT = (
    "The committee met on Tuesday. After a long debate, the meeting was held in Paris, "
    "near the old library, and everyone agreed to return next year. "
) * 4  # several 64-token windows
QA_WINDOWS = ["--max-length", "64", "--doc-stride", "16", "--max-query-length", "16"]
POSITIONS = 130  # RoBERTa-style: 128 tokens (positions are numbered from padding_idx + 1)


def _corpus() -> list[str]:
    return (
        [e.text for e in detector_examples()]
        + [e.context + e.question for e in qa_examples()]
        + TEXTS[:3]
        + [QUESTION, CONTEXT]
    )


def _bpe():
    """A byte-level BPE tokenizer as RoBERTa's (GPT-2's pre-tokenizer, ``<s>``/``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def _unigram(cls: str, sep: str, lowercase: bool, specials: list[str]):
    """A SentencePiece-style Unigram tokenizer (Metaspace), XLM-R's or ALBERT's template."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.Unigram())
    norms = [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(norms + ([normalizers.Lowercase()] if lowercase else []))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    unk = "<unk>"
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token=unk)
    tok.train_from_iterator(_corpus(), trainer)
    c, s = tok.token_to_id(cls), tok.token_to_id(sep)
    # XLM-R: <s> A </s> </s> B </s>, types 0; ALBERT: [CLS] A [SEP] B:1 [SEP]:1 (XLNet's is
    # set by the caller)
    xlmr = cls == "<s>"
    pair = f"{cls} $A {sep} {sep} $B {sep}" if xlmr else f"{cls} $A {sep} $B:1 {sep}:1"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=[(cls, c), (sep, s)]
    )
    return tok


def _save(folder: Path, family: str, head: str, seed: int = 0, **config: Any) -> Path:
    import torch
    import transformers
    from tokenizers import processors

    tf: Any = transformers  # its stubs lack the *TokenizerFast aliases

    if family == "roberta":
        hf: Any = tf.RobertaTokenizerFast(tokenizer_object=_bpe(), model_max_length=128,
                                          **_named_specials())  # fmt: skip
        cfg: Any = tf.RobertaConfig(type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                    eos_token_id=2, max_position_embeddings=POSITIONS,
                                    **_tiny(), **config)  # fmt: skip
    elif family == "xlm-roberta":
        hf = tf.XLMRobertaTokenizerFast(tokenizer_object=_unigram("<s>", "</s>", False, SPECIALS),
                                        model_max_length=128, **_named_specials())  # fmt: skip
        cfg = tf.XLMRobertaConfig(type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, max_position_embeddings=POSITIONS,
                                  **_tiny(), **config)  # fmt: skip
    elif family == "xlnet":  # A <sep> <cls>: its head reads the last position
        specials = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>"]
        tok = _unigram("<cls>", "<sep>", False, specials)
        c, sep = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <sep>:0 <cls>:2", pair="$A:0 <sep>:0 $B:1 <sep>:1 <cls>:2",
            special_tokens=[("<cls>", c), ("<sep>", sep)],
        )  # fmt: skip
        hf = tf.XLNetTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   cls_token="<cls>", sep_token="<sep>", mask_token="<mask>",
                                   padding_side="left")  # fmt: skip
        cfg = tf.XLNetConfig(d_model=32, n_layer=2, n_head=2, d_inner=64, **config)
    else:  # albert
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        hf = tf.AlbertTokenizerFast(tokenizer_object=_unigram("[CLS]", "[SEP]", True, specials),
                                    unk_token="<unk>", pad_token="<pad>", cls_token="[CLS]",
                                    sep_token="[SEP]", mask_token="[MASK]",
                                    model_max_length=128)  # fmt: skip
        cfg = tf.AlbertConfig(embedding_size=16, max_position_embeddings=128, pad_token_id=0,
                              **_tiny(), **config)  # fmt: skip
    cfg.vocab_size = len(hf)
    model_cls = getattr(tf, f"{type(cfg).__name__.removesuffix('Config')}For{head}")
    torch.manual_seed(seed)
    model_cls(cfg).save_pretrained(str(folder))
    hf.save_pretrained(str(folder))
    return folder


def _tiny() -> dict[str, Any]:
    return {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}  # fmt: skip


def _named_specials() -> dict[str, Any]:
    return {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}  # fmt: skip


# roberta-base-openai-detector's labels: output 0 is machine text ("Fake")
FAKE_REAL: dict[str, Any] = {"id2label": {0: "Fake", 1: "Real"}, "label2id": {"Fake": 0, "Real": 1}}
HUMAN_MACHINE: dict[str, Any] = {
    "id2label": {0: "human", 1: "machine"},
    "label2id": {"human": 0, "machine": 1},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "roberta-det": _save(root / "roberta-det", "roberta", "SequenceClassification",
                             **FAKE_REAL),
        "roberta-qa": _save(root / "roberta-qa", "roberta", "QuestionAnswering", seed=1),
        "xlmr-det": _save(root / "xlmr-det", "xlm-roberta", "SequenceClassification", seed=2,
                          **HUMAN_MACHINE),
        "xlmr-qa": _save(root / "xlmr-qa", "xlm-roberta", "QuestionAnswering", seed=3),
        "albert-det": _save(root / "albert-det", "albert", "SequenceClassification", seed=4,
                            **HUMAN_MACHINE),
        "albert-qa": _save(root / "albert-qa", "albert", "QuestionAnswering", seed=5),
    }  # fmt: skip


# name in the repository -> (checkpoint, index of the machine output)
DETECTORS = {"detector-roberta": ("roberta-det", 0), "detector-xlmr": ("xlmr-det", 1),
             "detector-albert": ("albert-det", 1)}  # fmt: skip
QA = {"qa-roberta": "roberta-qa", "qa-xlmr": "xlmr-qa", "qa-albert": "albert-qa"}


@pytest.fixture(scope="module")
def repo(cli, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "models"
    common = ["--out", out, "--no-progress", "--threads", "1", "--variants", "fp32"]
    for name, (ck, machine) in DETECTORS.items():
        labels = ["--labels", "machine,human"] if machine == 0 else []
        res = cli("import", "detector", "--from", checkpoints[ck], "--name", name, *labels,
                  *common)  # fmt: skip
        assert res.exit_code == 0, (name, res.output, res.exception)
    for name, ck in QA.items():
        res = cli("import", "qa", "--from", checkpoints[ck], "--name", name, *QA_WINDOWS,
                  *common)  # fmt: skip
        assert res.exit_code == 0, (name, res.output, res.exception)
    return out


def _torch_probabilities(folder: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The checkpoint's own tokenizer and model, one text at a time (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    out = []
    for t in texts:
        enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            out.append(torch.softmax(model(**enc).logits[0], -1).numpy())
    return np.array(out)


async def test_imported_detectors_serve_the_checkpoints_probabilities(
    repo: Path, checkpoints: dict[str, Path]
):
    """/v1/detect's machine_probability is torch's softmax on the checkpoint (its own HF
    tokenizer, one text at a time) for non-ASCII text, typed special tokens and a text past
    the 128 tokens a RoBERTa with max_position_embeddings 130 has positions for."""
    from service.repository import load_manifest
    from tests.service_support import live_server, make_settings

    # shap's first start-up may take past 20 s on a busy machine
    settings = make_settings(repo, variant="fp32", default_deadline_ms=120_000)
    async with live_server(settings) as srv, srv.client() as c:
        for name, (ck, machine) in DETECTORS.items():
            m = load_manifest(repo / name / "1")
            assert m.max_length == 128, name  # the positions it has, not max_position_embeddings
            assert m.preprocessing.lowercase is (name == "detector-albert"), name
            if name != "detector-albert":  # one segment embedding: no token_type_ids to feed
                assert m.input_names() == ["input_ids", "attention_mask"], name
            want = _torch_probabilities(checkpoints[ck], TEXTS, 128)[:, machine]
            r = await c.post(f"/v1/detect?model={name}",
                             json={"inputs": [{"text": t} for t in TEXTS]})  # fmt: skip
            assert r.status_code == 200, r.text
            outs = r.json()["outputs"]
            np.testing.assert_allclose([o["machine_probability"] for o in outs], want,
                                       atol=1e-4, err_msg=name)  # fmt: skip
            assert [o["truncated"] for o in outs] == [False, False, False, True], name
            # explanations mask with the tokenizer's own mask token and score the same model
            r = await c.post(f"/v1/detect/explain?model={name}",
                             json={"text": TEXTS[1], "max_evals": 40})  # fmt: skip
            assert r.status_code == 200, r.text
            exp = r.json()
            assert exp["output"] == pytest.approx(outs[1]["machine_probability"], abs=1e-5)
            assert [TEXTS[1][s:e] for s, e in exp["offsets"]] == exp["tokens"]


# emoji (byte-level BPE cuts each into several tokens), "İ" (lowercased: two), runs of spaces
WINDOWED = "The meeting was held in Paris 😀 near İstanbul,   Café naïve. " * 30


async def test_imported_detectors_read_a_text_whole_in_windows(repo: Path):
    """windows: true with each tokenizer family: consecutive spans trimmed of whitespace (no
    leading "Ġ" space, no SentencePiece "▁" reaching into the next window's word, no emoji
    in two windows), the head window read as the plain request reads the text."""
    from tests.service_support import live_server, make_settings

    async with live_server(make_settings(repo, variant="fp32")) as srv, srv.client() as c:
        for name in DETECTORS:
            r = await c.post(f"/v1/detect?model={name}",
                             json={"text": WINDOWED, "windows": True})  # fmt: skip
            assert r.status_code == 200, r.text
            out = r.json()
            spans = [(w["start"], w["end"]) for w in out["windows"]]
            assert len(spans) > 3 and out["truncated"] is False, name
            assert spans[0][0] == 0 and spans[-1][1] == len(WINDOWED.rstrip()), name
            for s, e in spans:
                assert e > s and WINDOWED[s:e] == WINDOWED[s:e].strip(), (name, WINDOWED[s:e])
            for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
                assert a_end <= b_start and not WINDOWED[a_end:b_start].strip(), (name, spans)
            plain = (await c.post(f"/v1/detect?model={name}", json={"text": WINDOWED})).json()
            assert plain["truncated"] is True, name
            head = out["windows"][0]["machine_probability"]
            assert head == pytest.approx(plain["machine_probability"], abs=1e-5), name


def test_predict_answers_as_the_service_does(cli, repo: Path, checkpoints: dict[str, Path],
                                             tmp_path: Path):  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    res = cli("predict", "detector-roberta", "--models", repo, "-i", src, "--variant", "fp32")
    assert res.exit_code == 0, (res.output, res.exception)
    got = [json.loads(line)["machine_probability"] for line in res.stdout.splitlines()]
    want = _torch_probabilities(checkpoints["roberta-det"], TEXTS, 128)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_qa_windows_are_the_checkpoint_tokenizers_own(repo: Path, checkpoints: dict[str, Path]):
    """The service's windows are HF's ``tokenizer(q, c, truncation="only_second", stride=...)``
    ones: ``<s> q </s></s> c </s>`` for RoBERTa/XLM-R, ``[CLS] q [SEP] c [SEP]`` with types
    0/1 for ALBERT."""
    from transformers import AutoTokenizer

    from service.preprocess.qa import QAEncoder

    for name, ck in QA.items():
        hf = AutoTokenizer.from_pretrained(str(checkpoints[ck]))
        want = hf(QUESTION, CONTEXT, truncation="only_second", max_length=64, stride=16,
                  return_overflowing_tokens=True)  # fmt: skip
        windows = QAEncoder.load(repo / name / "1" / "tokenizer.json", 64, 16, 16).encode(
            QUESTION, CONTEXT
        )
        assert len(windows) > 2, name
        assert [w.input_ids.tolist() for w in windows] == want["input_ids"], name
        # ALBERT's template types the context 1 (transformers 5 returns no token types for
        # it, but the checkpoint's tokenizer.json, as trained, has them)
        pair = hf.backend_tokenizer.encode(QUESTION, CONTEXT)
        first = windows[0]
        assert first.token_type_ids.tolist() == pair.type_ids[: len(first)], name
        assert set(first.token_type_ids.tolist()) == ({0, 1} if name == "qa-albert" else {0})


async def test_imported_qa_matches_torch_logits_and_answers(
    repo: Path, checkpoints: dict[str, Path]
):
    """The served ONNX logits are the checkpoint's on the service's windows, and /v1/qa
    answers the span those torch logits pick, with no space around it (SentencePiece pieces
    map back to the space before a word)."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from service.preprocess.qa import QAEncoder
    from service.repository import load_manifest
    from tests.service_support import live_server, make_settings
    from training.transformer.export import onnx_feeds, ort_session

    want = {}
    for name, ck in QA.items():
        folder = repo / name / "1"
        m = load_manifest(folder)
        assert m.preprocessing.lowercase is (name == "qa-albert"), name
        enc = QAEncoder.load(folder / "tokenizer.json", 64, 16, 16)
        windows = enc.encode(QUESTION, CONTEXT)
        batch = enc.collate(windows)
        sess = ort_session(folder / m.variants["fp32"].file)
        got = sess.run(["start_logits", "end_logits"], onnx_feeds(sess, batch))
        model = AutoModelForQuestionAnswering.from_pretrained(str(checkpoints[ck])).eval()
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items()
                           if k in m.input_names()})  # fmt: skip
        live = batch["attention_mask"] == 1
        for g, w in zip(got, (out.start_logits, out.end_logits), strict=True):
            np.testing.assert_allclose(g[live], w.numpy()[live], atol=1e-4, err_msg=name)
        longest = m.preprocessing.max_answer_length
        assert longest is not None
        best = enc.decode(CONTEXT, windows, out.start_logits.numpy(), out.end_logits.numpy(),
                          longest)  # fmt: skip
        want[name] = (best.start, best.end)
    async with live_server(make_settings(repo, variant="fp32")) as srv, srv.client() as c:
        for name in QA:
            r = await c.post(f"/v1/qa?model={name}",
                             json={"question": QUESTION, "context": CONTEXT})  # fmt: skip
            assert r.status_code == 200, r.text
            a = r.json()
            assert (a["start"], a["end"]) == want[name], (name, a)
            assert CONTEXT[a["start"] : a["end"]] == a["answer"] == a["answer"].strip(), a
            # top_k: the first of the list is that answer; every span trimmed, each once
            body = {"question": QUESTION, "context": CONTEXT, "top_k": 5}
            r = await c.post(f"/v1/qa?model={name}", json=body)
            assert r.status_code == 200, r.text
            listed = r.json().pop("answers")
            assert listed[0] == {k: a[k] for k in ("answer", "start", "end", "score")}, name
            assert len({(x["start"], x["end"]) for x in listed}) == len(listed) > 1, name
            for x in listed:
                assert CONTEXT[x["start"] : x["end"]] == x["answer"] == x["answer"].strip(), x


def test_max_length_is_the_positions_a_roberta_has(cli, checkpoints: dict[str, Path],
                                                   tmp_path: Path):  # fmt: skip
    """max_position_embeddings 130 with padding_idx 1: 128 tokens; 130 is refused in one
    line naming why, before anything is written."""
    from tests.test_import_checkpoint import _nlpserve, _one_line_refusal

    out = tmp_path / "models"
    res = _nlpserve("import", "detector", "--from", checkpoints["roberta-det"], "--labels",
                    "machine,human", "--max-length", "130", "--out", out)  # fmt: skip
    _one_line_refusal(res, "--max-length 130 is past the 128 tokens",
                      "max_position_embeddings 130")  # fmt: skip
    assert not out.exists()


def test_a_model_that_reads_its_last_position_is_refused(tmp_path: Path):
    """XLNet's head reads the last position, where the service's right padding goes (its
    tokenizer pads on the left): refused in one line before anything is exported, rather
    than served with answers that change with the batch."""
    from tests.test_import_checkpoint import _nlpserve, _one_line_refusal

    folder = _save(tmp_path / "xlnet", "xlnet", "SequenceClassification", **HUMAN_MACHINE)
    out = tmp_path / "models"
    res = _nlpserve("import", "detector", "--from", folder, "--out", out, "--variants", "fp32")
    _one_line_refusal(res, "(XLNetForSequenceClassification): not supported",
                      "right-padded in a batch", "pads on the left")  # fmt: skip
    assert not out.exists()
