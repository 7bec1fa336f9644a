"""The training commands' run-time behaviour: SIGTERM handled like Ctrl-C (no staging folder,
exit status 143), numbers refused when out of range, the help texts, and the progress rules
(bars only on a terminal unless --progress/--no-progress, each epoch line once, no torch
shape-inference noise from the LSTM export)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest

from tests.test_lstm_cli import TINY_POLARITY, flat, write_polarity_root

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ SIGTERM
def test_sigterm_during_publish_removes_the_staging_folder_and_exits_143(
    cli, tmp_path, monkeypatch
):
    """SIGTERM (timeout, docker stop, schedulers) arrives while the LSTM entry is staged: the
    run unwinds like Ctrl-C, the staging folder goes, one line, exit status 128 + 15."""
    import training.repository as repository

    seen: list[list[str]] = []

    def terminated(staging, final):
        seen.append(sorted(p.name for p in staging.iterdir()))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(repository, "move_into_place", terminated)
    data = write_polarity_root(tmp_path / "data")
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    work = tmp_path / "work"
    res = cli("train", "polarity", "--data", data, "--out", out, "--epochs", 1, *TINY_POLARITY,
              "--no-progress", "--work-dir", work)  # fmt: skip
    assert res.exit_code == 143, res.output
    assert seen and "model.onnx" in seen[0]  # it was interrupted with files staged
    assert res.stdout == ""
    assert res.stderr.startswith("nlpserve: terminated by SIGTERM")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # trained to the end: its last checkpoint says how to publish without training again
    assert f"checkpoint of step 3 is {work / 'checkpoint.pt'}" in res.stderr
    assert res.stderr.strip().endswith(f"--resume {work}")
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_sigterm_in_a_transformer_run_removes_its_staging_folder(tmp_path):
    """The transformer commands' cleanup (discard_staging_on_error) runs for SIGTERM too."""
    import typer

    from training.options import handles_sigterm
    from training.transformer.common import discard_staging_on_error, staging_dir

    final = tmp_path / "models" / "detector-en" / "1"

    def command() -> None:
        with discard_staging_on_error(final):
            (staging_dir(final) / "model.onnx").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    with pytest.raises(typer.Exit) as e:
        handles_sigterm(command)()
    assert e.value.exit_code == 143
    assert [p.name for p in (tmp_path / "models").iterdir()] == []


def test_pretrain_says_what_a_sigterm_may_leave(cli, capsys):
    """pretrain saves into --out itself: "its unpublished files were removed" was untrue."""
    import typer

    from service.cli import app
    from training.options import handles_sigterm

    run = next(c.callback for c in app.registered_commands if c.name == "pretrain")
    assert run is not None and run.__closure__ is not None
    cells = [c.cell_contents for c in run.__closure__]
    bound = dict(zip(run.__code__.co_freevars, cells, strict=True))
    assert bound["command"].__name__ == "pretrain_cmd"
    assert "partial checkpoint" in bound["left"]

    def killed() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(typer.Exit):
        handles_sigterm(killed, left=bound["left"])()
    err = capsys.readouterr().err
    assert "terminated by SIGTERM: the run stopped; --out may hold a partial checkpoint" in err


def test_sigterm_through_the_real_cli_process(tmp_path):
    """A real ``nlpserve`` process: the exit status the shell sees is 143."""
    script = (
        "import os, signal, time, training.repository as r\n"
        "def stop(staging, final):\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
        "r.move_into_place = stop\n"
        "import sys; from service.cli import main; sys.argv[0] = 'nlpserve'; main()\n"
    )
    data = write_polarity_root(tmp_path / "data")
    out = tmp_path / "out"
    args = ["train", "polarity", "--data", data, "--out", out, "--epochs", "1",
            *map(str, TINY_POLARITY), "--no-progress", "--work-dir", tmp_path / "work"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("nlpserve: terminated by SIGTERM")
    assert "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


# ------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "args",
    [
        ["train", "qa", "--max-minutes", "-1"],  # published after one step
        ["train", "qa", "--max-minutes", "0"],
        ["train", "qa", "--max-minutes", "nan"],
        ["train", "qa", "--time-budget-minutes", "-1"],
        ["train", "qa", "--time-budget-minutes", "inf"],
        ["train", "qa", "--eval-every", "0"],
        ["train", "detector", "--eval-every", "-3"],
        ["train", "detector", "--max-minutes", "-1"],
        ["pretrain", "--max-minutes", "0"],
        ["pretrain", "--time-budget-minutes", "-2"],
        ["pretrain", "--hidden", "0"],
        ["pretrain", "--layers", "0"],
    ],
)
def test_minutes_and_steps_out_of_range_are_refused(cli, tmp_path, args):
    res = cli(*args, "--data", tmp_path, "--out", tmp_path / "m")
    assert res.exit_code == 2, res.output
    assert "Invalid value for" in flat(res.output) and args[-2] in flat(res.output)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ help texts
