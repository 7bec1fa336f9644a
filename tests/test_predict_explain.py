"""`nlpserve predict --explain`: a JSON Lines file explained offline, line for line as the
live /v1/<task>/explain endpoint answers it (the tiny trained models, fp32, real HTTP).

Explanations are deterministic for a given model output (seeded tie-breaks,
service/explain/ties.py); fp32 outputs move only by float rounding with their batch's
padding, so values are compared to 1e-6 and everything else exactly (`seconds` and `cached`
aside: time, and whether this server explained the text before).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import test_predict_cli
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    LiveServer,
    live_server,
    make_settings,
    require_model,
)
from tests.test_predict_cli import ENV, _words, interrupted_after_first

pytest.importorskip("shap", reason="the explain extra (shap) is not installed")
pytestmark = pytest.mark.asyncio(loop_scope="session")

TOL = 1e-6
_FLOATS = ("values", "base_value", "output")
_VARIES = ("seconds", "cached")
# the real HTTP service over the tiny models, fp32 (a module-scoped fixture of its own here)
fp32_service = test_predict_cli.fp32_service


def _lines() -> list[str]:
    """Texts of very different lengths (one over the max length: truncated), a repeated
    word, a max_evals of the line's own, and the explain endpoint's refusals between them."""
    good: list[dict[str, Any]] = [
        {"text": _words(6)},
        {"text": _words(200, 3)},  # cut where the model stops reading
        {"text": "the"},  # one token: its exact Shapley value, two model calls
        {"text": "good good good bad bad movie movie !", "max_evals": 40},  # ties
        {"text": _words(25, 1), "max_evals": 100},
    ]
    bad = [
        '{"text": ',  # invalid_json
        '{"text": "a film", "max_evals": 2}',  # below 4: the schema's invalid_request
        '{"text": "a film", "max_evals": 5000}',  # over the limit: invalid_explain_request
        json.dumps({"text": "a" * 20_001}),  # text_too_long (NLPSERVE_MAX_TEXT_CHARS)
        '{"text": "a film", "model": "x"}',  # unknown_field
    ]
    lines = [json.dumps(g) for g in good]
    for i, b in enumerate(bad):
        lines.insert(1 + 2 * i, b)
    lines.insert(3, "")  # a blank line is answered by a blank line
    return lines


async def _run(cli, model: str, repo: Path, lines: list[str], tmp_path: Path, *args: Any):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # in a thread: the command runs its own event loop (asyncio.run), and the tests' loop
    # keeps serving the live endpoint meanwhile
    return await asyncio.to_thread(
        cli, "predict", model, "--models", repo, "--explain", "--input", src, *args, env=ENV
    )


async def _api_answer(client: httpx.AsyncClient, task: str, model: str, line: str) -> Any:
    r = await client.post(
        f"/v1/{task}/explain",
        params={"model": model},
        content=line.encode("utf-8"),
        headers={"content-type": "application/json"},
    )
    body = r.json()
    if r.status_code == 200:
        return body
    return {"status": r.status_code, "error": body["error"]}


def _same(got: dict, want: dict) -> None:
    """An explanation of the CLI equals the endpoint's: exactly, floats to TOL."""
    assert {k: v for k, v in got.items() if k not in (*_FLOATS, *_VARIES)} == {
        k: v for k, v in want.items() if k not in (*_FLOATS, *_VARIES)
    }
    assert got["values"] == pytest.approx(want["values"], abs=TOL)
    assert got["base_value"] == pytest.approx(want["base_value"], abs=TOL)
    assert got["output"] == pytest.approx(want["output"], abs=TOL)


@pytest.mark.parametrize(
    ("task", "model"), [("detect", DETECT_MODEL), ("polarity", POLARITY_MODEL)]
)
async def test_explanations_are_the_live_endpoints_line_for_line(
    cli, model_repo, fp32_service: LiveServer, task, model, tmp_path
):
    require_model(model_repo, model)
    lines = _lines()
    # two lines a chunk: the answers cross chunks and keep their order
    r = await _run(cli, model, model_repo, lines, tmp_path, "--chunk-lines", "2")
    assert r.exit_code == 1, (r.output, r.exception)  # some lines are refused
    out = r.stdout.splitlines()
    assert len(out) == len(lines)
    async with fp32_service.client() as client:
        for number, (line, answer) in enumerate(zip(lines, out, strict=True), start=1):
            if not line:
                assert answer == ""
                continue
            got, want = json.loads(answer), await _api_answer(client, task, model, line)
            if "status" in want:
                assert got == {"line": number, **want}, line
            else:
                assert "status" not in got, (line, got)
                _same(got, want)
    # the additivity the endpoint promises holds offline too
    for answer in filter(None, out):
        got = json.loads(answer)
        if "values" in got:
            assert got["base_value"] + sum(got["values"]) == pytest.approx(got["output"], abs=1e-9)
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"nlpserve predict --explain: {model}/")
    assert "5 errors" in summary and "items/s" in summary and "model evaluations" in summary


