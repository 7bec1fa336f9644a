"""Training checkpoints and ``--resume``: real training processes interrupted mid-run (SIGKILL
right after a checkpoint is on disk, SIGTERM in the middle of a step), resumed, and compared
with an uninterrupted run of the same command; and what a resume refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_lstm_cli import TINY_POLARITY, TINY_POS, write_conllu_root, write_polarity_root

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

# `nlpserve ARGS` in a real process that interrupts itself: "kill" sends itself SIGKILL right
# after its AT-th checkpoint is on disk (what the OOM killer or a lost spot machine does);
# "term" sends itself SIGTERM inside its AT-th optimizer step, between the backward pass and
# the update (what `timeout` or `docker stop` does at any moment).
INTERRUPT = """
import os, signal, sys
import torch, training.checkpoint as c
how, at = sys.argv[1], int(sys.argv[2])
calls = 0
def count():
    global calls
    calls += 1
    return calls == at
if how == "kill":
    write = c.write_atomically
    def write_then_die(path, payload):
        write(path, payload)
        if count():
            os.kill(os.getpid(), signal.SIGKILL)
    c.write_atomically = write_then_die
else:
    clip = torch.nn.utils.clip_grad_norm_
    def clip_with_sigterm(*a, **k):
        if count():
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = clip_with_sigterm
from service.cli import main
sys.argv = ["nlpserve", *sys.argv[3:]]
main()
"""

# What two runs of one training legitimately differ in: when they ran, how long, and how
# they were started (the resumed one records its resumes).
_RUN_FIELDS = ("created_at", "command")


def _nlpserve(*args, interrupt: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    pre = ["-c", INTERRUPT, *map(str, interrupt)] if interrupt else ["-m", "service.cli"]
    return subprocess.run(
        [sys.executable, *pre, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def _comparable(manifest: Path) -> dict:
    m = json.loads(manifest.read_text())
    for key in _RUN_FIELDS:
        m.pop(key)
    for metrics in [m["metrics"], *(v["metrics"] for v in m["variants"].values())]:
        metrics.pop("train_seconds", None)
    m["hyperparameters"].pop("resumed", None)
    m["hyperparameters"].pop("dev_history", None)  # its "seconds" (the scores are compared)
    m["hyperparameters"].pop("heldout_history", None)
    return m


def _assert_same_model(resumed: Path, reference: Path) -> None:
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == files
    for f in files:
        if f == "manifest.json":
            assert _comparable(resumed / f) == _comparable(reference / f)
        else:
            assert (resumed / f).read_bytes() == (reference / f).read_bytes(), f"{f} differs"


# ------------------------------------------------------------------ LSTMs
POLARITY = ["train", "polarity", "--epochs", 3, "--batch-size", 16, *TINY_POLARITY,
            "--no-progress", "--checkpoint-every", 4]  # fmt: skip
POS = ["train", "pos", "--format", "conllu", "--tag-field", "xpos", "--epochs", 3,
       "--batch-size", 16, *TINY_POS, "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def polarity(tmp_path_factory, cli):
    """The polarity data, an uninterrupted run's entry, and the work dir of the same run
    killed (SIGKILL) right after its 3rd checkpoint: step 8 of 18, in epoch 2."""
    tmp = tmp_path_factory.mktemp("resume-polarity")
    data = write_polarity_root(tmp / "data")
    res = cli(*POLARITY, "--data", data, "--out", tmp / "ref", "--work-dir", tmp / "ref-work")
    assert res.exit_code == 0, res.output
    assert not (tmp / "ref-work").exists()  # the checkpoint removed once published, its dir too
    killed = _nlpserve(*POLARITY, "--data", data, "--out", tmp / "out", "--work-dir",
                       tmp / "work", interrupt=("kill", 3))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp / "work" / "checkpoint.pt").is_file()
    assert not (tmp / "out" / "polarity-en" / "1").exists()
    return {"data": data, "ref": tmp / "ref" / "polarity-en" / "1", "work": tmp / "work",
            "killed": killed}  # fmt: skip


def test_polarity_killed_after_a_checkpoint_resumes_to_the_same_bits(polarity, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(polarity["work"], work)
    args = [*POLARITY, "--data", polarity["data"], "--out", tmp_path / "out"]
    res = _nlpserve(*args, "--work-dir", work, "--resume", work)
    assert res.returncode == 0, res.stderr
    # it continued from step 8 (epoch 2): epoch 1 is not trained again
    assert "polarity epoch 1:" in polarity["killed"].stderr
    assert "polarity epoch 1:" not in res.stderr and "polarity epoch 3:" in res.stderr
    entry = tmp_path / "out" / "polarity-en" / "1"
    _assert_same_model(entry, polarity["ref"])
    assert not (work / "checkpoint.pt").exists()
    m = json.loads((entry / "manifest.json").read_text())
    # the command that started the run, and the resume (from where, with which command)
    assert m["command"].startswith("nlpserve train polarity") and "--resume" not in m["command"]
    assert f"--out {os.path.relpath(polarity['work'].parent / 'out', ROOT)}" in m["command"]
    (resumed,) = m["hyperparameters"]["resumed"]
    assert resumed["from_step"] == 8 and resumed["from_epoch"] == 2
    assert m["hyperparameters"]["best_epoch"] == 3  # trained after the resume
    assert resumed["command"].startswith("nlpserve train polarity")
    assert resumed["command"].endswith(f"--resume {os.path.relpath(work, ROOT)}")


def test_pos_sigterm_mid_step_writes_a_checkpoint_and_resumes_to_the_same_bits(
    cli, tmp_path, caplog
):
    import logging

    data = write_conllu_root(tmp_path / "data")
    ref = cli(*POS, "--data", data, "--out", tmp_path / "ref", "--work-dir", tmp_path / "rw")
    assert ref.exit_code == 0, ref.output
    args = [*POS, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work"]
    stopped = _nlpserve(*args, interrupt=("term", 6))  # epoch 2 of 3, its 2nd of 4 batches
    assert stopped.returncode == 143, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("nlpserve: terminated by SIGTERM: the run stopped;"), last
    assert f"its checkpoint of step 6 is {tmp_path / 'work' / 'checkpoint.pt'}" in last
    assert last.endswith(f"--resume {tmp_path / 'work'}") and "Traceback" not in stopped.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    caplog.set_level(logging.INFO, logger="training.lstm.loop")
    caplog.clear()  # the reference run's lines (when an earlier test left INFO on)
    res = cli(*args, "--resume", tmp_path / "work")
    assert res.exit_code == 0, res.output
    epochs = [r.message.split(":")[0] for r in caplog.records if ": loss" in r.message]
    assert epochs == ["pos epoch 2", "pos epoch 3"]  # from step 6, in epoch 2
    entry = tmp_path / "out" / "pos-en" / "1"
    _assert_same_model(entry, tmp_path / "ref" / "pos-en" / "1")
    hp = json.loads((entry / "manifest.json").read_text())["hyperparameters"]
    assert hp["resumed"][0]["from_step"] == 6
    assert hp["best_epoch"] == 3  # the weights compared are ones trained after the resume


# ------------------------------------------------------------------ transformers
def _tiny_detector_base(folder: Path, texts: list[str]) -> None:
    """A random-init 2-layer BERT classifier (with dropout) with a WordPiece vocabulary of
    ``texts``, saved as a Hugging Face folder for --base-model."""
    from tests.builders_bert import _tiny_bert, _tokenizer
    from training.transformer.pretrain import save_hf_tokenizer

    tok = _tokenizer(texts)
    model = _tiny_bert(tok.get_vocab_size(), "detect")
    model.config.hidden_dropout_prob = 0.1  # random numbers in every step: a resume restores them
    model.save_pretrained(str(folder))
    save_hf_tokenizer(tok, folder)


def _hc3_root(root: Path) -> list[str]:
    from tests.builders_bert import detector_examples

    rows: dict[int, dict] = {}
    examples = detector_examples(n_questions=40)
    for e in examples:
        row = rows.setdefault(e.question, {"question": f"q{e.question}", "human_answers": [],
                                           "chatgpt_answers": []})  # fmt: skip
        row["chatgpt_answers" if e.label else "human_answers"].append(e.text)
    (root / "hc3" / "en").mkdir(parents=True)
    lines = [json.dumps(r) for r in rows.values()]
    (root / "hc3" / "en" / "toy.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [e.text for e in examples]


def test_detector_sigterm_then_sigkill_resumes_twice_to_the_same_model(cli, tmp_path, monkeypatch):
    """A transformer run stopped twice (SIGTERM inside step 4, then SIGKILL of the resumed
    run's process after its 2nd checkpoint) ends where an uninterrupted run ends, on the CPU
    to the bit: the same ONNX bytes, metrics and dev scores. The manifest records both
    resumes."""
    pytest.importorskip("transformers")
    data = tmp_path / "data"
    _tiny_detector_base(tmp_path / "base", _hc3_root(data))
    args = ["train", "detector", "--base-model", tmp_path / "base", "--data", data,
            "--max-length", 64, "--batch-size", 8, "--epochs", 3, "--lr", "3e-3",
            "--warmup-ratio", 0.2, "--max-dev-examples", 0, "--variants", "fp32",
            "--threads", 1, "--checkpoint-every", 3, "--no-progress"]  # fmt: skip
    ref = cli(*args, "--out", tmp_path / "ref", "--work-dir", tmp_path / "ref-work")
    assert ref.exception is None and ref.exit_code == 0, ref.output
    mine = [*args, "--out", tmp_path / "out", "--work-dir", tmp_path / "work"]

    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_with_sigterm(*a, **k):  # SIGTERM between the backward pass and the update
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_sigterm)
        stopped = cli(*mine)
    assert stopped.exit_code == 143, stopped.output
    assert "its checkpoint of step 4 is" in stopped.stderr.strip().splitlines()[-1]
    killed = _nlpserve(*mine, "--resume", tmp_path / "work", interrupt=("kill", 2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    res = cli(*mine, "--resume", tmp_path / "work")
    assert res.exception is None and res.exit_code == 0, res.output
    entry = tmp_path / "out" / "detector-en" / "1"
    reference = tmp_path / "ref" / "detector-en" / "1"
    _assert_same_model(entry, reference)
    m = json.loads((entry / "manifest.json").read_text())
    ref_hp = json.loads((reference / "manifest.json").read_text())["hyperparameters"]
    scores = [h["score"] for h in m["hyperparameters"]["dev_history"]]
    assert scores == [h["score"] for h in ref_hp["dev_history"]]
    assert [r["from_step"] for r in m["hyperparameters"]["resumed"]] == [4, 9]
    assert m["hyperparameters"]["best_step"] > 9  # weights trained after both resumes
    assert (tmp_path / "work" / "best" / "config.json").is_file()
    assert not (tmp_path / "work" / "checkpoint.pt").exists()


# ------------------------------------------------------------------ what a resume refuses
def _resume(cli, polarity, tmp_path, *extra, source: Path | None = None):
    work = tmp_path / "work"
    if not work.exists():
        shutil.copytree(polarity["work"], work)
    return cli(*POLARITY, "--data", polarity["data"], "--out", tmp_path / "out",
               "--work-dir", work, "--resume", source or work, *extra)  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--lr", "0.01"], "--lr 0.002 then, 0.01 now"),
        (["--seed", "14"], "--seed 13 then, 14 now"),
        (["--threads", "2"], "--threads 1 then, 2 now"),
    ],
)
def test_resume_with_options_that_change_the_result_is_refused(
    cli, polarity, tmp_path, extra, named
):
    res = _resume(cli, polarity, tmp_path, *extra)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("nlpserve: --resume ") and named in res.stderr
    assert "resume with the options it was started with: nlpserve train polarity" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_resume_with_other_data_contents_is_refused(cli, polarity, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(polarity["data"], data)
    neg = next(data.rglob("rt-polarity.neg"))
    neg.write_text(neg.read_text() + "one more dull line\n")
    res = cli(*POLARITY, "--data", data, "--out", tmp_path / "out", "--work-dir",
              tmp_path / "w", "--resume", polarity["work"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "--data: other files or contents" in res.stderr


def test_resume_may_change_where_it_writes_and_how_it_looks(cli, polarity, tmp_path):
    """--out, --name, --version, --work-dir, --checkpoint-every, --progress and the data
    path do not change the result."""
    data = tmp_path / "elsewhere"
    shutil.copytree(polarity["data"], data)
    args = [a for a in POLARITY if a not in ("--no-progress",)]
    i = args.index("--checkpoint-every")
    args[i + 1] = 0
    res = cli(*args, "--progress", "--data", data, "--out", tmp_path / "out", "--name", "p2",
              "--version", "7", "--work-dir", tmp_path / "w", "--resume",
              polarity["work"] / "checkpoint.pt")  # fmt: skip
    assert res.exit_code == 0, res.output
    entry = tmp_path / "out" / "p2" / "7"
    assert (entry / "model.onnx").read_bytes() == (polarity["ref"] / "model.onnx").read_bytes()
    assert (
        _comparable(entry / "manifest.json")["metrics"]
        == (_comparable(polarity["ref"] / "manifest.json")["metrics"])
    )


def test_corrupt_truncated_or_foreign_checkpoints_are_refused_in_one_line(cli, polarity, tmp_path):
    good = (polarity["work"] / "checkpoint.pt").read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "not a readable checkpoint"),
        "garbage.pt": (b"not a checkpoint at all", "not a readable checkpoint"),
    }
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    cases["other.pt"] = (None, "not an nlpserve training checkpoint")
    cases["missing"] = (None, "no checkpoint there")
    for name, (_, message) in cases.items():
        res = _resume(cli, polarity, tmp_path, source=tmp_path / name)
        assert res.exit_code == 2, (name, res.output)
        assert res.stderr.startswith(f"nlpserve: --resume {tmp_path / name}"), res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # the checkpoint of another command (a polarity run's, given to train pos)
    res = cli(*POS, "--data", write_conllu_root(tmp_path / "pos-data"), "--out",
              tmp_path / "out", "--resume", polarity["work"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "a checkpoint of `nlpserve train polarity`, not of `nlpserve train pos`" in res.stderr


def test_a_new_run_does_not_overwrite_an_unfinished_runs_checkpoint(cli, polarity, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(polarity["work"], work)
    before = (work / "checkpoint.pt").read_bytes()
    res = cli(*POLARITY, "--data", polarity["data"], "--out", tmp_path / "out",
              "--work-dir", work)  # fmt: skip
    assert res.exit_code == 2, res.output
    assert f"{work / 'checkpoint.pt'} holds the checkpoint of an unfinished run" in res.stderr
    assert f"--resume {work}" in res.stderr
    assert (work / "checkpoint.pt").read_bytes() == before


def test_checkpoint_every_takes_a_step_count_or_a_time(cli, polarity, tmp_path):
    from training.options import parse_checkpoint_every

    assert parse_checkpoint_every("200").steps == 200
    assert parse_checkpoint_every("10m").seconds == 600 and not parse_checkpoint_every("10m").steps
    assert parse_checkpoint_every("1.5h").seconds == 5400
    assert parse_checkpoint_every("90s").seconds == 90
    assert parse_checkpoint_every("0").steps == 0 and parse_checkpoint_every("0").seconds == 0
    for bad in ("10x", "-5", "0m", "m", "1e3"):
        res = cli(*POLARITY, "--checkpoint-every", bad, "--data", polarity["data"],
                  "--out", tmp_path / "out", "--work-dir", tmp_path / "w")  # fmt: skip
        assert res.exit_code == 2, (bad, res.output)
        assert "neither a number of steps" in res.output, res.output
        assert not (tmp_path / "w").exists()


def test_a_timed_checkpoint_is_due_once_that_long_has_passed_since_the_last(tmp_path):
    from training.checkpoint import Checkpointing
    from training.options import parse_checkpoint_every

    ck = Checkpointing("train pos", tmp_path / "checkpoint.pt",
                       parse_checkpoint_every("10m"), {}, "nlpserve train pos")  # fmt: skip
    assert not ck.due(1)  # the run just started
    ck.saved_at -= 601  # as if ten minutes had passed
    assert ck.due(1) and ck.due(7)  # any step: the time, not the count
    ck.save({}, step=7, epoch=1)
    assert (tmp_path / "checkpoint.pt").is_file() and not ck.due(8)  # the clock restarts
    steps = Checkpointing("train pos", tmp_path / "c2.pt", parse_checkpoint_every("3"), {}, "x")
    steps.saved_at -= 3600  # a count ignores the time
    assert [s for s in range(1, 10) if steps.due(s)] == [3, 6, 9]


# ------------------------------------------------------------------ the module's parts
@pytest.fixture
def default_signals():
    """SIGTERM and SIGINT as a fresh process has them (an earlier test in this process, such
    as bench's in-process runs, may have left its own handler), restored afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    from training.checkpoint import write_atomically

    path = tmp_path / "checkpoint.pt"
    write_atomically(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.save raises)
        write_atomically(path, {"step": 2, "unpicklable": lambda: None})
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_failed_write_leaves_no_partial_file_behind(tmp_path):
    """A write that fails (disk full, an unpicklable value) removes its hidden file: left
    there, it filled the disk further and kept finish() from removing the work dir."""
    from training.checkpoint import Checkpointing, write_atomically
    from training.options import CheckpointEvery

    work = tmp_path / "runs" / "m"
    path = work / "checkpoint.pt"
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.save raises)
        write_atomically(path, {"step": 2, "unpicklable": lambda: None})
    assert sorted(p.name for p in work.iterdir()) == []
    Checkpointing("train pos", path, CheckpointEvery(), {}, "nlpserve train pos").finish()
    assert not work.exists()


def test_the_rename_is_made_durable_by_fsyncing_the_folder(tmp_path, monkeypatch):
    """A rename is durable once its folder is fsynced: without it, a machine that loses power
    (a preempted VM) may come back without the checkpoint the run reported."""
    import stat

    from training.checkpoint import write_atomically

    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(tmp_path / "checkpoint.pt", {"step": 1})
    assert synced == [False, True]  # the file's contents, then the folder's entry


def test_a_signal_inside_a_step_waits_for_its_end(default_signals):
    from training.checkpoint import StepGuard
    from training.options import Terminated

    done = []
    with StepGuard() as guard:
        with pytest.raises(Terminated), guard.step():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the rest of the step")
        assert done == ["the rest of the step"] and guard.safe
        with pytest.raises(KeyboardInterrupt):  # outside a step: at once
            os.kill(os.getpid(), signal.SIGINT)
            done.append("never")
        with guard.quiet():
            os.kill(os.getpid(), signal.SIGTERM)  # ignored while the last checkpoint is written
    assert done == ["the rest of the step"]


def test_the_guard_leaves_a_second_sigterm_ignored_during_the_cleanup(default_signals):
    """handles_sigterm ignores a second SIGTERM once the first has stopped the run; leaving
    the guard must not put the raising handler back while the run still cleans up."""
    import typer

    from training.checkpoint import StepGuard
    from training.options import handles_sigterm

    seen = []

    def command() -> None:
        with StepGuard() as guard, guard.step():
            os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the deferred SIGTERM did not stop the run")

    def cleanup_sees() -> None:
        try:
            command()
        finally:
            seen.append(signal.getsignal(signal.SIGTERM))

    with pytest.raises(typer.Exit) as e:
        handles_sigterm(cleanup_sees)()
    assert e.value.exit_code == 143
    assert seen == [signal.SIG_IGN]


# ------------------------------------------------------------------ QA
def test_qa_checkpoint_with_the_window_sizes_given_resumes_without_them(cli, tmp_path):
    """A `train qa` checkpoint records the windows' sizes in effect: one from a run that gave
    --doc-stride / --max-query-length (or from before they were fitted to --max-length, which
    recorded 128 / 64) resumes with a command that leaves them to their defaults, where those
    are the same (was: refused, '--doc-stride: 15 then, unset now')."""
    from tests.test_pretrain import TEXTS, _squad
    from training.transformer.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_length=32, batch_size=8, lr=1e-3,
                         max_steps=1)  # fmt: skip
    pretrain(TEXTS, tmp_path / "base", cfg)
    data = tmp_path / "data" / "cmrc2018"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        squad = json.dumps(_squad(TEXTS[:4] * 2), ensure_ascii=False)
        (data / f"cmrc2018_{split}.json").write_text(squad, "utf-8")
    work = tmp_path / "work"
    # --max-length 48 fits the defaults to 15 / 15 (a third of 45 tokens, half the rest)
    args = ["train", "qa", "--base-model", tmp_path / "base", "--data", tmp_path / "data",
            "--out", tmp_path / "models", "--max-length", 48, "--batch-size", 4, "--epochs", 2,
            "--holdout-ratio", 0.25, "--variants", "fp32", "--work-dir", work, "--threads", 1,
            "--checkpoint-every", 1, "--no-progress"]  # fmt: skip
    killed = _nlpserve(*args, "--doc-stride", 15, "--max-query-length", 15,
                       interrupt=("kill", 1))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    res = cli(*args, "--resume", work)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "models" / "qa-zh" / "1" / "manifest.json").read_text())
    assert m["preprocessing"]["doc_stride"] == 15 and m["preprocessing"]["max_query_length"] == 15
    assert m["hyperparameters"]["resumed"][0]["from_step"] == 1