@pytest.mark.parametrize("command", [["train", "qa"], ["train", "detector"], ["pretrain"]])
def test_every_transformer_option_has_help_and_names_real_options(cli, command):
    from service.cli import app
    from training.cli import train_app

    cmd = typer_command(app if command == ["pretrain"] else train_app, command[-1])
    for param in cmd.params:
        assert param.help, f"{command}: {param.opts} has no help text"
        assert param.help.strip() != "Tokens.", param.opts
        if any(o in ("--max-minutes", "--time-budget-minutes") for o in param.opts):
            limit = "--max-steps" if command == ["pretrain"] else "--epochs"
            assert limit in param.help and "--max-steps/--epochs" not in param.help
    assert any("--no-progress" in p.secondary_opts for p in cmd.params)


def typer_command(typer_app, name: str):
    import typer.main
    from typer.core import TyperGroup

    group = typer.main.get_command(typer_app)
    assert isinstance(group, TyperGroup)
    return group.commands[name]


# ------------------------------------------------------------------------------ progress
def _toy_fit(progress):
    from training.lstm.loop import fit

    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    fit(model, train_step=lambda b: model(x[b]).pow(2).mean(),
        make_batches=lambda _e: [[0, 1, 2, 3], [4, 5, 6, 7]], evaluate=lambda: 0.5,
        epochs=1, patience=5, lr=1e-2, progress=progress, desc="toy")  # fmt: skip


def test_lstm_bar_is_off_when_stderr_is_not_a_terminal_unless_asked(capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="training.lstm.loop")
    _toy_fit(None)  # pytest's captured stderr is no terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "toy epoch 1/1" not in err
    assert [r.levelno for r in caplog.records if "toy epoch 1: loss" in r.message] == [20]
    caplog.clear()
    _toy_fit(True)  # --progress: the bar anyway, the epoch line under it
    err = capsys.readouterr().err
    assert "toy epoch 1/1" in err and err.count("toy epoch 1: loss") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


@pytest.mark.parametrize("progress", [None, True])
def test_lstm_epoch_line_is_printed_once_when_logging_to_stderr(capsys, progress):
    """The training commands log INFO to stderr: the line was there twice (tqdm and log)."""
    import logging

    root = logging.getLogger()
    handler, level = logging.StreamHandler(sys.stderr), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        _toy_fit(progress)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("toy epoch 1: loss") == 1, err


def test_transformer_bars_follow_progress_option(capsys, monkeypatch):
    from training.transformer import common

    monkeypatch.setattr(common, "PROGRESS", None)
    list(common.progress_bar(range(3), desc="scoring"))
    assert "scoring" not in capsys.readouterr().err
    monkeypatch.setattr(common, "PROGRESS", True)
    list(common.progress_bar(range(3), desc="scoring"))
    assert "scoring" in capsys.readouterr().err
    monkeypatch.setattr(common, "PROGRESS", False)
    assert common.progress_bar(range(3)).disable


def test_qa_test_scoring_shows_a_bar(capsys, monkeypatch):
    """ONNX test scoring (``predict`` with ``desc``) shows a bar; held-out scoring does not."""
    import numpy as np

    from service.preprocess.qa import QAEncoder
    from training.data.squad import QAExample
    from training.transformer import common, qa

    class Enc:  # a stand-in QAEncoder: every question gets one window of 3 tokens
        def encode_batch(self, qs, cs):
            return [[[1, 2, 3]] for _ in qs]

        def collate(self, wins):
            return {"input_ids": np.ones((len(wins), 3), np.int64)}

        def decode(self, ctx, wins, s, e, n, best):
            return type("A", (), {"text": ctx[:1]})

    ex = [QAExample(str(i), "a", "q", "ctx", ()) for i in range(5)]
    enc = cast(QAEncoder, Enc())
    run = lambda b: (np.zeros((len(b["input_ids"]), 3)), np.zeros((len(b["input_ids"]), 3)))  # noqa: E731
    monkeypatch.setattr(common, "PROGRESS", True)
    qa.predict(ex, enc, run, 2, 10, desc="test model.onnx")
    assert "test model.onnx" in capsys.readouterr().err
    qa.predict(ex, enc, run, 2, 10)
    assert capsys.readouterr().err == ""