async def test_a_repeated_text_is_explained_once(cli, model_repo, tmp_path):
    """The endpoint's cache (NLPSERVE_EXPLAIN_CACHE_SIZE): a later line with the same text is
    answered from it, as the endpoint answers a repeated request."""
    require_model(model_repo, POLARITY_MODEL)
    line = json.dumps({"text": _words(9, 2), "max_evals": 60})
    one = await _run(cli, POLARITY_MODEL, model_repo, [line], tmp_path)
    many = await _run(cli, POLARITY_MODEL, model_repo, [line, line], tmp_path, "--chunk-lines", "1")
    assert one.exit_code == 0 and many.exit_code == 0, many.output
    first, again = (json.loads(x) for x in many.stdout.splitlines())
    assert (first["cached"], again["cached"]) == (False, True)
    assert again["values"] == first["values"] == json.loads(one.stdout)["values"]

    def evals(r):
        return int(r.stderr.split(" model evaluations")[0].rsplit(" ", 1)[1])

    assert evals(many) == evals(one) == first["evals"]
    # both lines in one chunk: the second joins the first's explanation while it runs
    joined = await _run(cli, POLARITY_MODEL, model_repo, [line, line], tmp_path)
    assert joined.exit_code == 0, joined.output
    assert [json.loads(x)["values"] for x in joined.stdout.splitlines()] == [first["values"]] * 2
    assert evals(joined) == first["evals"]


async def test_fail_fast_stops_at_the_first_refused_line(cli, model_repo, tmp_path):
    require_model(model_repo, POLARITY_MODEL)
    lines = [json.dumps({"text": "a fine film"}), '{"txt": "x"}', json.dumps({"text": "bad"})]
    r = await _run(cli, POLARITY_MODEL, model_repo, lines, tmp_path, "--fail-fast")
    assert r.exit_code == 1
    out = r.stdout.splitlines()
    assert len(out) == 2 and json.loads(out[0])["tokens"] == ["a", "fine", "film"]
    assert json.loads(out[1])["error"]["code"] == "missing_field"
    assert "(stopped: --fail-fast)" in r.stderr


