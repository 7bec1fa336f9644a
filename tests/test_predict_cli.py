"""`nlpserve predict`: a JSON Lines file answered offline, line for line as /v1 answers it.

The answers are compared with the real HTTP service's over the same tiny models (each line
posted as a request body of its own), items of very different lengths mixed so that the
length-sorted batches reorder them; stdin/stdout go through a real `nlpserve` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.builders import FILLER
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    LiveServer,
    diverged_detector_repo,
    live_server,
    make_settings,
    require_model,
    rounded,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[1]

# Settings both sides run under (the live server's are tests/service_support.make_settings').
ENV = {
    "NLPSERVE_PROVIDERS": "CPUExecutionProvider",
    "NLPSERVE_INTRA_OP_THREADS": "1",
    "NLPSERVE_INTER_OP_THREADS": "1",
    "NLPSERVE_MAX_BATCH_SIZE": "32",
    "NLPSERVE_MAX_BATCH_TOKENS": "4096",
    "NLPSERVE_MAX_QUEUE_DEPTH": "256",
    "NLPSERVE_LOG_LEVEL": "WARNING",
    # int8 answers move with their batch-mates (dynamic quantisation: docs/service.md), in
    # the service as here; fp32 ones only by float rounding, which `rounded` leaves out
    "NLPSERVE_VARIANT": "fp32",
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fp32_service(model_repo: Path):
    """The real HTTP service over the tiny models, under the settings of ENV."""
    async with live_server(make_settings(model_repo, variant="fp32")) as srv:
        yield srv


def _words(n: int, offset: int = 0) -> str:
    return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n))


# Bad lines every task refuses the same way: not JSON, a typo'd field, not an object, too
# many characters (NLPSERVE_MAX_TEXT_CHARS, 20,000 by default).
_BAD = [
    '{"text": ',
    '{"txt": "the movie"}',
    "[1, 2]",
    json.dumps({"text": "a" * 20_001}),
]


def _lines(task: str) -> list[str]:
    """Items of very different lengths (a few words to over the model's max length) mixed
    with bad lines and a blank line: sorted batching moves every one of them."""
    if task == "qa":
        good: list[dict[str, Any]] = [
            {"question": "谁发明了造纸术？", "context": "东汉的蔡伦改进了造纸术。"},
            {"question": "长城有多长？", "context": "长城总长度超过两万千米。" * 12},  # windows
            {"question": "什么？", "context": "是。"},
            {"question": "长城是什么？", "context": "长城是中国古代的军事防御工程。" * 3},
            # the per-item options: answers listed, over windows
            {"question": "长城有多长？", "context": "长城总长度超过两万千米。" * 9, "top_k": 4,
             "max_answer_length": 5},
        ]  # fmt: skip
        bad = [
            *_BAD[:3],
            json.dumps({"question": "谁？", "context": " "}),
            json.dumps({"question": "谁？", "context": "是。", "top_k": 0}),
        ]
    elif task == "pos":
        good = [
            {"text": _words(3)},
            {"text": _words(60, 1)},
            {"tokens": ["the", "movie", "was", "good", "."]},
            {"text": _words(1)},
            {"tokens": _words(40, 2).split()},
            {"text": _words(9, 3), "scores": True},
        ]
        bad = [*_BAD, json.dumps({"text": _words(80)}), json.dumps({"text": "x", "tokens": ["x"]})]
    else:
        good = [
            {"text": _words(2)},
            {"text": _words(200, 3)},  # over the max length: truncated
            {"text": _words(7, 5) + " !"},
            {"text": _words(25, 1)},
            {"text": "the"},
            {"text": _words(12, 9)},
        ]
        bad = _BAD
        if task == "detect":  # the whole text, in windows
            good.append({"text": _words(200, 4), "windows": True})
            bad = [*bad, json.dumps({"text": "the", "windows": "yes"})]
    lines = [json.dumps(g, ensure_ascii=False) for g in good]
    # bad lines between good ones, and a blank one
    for i, b in enumerate(bad):
        lines.insert(1 + 2 * i, b)
    lines.insert(3, "")
    return lines


def _run(cli, *args: Any, input_lines: list[str], tmp_path: Path, extra_env=None):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(input_lines) + "\n", encoding="utf-8")
    env = {**ENV, **(extra_env or {})}
    return cli("predict", *args, "--input", src, env=env)


async def _api_answer(client: httpx.AsyncClient, task: str, model: str, line: str) -> Any:
    r = await client.post(
        f"/v1/{task}",
        params={"model": model},
        content=line.encode("utf-8"),
        headers={"content-type": "application/json"},
    )
    body = r.json()
    if r.status_code == 200:
        return rounded(body)
    return {"status": r.status_code, "error": body["error"]}


@pytest.mark.parametrize(
    ("task", "model"),
    [("detect", DETECT_MODEL), ("polarity", POLARITY_MODEL), ("pos", POS_MODEL), ("qa", QA_MODEL)],
)
async def test_answers_are_the_http_apis_line_for_line(
    cli, model_repo, fp32_service: LiveServer, task, model, tmp_path
):
    require_model(model_repo, model)
    lines = _lines(task)
    result = _run(cli, model, "--models", model_repo, input_lines=lines, tmp_path=tmp_path)
    assert result.exit_code == 1, result.stderr  # some lines failed
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines), result.stdout
    async with fp32_service.client() as client:
        for number, (line, got) in enumerate(zip(lines, out, strict=False), start=1):
            if not line:
                assert got == "", f"line {number}: a blank line is answered by a blank line"
                continue
            want = await _api_answer(client, task, model, line)
            answer = json.loads(got)
            if "error" in want:
                assert answer == {"line": number, **want}, f"line {number}: {line[:80]}"
            else:
                assert rounded(answer) == want, f"line {number}: {line[:80]}"
    n_bad = sum(1 for line in out if line.startswith('{"line"'))
    assert n_bad >= 3
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"nlpserve predict: {model}/1")
    items = sum(1 for line in lines if line)
    assert f": {items} items, {n_bad} errors," in summary
    assert "items/s" in summary and "padding efficiency" in summary


async def test_order_kept_across_length_sorted_batches_and_chunks(cli, model_repo, tmp_path):
    """POS answers echo their tokens: each output line must be its own input's, whatever
    batch and chunk it ran in (lengths 1..60 shuffled, chunks of 7 lines, batches of 4)."""
    lengths = [1 + (i * 37) % 60 for i in range(45)]
    lines = [json.dumps({"tokens": _words(n, i).split()}) for i, n in enumerate(lengths)]
    whole = _run(cli, POS_MODEL, "--models", model_repo, input_lines=lines, tmp_path=tmp_path)
    assert whole.exit_code == 0, whole.stderr
    chunked = _run(
        cli,
        POS_MODEL,
        "--models",
        model_repo,
        "--chunk-lines",
        7,
        "--batch-size",
        4,
        input_lines=lines,
        tmp_path=tmp_path,
    )
    assert chunked.exit_code == 0, chunked.stderr
    for result in (whole, chunked):
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        assert [a["tokens"] for a in answers] == [json.loads(x)["tokens"] for x in lines]
    assert [rounded(json.loads(x)) for x in chunked.stdout.splitlines()] == [
        rounded(json.loads(x)) for x in whole.stdout.splitlines()
    ]
    # 45 lines in chunks of 7 and batches of at most 4: at least 7 chunks' worth of batches
    assert int(chunked.stderr.split(" batches,")[0].rsplit(" ", 1)[1]) >= 12


async def test_sorted_batches_pad_less_than_arrival_order(cli, model_repo, tmp_path):
    """The point of sorting: lengths alternating 1 and 60 in batches of 2 would pad to 0.51
    in arrival order; sorted, each batch holds equal lengths."""
    lines = [json.dumps({"tokens": _words(1 if i % 2 else 60).split()}) for i in range(40)]
    args = (POS_MODEL, "--models", model_repo, "--batch-size", 2)
    result = _run(cli, *args, input_lines=lines, tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "padding efficiency 1.000" in result.stderr


async def test_a_line_the_model_fails_on_is_the_apis_inference_failed(cli, model_repo, tmp_path):
    """A diverged model (the unknown-word embedding is NaN): the batch holding the bad line
    fails, each of its lines is rerun alone, and only the bad one gets an error line, the
    one /v1 answers it with."""
    repo = diverged_detector_repo(model_repo, tmp_path / "diverged")
    lines = [json.dumps({"text": t}) for t in ("a truly great film", "a zebra", "the movie")]
    args = (DETECT_MODEL, "--models", repo, "--batch-size", 8)
    result = _run(cli, *args, input_lines=lines, tmp_path=tmp_path)
    assert result.exit_code == 1, result.stderr
    out = result.stdout.splitlines()
    async with (
        live_server(make_settings(repo, variant="fp32")) as srv,
        srv.client() as client,
    ):
        want = [await _api_answer(client, "detect", DETECT_MODEL, line) for line in lines]
    assert want[1]["error"]["code"] == "inference_failed"
    assert json.loads(out[1]) == {"line": 2, **want[1]}
    assert [rounded(json.loads(out[i])) for i in (0, 2)] == [want[0], want[2]]


async def test_fail_fast_stops_after_the_first_failed_line(cli, model_repo, tmp_path):
    lines = [json.dumps({"text": _words(3)}), "oops", json.dumps({"text": _words(4)})]
    result = _run(
        cli, POLARITY_MODEL, "--models", model_repo, "--fail-fast", input_lines=lines,
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1
    out = result.stdout.splitlines()
    assert len(out) == 2 and json.loads(out[1])["line"] == 2
    assert json.loads(out[1])["error"]["code"] == "invalid_json"
    assert "first failed line: 2 (invalid_json" in result.stderr


async def test_output_file_and_every_line_good_exits_0(cli, model_repo, tmp_path):
    lines = [json.dumps({"text": _words(n)}) for n in (3, 30, 1)]
    dest = tmp_path / "out.jsonl"
    args = (POLARITY_MODEL, "--models", model_repo, "--output", dest)
    result = _run(cli, *args, input_lines=lines, tmp_path=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    answers = [json.loads(x) for x in dest.read_text(encoding="utf-8").splitlines()]
    assert [a["label"] in ("positive", "negative") for a in answers] == [True] * 3


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("no-such-model",), "no model 'no-such-model' in"),
        ((POS_MODEL, "--version", "7"), "pos-en has no version '7'"),
        ((POS_MODEL, "--variant", "fp16"), "NLPSERVE_VARIANT: pos-en has no variant 'fp16'"),
    ],
)
async def test_unknown_model_version_or_variant_exits_2_in_one_line(
    cli, model_repo, tmp_path, args, says
):
    result = _run(cli, *args, "--models", model_repo, input_lines=["{}"], tmp_path=tmp_path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_output_over_its_own_input_is_refused(cli, model_repo, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "the movie"}\n')
    result = cli("predict", POLARITY_MODEL, "--models", model_repo, "-i", src, "-o", src, env=ENV)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"nlpserve: --output {src} is the input file"
    assert src.read_text() == '{"text": "the movie"}\n'


async def test_bad_setting_exits_2_in_one_line(cli, model_repo, tmp_path):
    result = _run(
        cli, POS_MODEL, "--models", model_repo, input_lines=["{}"], tmp_path=tmp_path,
        extra_env={"NLPSERVE_MAX_BATCH_SIZE": "0"},
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("nlpserve: invalid setting: NLPSERVE_MAX_BATCH_SIZE")


def _command_env() -> tuple[list[str], dict[str, str]]:
    """The installed console script (its `service` is this checkout's: PYTHONPATH) and its
    environment, without the caller's NLPSERVE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env.update(ENV, PYTHONPATH=str(ROOT))
    script = Path(sys.executable).with_name("nlpserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    return command, env


def _nlpserve(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    command, env = _command_env()
    return subprocess.run(
        [*command, "predict", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )


async def test_stdin_to_stdout_in_a_real_process(model_repo):
    """`-` (the default) for both: piped, so no progress line (stderr is not a terminal)
    unless --progress asks for it."""
    lines = [json.dumps({"text": _words(n, n)}) for n in (40, 2, 9)] + ["{}"]
    r = _nlpserve(POLARITY_MODEL, "--models", str(model_repo), "-i", "-", stdin="\n".join(lines))
    assert r.returncode == 1, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [a.get("label") is not None for a in out] == [True, True, True, False]
    assert out[3]["error"]["code"] == "missing_field" and out[3]["line"] == 4
    progress = [x for x in r.stderr.splitlines() if x.endswith("items/s")]
    assert progress == []
    assert r.stderr.splitlines()[-1].startswith("nlpserve predict: polarity-en/1")
    forced = _nlpserve(POLARITY_MODEL, "--models", str(model_repo), "--progress", stdin=lines[0])
    assert forced.returncode == 0, forced.stderr
    # text mode reads its "\r" as a line end
    assert (
        [x for x in forced.stderr.splitlines() if x.endswith("items/s")]
        == [x for x in forced.stderr.splitlines() if x.startswith("1 items, 0 errors, ")]
        != []
    )
    missing = _nlpserve(POLARITY_MODEL, "--models", str(model_repo), "-i", "nope.jsonl", stdin="")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "nlpserve: FileNotFoundError: [Errno 2] No such file or directory: 'nope.jsonl'"
    ]


def _spawn_many(
    model_repo: Path, tmp_path: Path, n: int, *extra: str, **popen: Any
) -> subprocess.Popen[bytes]:
    """`nlpserve predict` over ``n`` polarity lines in chunks of 64, its pipes open."""
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": _words(i % 30 + 1, i)}) + "\n" for i in range(n)))
    command, env = _command_env()
    args = ["predict", POLARITY_MODEL, "--models", str(model_repo), "-i", str(src), *extra]
    return subprocess.Popen(
        [*command, *args, "--chunk-lines", "64"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


async def test_a_reader_gone_first_ends_quietly(model_repo, tmp_path):
    """`nlpserve predict ... | head -1`: the pipe closes after the first line; the command
    ends with 141 (128 + SIGPIPE) and no traceback."""
    proc = _spawn_many(model_repo, tmp_path, 20_000)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert json.loads(first)["label"]
    proc.stdout.close()  # the reader leaves, as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


async def test_a_line_over_the_body_limit_is_the_apis_413(cli, model_repo, tmp_path):
    """A line is a request body: over NLPSERVE_MAX_BODY_BYTES it gets /v1's 413, and is
    skipped, not held whole in memory (a file with no newline would be one line). At the
    limit it is answered; its line end (CRLF too) is not part of it; the last line may lack
    one."""
    limit = 200

    def sized(n: int) -> bytes:
        head = b'{"text": "the movie '
        return head + b"a" * (n - len(head) - 2) + b'"}'

    lines = [sized(limit), sized(limit + 1), sized(limit) + b"\r", sized(5 * limit)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines))  # the last line has no newline
    env = {**ENV, "NLPSERVE_MAX_BODY_BYTES": str(limit)}
    result = cli("predict", POLARITY_MODEL, "--models", model_repo, "-i", src, env=env)
    assert result.exit_code == 1, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == len(lines), (result.stdout, repr(result.exception))
    settings = make_settings(model_repo, variant="fp32", max_body_bytes=limit)
    async with live_server(settings) as srv, srv.client() as client:
        for number, (line, got) in enumerate(zip(lines, out, strict=True), start=1):
            body = line.rstrip(b"\r").decode()  # the line end is no part of the body
            want = await _api_answer(client, "polarity", POLARITY_MODEL, body)
            answer = json.loads(got)
            if "error" in want:
                assert want["status"] == 413 and answer == {"line": number, **want}, number
            else:
                assert rounded(answer) == want, number
    assert [json.loads(x).get("status") for x in out] == [None, 413, None, 413]


async def test_a_line_of_too_many_qa_windows_is_the_apis_422_with_its_limit(
    cli, model_repo, tmp_path
):
    """A context of more QA windows than NLPSERVE_MAX_REQUEST_SEQUENCES: /v1's 422
    input_too_long, its ``limit`` (model sequences) included, line for line."""
    require_model(model_repo, QA_MODEL)
    lines = [
        json.dumps(
            {"question": "首都？", "context": "中国的首都是北京，它有三千多年的历史。" * 14}
        ),
        json.dumps({"question": "首都？", "context": "中国的首都是北京。"}),
    ]
    env = {"NLPSERVE_MAX_REQUEST_SEQUENCES": "3", "NLPSERVE_MAX_BATCH_ITEMS": "3"}
    result = _run(cli, QA_MODEL, "--models", model_repo, input_lines=lines, tmp_path=tmp_path,
                  extra_env=env)  # fmt: skip
    assert result.exit_code == 1, result.stderr
    out = result.stdout.splitlines()
    settings = make_settings(model_repo, variant="fp32", max_request_sequences=3, max_batch_items=3)
    async with live_server(settings) as srv, srv.client() as client:
        wants = [await _api_answer(client, "qa", QA_MODEL, line) for line in lines]
    assert wants[0]["error"]["limit"] == {"name": "max_request_sequences", "value": 3}
    assert json.loads(out[0]) == {"line": 1, **wants[0]}
    assert "error" not in wants[1] and rounded(json.loads(out[1])) == wants[1]


@pytest.mark.parametrize(
    ("bad", "code"), [("oops", "invalid_json"), ('{"text": " "}', "empty_text")]
)
async def test_fail_fast_runs_nothing_past_the_failed_line(cli, model_repo, tmp_path, bad, code):
    """--fail-fast stops promptly: a line refused before inference (unparsable, or refused
    by the task) ends the reading there, and the lines after it, in its chunk or the next
    (read ahead), never go to the model. Chunks of 2 lines, batches of 1: the three good
    lines before the bad one are the only batches."""
    good = [json.dumps({"text": _words(n)}) for n in range(1, 30)]
    lines = [*good[:3], bad, *good[3:]]
    args = (POLARITY_MODEL, "--models", model_repo, "--fail-fast", "--chunk-lines", 2)
    result = _run(cli, *args, "--batch-size", 1, input_lines=lines, tmp_path=tmp_path)
    assert result.exit_code == 1, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 4 and json.loads(out[3])["error"]["code"] == code, out
    summary = result.stderr.strip().splitlines()[-1]
    assert ": 4 items, 1 errors," in summary and " 3 batches," in summary, summary


def interrupted_after_first(model_repo: Path, tmp_path: Path, n: int, *extra: str) -> list[str]:
    """The output lines of a predict run over ``n`` lines sent SIGINT once its first answer is
    out, checked: exit status 130, no traceback, and one stderr line saying how many lines
    were answered, as many as the output holds, fewer than ``n``."""
    proc = _spawn_many(
        model_repo,
        tmp_path,
        n,
        *extra,
        # a test run started in the background ignores SIGINT, and its children would too
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert first.strip()
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err, err
    (said,) = [x for x in err.splitlines() if "interrupted" in x]
    answered = int(said.split("interrupted after ")[1].split(" ")[0])
    out = (first + rest).decode().splitlines()
    assert 0 < answered == len(out) < n, (said, len(out))
    return out


async def test_ctrl_c_ends_with_130_and_one_line(model_repo, tmp_path):
    """SIGINT mid-run (after the first answers are out): exit status 130, one line on stderr
    saying how many lines were answered, as many whole lines in the output, no traceback."""
    out = interrupted_after_first(model_repo, tmp_path, 50_000)
    assert [json.loads(x)["label"] in ("positive", "negative") for x in out] == [True] * len(out)
