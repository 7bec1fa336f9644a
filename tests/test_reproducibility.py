"""Provenance of the model repository: the same seed gives the same model, and every command a
committed manifest records still parses with today's CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "models").glob("*/*/manifest.json"))

# What two runs of the same training legitimately differ in: when they ran and how long.
_RUN_FIELDS = ("created_at",)
_RUN_METRICS = ("train_seconds",)


def _without_run_fields(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k not in _RUN_FIELDS}
    for metrics in [out["metrics"], *(v["metrics"] for v in out["variants"].values())]:
        for key in _RUN_METRICS:
            metrics.pop(key, None)
    return out


@pytest.mark.train
@pytest.mark.parametrize("name", ["pos-en", "polarity-en"])
def test_same_seed_trains_bit_identical_lstm_models(model_repo, lstm_rebuild, name):
    """The tiny LSTMs trained again in a fresh interpreter (another PYTHONHASHSEED, so set and
    dict-of-str iteration orders differ) give the same ONNX bytes, tokenizer, character
    vocabulary and manifest (time fields aside) as the session's build of the same seed."""
    first, again = model_repo / name / "1", lstm_rebuild / name / "1"
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for f in sorted(files, key=lambda f: f == "manifest.json"):  # the bytes first, then figures
        if f == "manifest.json":
            a, b = (json.loads((d / f).read_text()) for d in (first, again))
            assert _without_run_fields(a) == _without_run_fields(b)
        else:
            assert (first / f).read_bytes() == (again / f).read_bytes(), f"{name}/{f} differs"


# ------------------------------------------------------------------ recorded commands
def _recorded_commands(value, where: str = ""):
    """(field path, command line) for every ``*command`` string in a manifest."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k.endswith("command") and isinstance(v, str):
                yield f"{where}{k}", v
            else:
                yield from _recorded_commands(v, f"{where}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _recorded_commands(v, f"{where}{i}.")


def _parse(line: str):
    """Parse a recorded ``nlpserve ...`` line with today's CLI without running it; raises
    (click's UsageError/NoSuchOption/BadParameter) where today's CLI would refuse it."""
    import typer

    from service.cli import app
    from training.cli import register

    if not any(g.name == "train" for g in app.registered_groups):
        register(app)
    args = shlex.split(line)
    if args[:1] != ["nlpserve"]:
        raise ValueError(f"not an nlpserve command: {line}")
    cmd, path = typer.main.get_command(app), []
    args = args[1:]
    while hasattr(cmd, "commands"):  # a group: descend by the next word
        word = args.pop(0)
        path.append(word)
        if word not in cmd.commands:
            raise LookupError(f"no command {' '.join(path)!r}")
        cmd = cmd.commands[word]
    return path, cmd.make_context(" ".join(["nlpserve", *path]), args).params


def test_parse_refuses_what_todays_cli_would():
    assert _parse("nlpserve train pos --data d --epochs 3")[1]["epochs"] == 3
    with pytest.raises(Exception, match="--no-such-flag"):
        _parse("nlpserve train pos --data d --no-such-flag 1")
    with pytest.raises(LookupError):
        _parse("nlpserve train nonsense --data d")


_COMMANDS = [
    pytest.param(line, id=f"{m.parent.parent.name}:{field}")
    for m in COMMITTED
    for field, line in _recorded_commands(json.loads(m.read_text()))
]


@pytest.mark.skipif(not _COMMANDS, reason="no committed models")
@pytest.mark.parametrize("line", _COMMANDS)
def test_committed_commands_run_as_written_with_todays_cli(line):
    """Each recorded command (the model's own, its pretraining's and earlier rounds') names
    options today's ``nlpserve`` has, with values it accepts, and no absolute path."""
    if " train detector" in line or " train qa" in line or " pretrain" in line:
        pytest.importorskip("transformers")
    path, params = _parse(line)
    assert path[0] in ("train", "pretrain")
    assert not [a for a in shlex.split(line) if a.startswith(("/", "~"))], line
    assert params.get("data") is not None, "the data root is part of the command"


_TRAINED_HERE = [
    pytest.param(m, id=m.parent.parent.name)
    for m in COMMITTED
    if "amp" in (hp := json.loads(m.read_text())["hyperparameters"]) and hp.get("steps")
]


@pytest.mark.skipif(not _TRAINED_HERE, reason="no committed transformer trained by its command")
@pytest.mark.parametrize("manifest", _TRAINED_HERE)
def test_committed_command_trains_in_the_recorded_precision_on_any_cpu(manifest):
    """--amp autocasts to bf16 only on CPUs with native bf16: a model that trained in fp32
    must record the precision it ran in and a command that asks for fp32 (--no-amp), else
    the same command trains another model on an AVX512-BF16 machine."""
    m = json.loads(manifest.read_text())
    hp = m["hyperparameters"]
    assert "autocast" in hp, "the manifest does not say which precision the run trained in"
    pytest.importorskip("transformers")
    _, params = _parse(m["command"])
    assert _amp_says_the_recorded_precision(hp["autocast"], params["amp"]), m["command"]


def _amp_says_the_recorded_precision(autocast: str | None, amp: bool) -> bool:
    """A run in fp32 needs --no-amp to train in fp32 everywhere (--amp autocasts on CUDA
    always, on a CPU with native bf16); a run under autocast needs --amp."""
    return amp is (autocast is not None)


@pytest.mark.parametrize(
    ("autocast", "amp", "ok"),
    [
        (None, False, True),  # fp32, --no-amp: fp32 on any device
        (None, True, False),  # fp32 on a CPU without bf16; bf16 on another CPU or CUDA
        ("bfloat16", True, True),
        ("float16", True, True),
        ("bfloat16", False, False),  # --no-amp would train in fp32
    ],
)
def test_amp_must_say_the_recorded_precision_on_any_device(autocast, amp, ok):
    """On CUDA --amp always autocasts, so a CUDA run in fp32 has --no-amp (it was held to
    --amp there, the opposite)."""
    assert _amp_says_the_recorded_precision(autocast, amp) is ok


def test_published_detector_records_the_round_its_base_came_from(model_repo, tmp_path):
    """detector-en's command starts from a checkpoint its first round made (`make
    models-detector`); the published manifest keeps that round's command, scores, steps and
    precision (`--earlier`), so the entry says how to make its base."""
    from service.repository import load_manifest
    from training.transformer.publish import publish_entry

    src = model_repo / "detector-en" / "1"
    if not src.is_dir():
        pytest.skip("no tiny detector-en (see the session's build errors)")
    first = load_manifest(src)
    publish_entry(src, tmp_path / "detector-en" / "1", ["int8"], earlier=[src])
    (rec,) = load_manifest(tmp_path / "detector-en" / "1").hyperparameters["earlier_rounds"]
    assert rec["command"] == first.command
    assert rec["accuracy"] == first.metrics["accuracy"]
    assert rec["roc_auc"] == first.metrics["roc_auc"]
    assert rec["steps"] == first.hyperparameters["steps"] > 0
    assert rec["autocast"] == first.hyperparameters["autocast"]