class _CountingOutput(io.StringIO):
    """An output that notes, at each line written, how many lines' explanations are started
    and not yet written (their tasks: what a chunk holds beyond its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: list[int] = []

    def write(self, s: str) -> int:
        started = [t for t in asyncio.all_tasks() if not t.done()]
        names = [getattr(t.get_coro(), "__qualname__", "") for t in started]
        self.in_flight.append(names.count("BulkExplainer.explain"))
        return super().write(s)


async def test_a_chunk_holds_a_bounded_number_of_explanations(model_repo):
    """A 4096-line chunk of long texts must not start all of its explanations at once (each a
    task, its answer held until the lines before it are written): at most AHEAD_PER_SLOT per
    NLPSERVE_EXPLAIN_CONCURRENCY slot are started ahead of the line being written."""
    from service.bulk_explain import AHEAD_PER_SLOT, explain_stream
    from service.cli import _explainer, _predict_model

    require_model(model_repo, POLARITY_MODEL)
    settings = make_settings(
        model_repo, variant="fp32", explain_concurrency=1, explain_cache_size=2
    )
    explainer = _explainer(settings, _predict_model(settings, POLARITY_MODEL, None))
    n = 6 * AHEAD_PER_SLOT
    lines = [json.dumps({"text": _words(4, i), "max_evals": 8}) for i in range(n)]
    out = _CountingOutput()
    stats = await explain_stream(
        explainer, io.BytesIO(("\n".join(lines) + "\n").encode()), out, chunk_lines=4096
    )
    assert stats.lines == n and stats.errors == 0
    assert len(out.getvalue().splitlines()) == n
    assert len(out.in_flight) == n and 0 < max(out.in_flight) <= AHEAD_PER_SLOT
    assert len(explainer.computed) <= settings.explain_cache_size  # only what the cache holds


async def test_ctrl_c_is_not_lost_in_an_explanation_that_swallows_its_cancellation(model_repo):
    """Ctrl-C cancels explain_stream's task. A cancellation passed on into the explanation it
    awaits can be lost there (Python 3.11's wait_for returns the result of a future that
    finished as the cancellation came; CI saw a run go on to its 500th line and exit 0): the
    stream must end cancelled all the same, at once, its started explanations cancelled."""
    from service.bulk_explain import explain_stream
    from service.cli import _explainer, _predict_model

    require_model(model_repo, POLARITY_MODEL)
    settings = make_settings(model_repo, variant="fp32")
    explainer = _explainer(settings, _predict_model(settings, POLARITY_MODEL, None))
    explain = explainer.explain
    entered = asyncio.Event()

    async def swallowing(req: Any) -> Any:
        entered.set()
        # as wait_for does when its future finished with the cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)
        return await explain(req)

    explainer.explain = swallowing  # type: ignore[method-assign]
    lines = [json.dumps({"text": _words(4, i), "max_evals": 8}) for i in range(40)]
    out = io.StringIO()
    run = asyncio.ensure_future(
        explain_stream(
            explainer, io.BytesIO(("\n".join(lines) + "\n").encode()), out, chunk_lines=4096
        )  # fmt: skip
    )
    await asyncio.wait_for(entered.wait(), 30)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 30)
    assert len(out.getvalue().splitlines()) < len(lines)


async def _explain_offline(
    model_repo: Path, lines: list[str], deadline_ms: int | None = None, **overrides: Any
) -> list[dict]:
    from service.bulk_explain import explain_stream
    from service.cli import _explainer, _predict_model

    settings = make_settings(model_repo, variant="fp32", **overrides)
    explainer = _explainer(settings, _predict_model(settings, POLARITY_MODEL, None), deadline_ms)
    out = io.StringIO()
    src = io.BytesIO(("\n".join(lines) + "\n").encode())
    await explain_stream(explainer, src, out, chunk_lines=4096)
    return [json.loads(x) for x in out.getvalue().splitlines()]


async def test_a_line_over_the_body_limit_is_the_endpoints_413_with_its_limit(model_repo):
    """A line over NLPSERVE_MAX_BODY_BYTES, skipped unread: the live endpoint's 413 for that
    body, ``limit`` included (as `nlpserve predict` without --explain answers it)."""
    require_model(model_repo, POLARITY_MODEL)
    limit = 200
    line = json.dumps({"text": "a" * limit})
    out = await _explain_offline(model_repo, [line], max_body_bytes=limit)
    settings = make_settings(model_repo, variant="fp32", max_body_bytes=limit)
    async with live_server(settings) as srv, srv.client() as client:
        want = await _api_answer(client, "polarity", POLARITY_MODEL, line)
    assert want["error"]["limit"] == {"name": "max_body_bytes", "value": limit}
    assert out == [{"line": 1, **want}]


async def test_a_small_queue_depth_makes_lines_wait_not_fail(model_repo):
    """Explanations running at once can queue more masked variants than
    NLPSERVE_MAX_QUEUE_DEPTH admits (the live endpoint answers 429 then, to be retried):
    offline, no line fails queue_full; the answers are those of one explanation at a time."""
    require_model(model_repo, POLARITY_MODEL)
    lines = [json.dumps({"text": _words(8, i), "max_evals": 60}) for i in range(12)]
    small = {"max_queue_depth": 8, "max_batch_size": 8, "inference_threads": 1}
    many = await _explain_offline(model_repo, lines, explain_concurrency=8, **small)
    assert [a.get("error", {}).get("code") for a in many] == [None] * len(lines)
    one = await _explain_offline(model_repo, lines, explain_concurrency=1, **small)
    for got, want in zip(many, one, strict=True):
        _same(got, want)


@pytest.mark.parametrize("model", [POS_MODEL, QA_MODEL])
async def test_a_model_without_explanations_exits_2_in_one_line(cli, model_repo, tmp_path, model):
    require_model(model_repo, model)
    r = await _run(cli, model, model_repo, [json.dumps({"text": "x"})], tmp_path)
    assert r.exit_code == 2
    assert r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert f"--explain: {model} is a" in line and "has no explanations" in line
    assert "/v1/detect/explain" in line and "/v1/polarity/explain" in line


async def test_ctrl_c_ends_with_130_and_one_line(model_repo, tmp_path):
    """SIGINT while explanations run (the service's threads and queue, an event loop):
    exit status 130, one line saying how many lines were answered, whole lines, no
    traceback, and the process does not hang on its explainer threads."""
    require_model(model_repo, POLARITY_MODEL)
    out = interrupted_after_first(model_repo, tmp_path, 500, "--explain")
    assert all(json.loads(x)["output_name"] == "positive_probability" for x in out)


# The engine's 504s (service/explain/engine.py), their measured numbers aside. Which one a
# tiny deadline meets is a race (whether the explanation's thread started before the timer
# fired), in the endpoint as here.
_DEADLINE_MESSAGES = {
    "the explanation did not finish before its deadline: N of N model evaluations done in N s; "
    "ask for a smaller max_evals (or send a shorter text)",
    "the explanation did not start before its deadline: N s waiting for a free explanation "
    "slot (N run at once, NLPSERVE_EXPLAIN_CONCURRENCY); retry later, or with a longer "
    "X-Deadline-Ms",
}


def _shape(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", message)


async def test_a_line_past_its_deadline_is_the_endpoints_504(
    cli, model_repo, fp32_service: LiveServer, tmp_path
):
    """--deadline-ms, as X-Deadline-Ms: at a deadline so small that no explanation finishes,
    every line is refused as the live endpoint refuses it at the same deadline (504
    deadline_exceeded, one of the engine's deadline messages)."""
    require_model(model_repo, POLARITY_MODEL)
    # texts of their own: not in the live server's explanation cache (a hit has no deadline)
    lines = [json.dumps({"text": _words(n, 7), "max_evals": 60}) for n in (3, 12, 40)]
    r = await _run(cli, POLARITY_MODEL, model_repo, lines, tmp_path, "--deadline-ms", "1")
    assert r.exit_code == 1, (r.output, r.exception)
    out = [json.loads(x) for x in r.stdout.splitlines()]
    async with fp32_service.client() as client:
        # shap started (the CLI pays its start-up before the first line's deadline)
        await _api_answer(client, "polarity", POLARITY_MODEL, json.dumps({"text": "warm"}))
        for number, (line, got) in enumerate(zip(lines, out, strict=True), start=1):
            api = await client.post(
                "/v1/polarity/explain",
                params={"model": POLARITY_MODEL},
                content=line.encode(),
                headers={"content-type": "application/json", "X-Deadline-Ms": "1"},
            )
            want = {"status": api.status_code, "error": api.json()["error"]}
            assert want["status"] == 504 and want["error"]["code"] == "deadline_exceeded"
            assert {**got, "error": None} == {"line": number, **want, "error": None}
            assert got["error"].keys() == want["error"].keys()
            assert got["error"]["code"] == want["error"]["code"]
            assert _shape(got["error"]["message"]) in _DEADLINE_MESSAGES
            assert _shape(want["error"]["message"]) in _DEADLINE_MESSAGES
    summary = r.stderr.strip().splitlines()[-1]
    assert "3 errors" in summary and "(deadline_exceeded: the explanation did not" in summary


async def test_the_default_deadline_is_the_endpoints(cli, model_repo, tmp_path):
    """Without --deadline-ms a line has NLPSERVE_DEFAULT_DEADLINE_MS, the endpoint's deadline
    without X-Deadline-Ms: that setting at 1 ms refuses every line; its default answers them."""
    require_model(model_repo, POLARITY_MODEL)
    lines = [json.dumps({"text": _words(n, 8), "max_evals": 60}) for n in (3, 12)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def codes(**env: str):
        args = ("predict", POLARITY_MODEL, "--models", model_repo, "--explain", "--input", src)
        r = cli(*args, env={**ENV, **env})
        out = [json.loads(x) for x in r.stdout.splitlines()]
        return r.exit_code, [a.get("error", {}).get("code") for a in out]

    tiny = await asyncio.to_thread(codes, NLPSERVE_DEFAULT_DEADLINE_MS="1")
    assert tiny == (1, ["deadline_exceeded"] * 2)
    assert await asyncio.to_thread(codes) == (0, [None, None])


async def test_deadline_ms_without_explain_exits_2(cli, model_repo, tmp_path):
    """predict's lines have no deadline: --deadline-ms there is a mistake, not ignored."""
    require_model(model_repo, POLARITY_MODEL)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a film"}) + "\n", encoding="utf-8")
    args = ("predict", POLARITY_MODEL, "--models", model_repo, "--input", src, "--deadline-ms", "5")
    r = await asyncio.to_thread(cli, *args, env=ENV)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == "nlpserve: --deadline-ms applies to --explain only"


async def test_a_lines_deadline_starts_with_its_turn_not_its_reading(model_repo):
    """One explanation at a time, lines read ahead of it: a deadline three times one line's
    time answers every line (the later ones waited three lines' time and more before their
    turn, four in all counted from the reading, which a text sent alone to the endpoint would
    not). Three, not two: room for a line slowed by other work on the machine."""
    from service.bulk_explain import AHEAD_PER_SLOT

    require_model(model_repo, POLARITY_MODEL)
    lines = [json.dumps({"text": _words(30, i), "max_evals": 300}) for i in range(8)]
    one = {"explain_concurrency": 1}
    timed = await _explain_offline(model_repo, lines, **one)
    took = max(a["seconds"] for a in timed)
    assert AHEAD_PER_SLOT >= 3  # the last lines read wait behind 3 others or more
    out = await _explain_offline(model_repo, lines, deadline_ms=int(3000 * took) + 1, **one)
    assert [a.get("error", {}).get("code") for a in out] == [None] * len(lines)