def test_lstm_export_prints_no_packed_shape_warnings(capfd, tmp_path):
    """torch's C++ exporter printed three PackPadded/PadPacked shape-inference warnings per
    LSTM export; they are dropped, anything else written to fd 2 meanwhile is kept."""
    import numpy as np

    from training.lstm.export import (
        POLARITY_AXES,
        POLARITY_INPUTS,
        POLARITY_OUTPUTS,
        export_onnx,
        without_packed_shape_warnings,
    )
    from training.lstm.models import PolarityClassifier

    model = PolarityClassifier(30, emb_dim=4, hidden=4)
    example = {"word_ids": np.ones((2, 5), np.int64), "lengths": np.asarray([5, 3], np.int64)}
    capfd.readouterr()
    export_onnx(model, example, tmp_path / "p.onnx",
                input_names=POLARITY_INPUTS, output_names=POLARITY_OUTPUTS,
                dynamic_axes=POLARITY_AXES)  # fmt: skip
    err = capfd.readouterr().err
    assert "PackPadded" not in err and "PadPacked" not in err, err
    with without_packed_shape_warnings():
        os.write(2, b"[W] Warning: The shape inference of prim::PackPadded type is missing\n")
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "something else\n"
    with pytest.raises(RuntimeError), without_packed_shape_warnings():
        os.write(2, b"what the export said before failing\n")
        raise RuntimeError("export failed")
    assert capfd.readouterr().err == "what the export said before failing\n"


# ------------------------------------------------------------------------------ manifests
def test_recorded_command_says_where_it_runs_from(monkeypatch):
    """Paths are recorded relative to the working directory; a run started below the
    repository root records that folder (``cd tests && …``), so the command stays valid."""
    from training.repository import command_line, repository_root

    assert repository_root() == ROOT
    argv = ["/venv/bin/nlpserve", "train", "pos", f"--data={ROOT / 'tests'}", "--out", "m"]
    monkeypatch.chdir(ROOT)
    assert command_line(argv) == "nlpserve train pos --data=tests --out m"
    monkeypatch.chdir(ROOT / "tests")
    assert command_line(argv) == "cd tests && nlpserve train pos --data=. --out m"


def test_base_model_is_recorded_without_a_local_path_and_with_its_digest(tmp_path, monkeypatch):
    from training.transformer.commands import PACKAGED_MINILM, _base_record

    def checkpoint(folder: Path, weights: bytes) -> Path:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "vocab.txt").write_text("[PAD]\n")
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "README.md").write_text("not part of it")
        return folder

    monkeypatch.chdir(tmp_path)
    a = checkpoint(tmp_path / "a", b"one")
    b = checkpoint(tmp_path / "b", b"two")
    rec = _base_record(str(a), str(a))
    assert rec["base_model"] == "a"  # relative to the working directory, like the command
    assert set(rec["base_model_sha256"]) == {"config.json", "vocab.txt", "model.safetensors"}
    other = _base_record(str(b), str(b))["base_model_sha256"]
    assert other["model.safetensors"] != rec["base_model_sha256"]["model.safetensors"]
    assert other["config.json"] == rec["base_model_sha256"]["config.json"]
    assert _base_record("bert-base-chinese", "bert-base-chinese") == {
        "base_model": "bert-base-chinese",
        "base_model_sha256": None,
    }
    assert _base_record(PACKAGED_MINILM, str(a))["base_model"] == PACKAGED_MINILM


def test_a_manifest_with_the_new_base_record_still_validates(tmp_path):
    """``hyperparameters`` is free-form: the committed manifests (without these fields) and new
    ones (with them) both load."""
    import json

    from service.repository import load_manifest

    src = ROOT / "models" / "pos-en" / "1"
    raw = json.loads((src / "manifest.json").read_text())
    raw["hyperparameters"] |= {"base_model": "a", "base_model_sha256": {"config.json": "0" * 64}}
    raw["command"] = "cd runs && " + raw["command"]
    dst = tmp_path / "pos-en" / "1"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "manifest.json":
            (dst / f.name).symlink_to(f)
    (dst / "manifest.json").write_text(json.dumps(raw))
    m = load_manifest(dst)
    assert m.hyperparameters["base_model_sha256"] == {"config.json": "0" * 64}


def test_a_recorded_packaged_base_resolves_to_the_package(tmp_path):
    """The packaged MiniLM is recorded by name (its path is this machine's); the bench
    scripts that rebuild a detector from its manifest load it through that name."""
    from training.transformer.commands import (
        PACKAGED_MINILM,
        default_english_base,
        recorded_base,
    )

    packaged = default_english_base()  # None without the `bases` extra (CI's install)
    if packaged is None:
        assert recorded_base(PACKAGED_MINILM) == PACKAGED_MINILM
    else:
        assert recorded_base(PACKAGED_MINILM) == packaged
        assert (Path(packaged) / "config.json").is_file()
    assert recorded_base(str(tmp_path)) == str(tmp_path)
    assert recorded_base("bert-base-chinese") == "bert-base-chinese"
