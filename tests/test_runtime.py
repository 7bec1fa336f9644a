"""ONNX Runtime layer: providers, variants, session options, loud fallback, the runner."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.batching import WorkItem, bucket_edges
from service.config import CHEAP_TOKEN_S, CPU_BATCH_TOKENS, CPU_MIN_PADDING_EFFICIENCY, Settings
from service.metrics import Metrics
from service.queueing.inprocess import run_batch_isolating
from service.repository import Variant, discover_models, load_manifest
from service.runtime import (
    CPU,
    CUDA,
    LoadedSession,
    ModelRunner,
    ProviderError,
    choose_variant,
    create_session,
    load_runners,
    resolve_providers,
    session_options,
)
from service.runtime import session as session_mod
from service.tasks import build_tasks
from tests.service_support import (
    DETECT_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    metric_value,
    require_model,
)


def settings(repo: Path, **kw) -> Settings:
    return make_settings(repo, **kw)


# ------------------------------------------------------------------ providers
def test_default_provider_is_cpu_without_cuda(model_repo):
    assert resolve_providers(settings(model_repo, providers=None)) == [CPU]


def test_default_prefers_cuda_when_onnxruntime_has_it(model_repo, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert resolve_providers(settings(model_repo, providers=None)) == [CUDA, CPU]


def test_unavailable_provider_is_skipped_loudly(model_repo, caplog):
    with caplog.at_level(logging.WARNING):
        got = resolve_providers(settings(model_repo, providers=f"{CUDA},{CPU}"))
    assert got == [CPU]
    assert "CUDAExecutionProvider is not available" in caplog.text


def test_require_gpu_without_cuda_fails(model_repo):
    with pytest.raises(ProviderError, match="CUDA"):
        resolve_providers(settings(model_repo, providers=None, require_gpu=True))


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this host has CUDA")
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_require_gpu_without_cuda_stops_the_command_in_one_line(
    model_repo, monkeypatch, capsys, command
):
    """NLPSERVE_REQUIRE_GPU=1 on a host without CUDA ended `nlpserve serve` with the
    traceback of a failed lifespan (once uvicorn had started), and `nlpserve worker` with
    ProviderError's traceback."""
    from service.cli import main

    monkeypatch.setenv("NLPSERVE_REQUIRE_GPU", "1")
    monkeypatch.delenv("NLPSERVE_PROVIDERS", raising=False)
    monkeypatch.setenv("NLPSERVE_PORT", "0")  # were it to start after all: never on 8000
    monkeypatch.setenv("NLPSERVE_METRICS_PORT", "0")
    monkeypatch.setattr("sys.argv", ["nlpserve", command, "--models", str(model_repo)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("nlpserve: execution provider unavailable: NLPSERVE_REQUIRE_GPU")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ variants
def _manifest_with_variants(model_repo: Path):
    m = load_manifest(model_repo / "pos-en" / "1")
    return m.model_copy(
        update={
            "variants": {
                "fp32": Variant(file="model.onnx", precision="fp32", providers=[CPU, CUDA]),
                "int8": Variant(file="model.onnx", precision="int8", providers=[CPU]),
                "fp16": Variant(file="model.onnx", precision="fp16", providers=[CUDA]),
            }
        }
    )


def test_variant_per_provider(model_repo, caplog):
    m = _manifest_with_variants(model_repo)
    assert choose_variant(m, CPU)[0] == "int8"
    assert choose_variant(m, CUDA)[0] == "fp16"
    assert choose_variant(m, CPU, forced="fp32")[0] == "fp32"
    with caplog.at_level(logging.WARNING):
        assert choose_variant(m, CPU, forced="bf16")[0] == "int8"
    assert "has no variant 'bf16'" in caplog.text
    only_fp32 = m.model_copy(update={"variants": {"fp32": m.variants["fp32"]}})
    assert choose_variant(only_fp32, CUDA)[0] == "fp32"


def test_session_options_are_deliberate(model_repo):
    so = session_options(settings(model_repo, intra_op_threads=2, inter_op_threads=1))
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.enable_cpu_mem_arena and not so.enable_mem_pattern
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    basic = session_options(settings(model_repo, graph_optimization="basic"))
    assert basic.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.mark.parametrize("threads", [0, 2])
def test_inter_op_threads_other_than_one_run_graph_branches_in_parallel(model_repo, threads):
    """ORT ignores inter_op_num_threads in sequential execution (its docs: "acts as if it was
    set to 1"), which the sessions always used: NLPSERVE_INTER_OP_THREADS did nothing."""
    s = settings(model_repo, inter_op_threads=threads)
    (entry,) = [e for e in discover_models(model_repo) if e.name == "pos-en"]
    runner = load_runners(s, None, [entry])["pos-en"]
    so = runner.session.get_session_options()
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.inter_op_num_threads == threads


# ------------------------------------------------------------------ CUDA -> CPU fallback
def _fake_cuda(monkeypatch, *, silent: bool) -> None:
    """Pretend onnxruntime has CUDA but the device cannot be used: either session creation
    raises (missing libraries) or ORT silently runs on CPU (its default behaviour)."""
    real_open = session_mod._open
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])

    def fake_open(path, providers, s):
        if providers[0] == CUDA:
            if not silent:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            return real_open(path, [CPU], s)
        return real_open(path, providers, s)

    monkeypatch.setattr(session_mod, "_open", fake_open)


@pytest.mark.parametrize("silent", [False, True], ids=["raises", "silent"])
def test_cuda_failure_falls_back_to_cpu_loudly(model_repo, monkeypatch, caplog, silent):
    _fake_cuda(monkeypatch, silent=silent)
    s = settings(model_repo, providers=None)
    metrics = Metrics()
    m = load_manifest(model_repo / "pos-en" / "1")
    with caplog.at_level(logging.WARNING):
        loaded = create_session(model_repo / "pos-en" / "1", m, s, metrics)
    assert loaded.provider == CPU and loaded.requested_provider == CUDA and loaded.fell_back
    assert "PROVIDER FALLBACK" in caplog.text
    text = metrics.render().decode()
    assert metric_value(text, "nlpserve_provider_fallback_total", model="pos-en") == 1


@pytest.mark.parametrize("silent", [False, True], ids=["raises", "silent"])
def test_require_gpu_refuses_to_fall_back(model_repo, monkeypatch, silent):
    _fake_cuda(monkeypatch, silent=silent)
    s = settings(model_repo, providers=None, require_gpu=True)
    m = load_manifest(model_repo / "pos-en" / "1")
    with pytest.raises(ProviderError):
        create_session(model_repo / "pos-en" / "1", m, s)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_require_gpu_with_a_cuda_session_that_fails_stops_the_command_in_one_line(
    model_repo, monkeypatch, capsys, command
):
    """CUDA present but one session cannot open on it, under NLPSERVE_REQUIRE_GPU: `serve`
    loads its models in uvicorn's lifespan, which ended in a traceback (exit status 3)."""
    from service.cli import main

    _fake_cuda(monkeypatch, silent=False)
    monkeypatch.setenv("NLPSERVE_REQUIRE_GPU", "1")
    monkeypatch.delenv("NLPSERVE_PROVIDERS", raising=False)
    monkeypatch.setenv("NLPSERVE_PORT", "0")
    monkeypatch.setenv("NLPSERVE_METRICS_PORT", "0")
    monkeypatch.setenv("NLPSERVE_QUEUE", "inprocess" if command == "serve" else "redis")
    monkeypatch.setattr("sys.argv", ["nlpserve", command, "--models", str(model_repo)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nlpserve: execution provider unavailable: "), last
    assert "on CUDA and NLPSERVE_REQUIRE_GPU is set: CUDA failure 100" in last


def test_more_cpu_threads_than_cores_is_warned_about_at_load(model_repo, monkeypatch, caplog):
    """ORT threads beyond the usable cores slow every batch down: said once, at load."""
    monkeypatch.setattr("service.config.usable_cpus", lambda: 2)
    entries = discover_models(model_repo, select={"pos-en": None})
    with caplog.at_level(logging.WARNING):
        load_runners(settings(model_repo, inference_threads=2, intra_op_threads=1), None, entries)
    assert "oversubscribed" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_runners(settings(model_repo, inference_threads=2, intra_op_threads=2), None, entries)
    assert caplog.text.count("oversubscribed") == 1
    assert "2 inference thread(s) x 2 ORT intra-op threads = 4 threads" in caplog.text
    assert "on 2 usable CPUs" in caplog.text


@pytest.mark.asyncio(loop_scope="session")
async def test_fallback_is_visible_in_models_and_metrics(model_repo, monkeypatch):
    _fake_cuda(monkeypatch, silent=True)
    async with live_server(make_settings(model_repo, providers=None)) as srv, srv.client() as c:
        pos = (await c.get("/v1/models/pos-en")).json()
        assert pos["provider"] == CPU
        assert pos["requested_provider"] == CUDA and pos["fallback"] is True
        text = (await c.get("/metrics")).text
        fallbacks = metric_value(text, "nlpserve_provider_fallback_total", requested=CUDA)
        assert fallbacks == len((await c.get("/v1/models")).json()["models"])
        assert (await c.post("/v1/pos", json={"text": "a dog"})).status_code == 200


# ------------------------------------------------------------------ the runner
@pytest.fixture(scope="module")
def fp32_runners(model_repo):
    s = settings(model_repo, variant="fp32")
    return load_runners(s), build_tasks(discover_models(model_repo), s)


def _items(tasks, model: str, requests: list) -> list[WorkItem]:
    prepared = tasks[model].prepare(requests, 1e12, "predict")
    return [it for p in prepared for it in p.items]


def _requests(model: str) -> list:
    from service.api import schemas as sc

    if model == "pos-en":
        return [sc.PosRequest(tokens=["the", "dog"]), sc.PosRequest(text="a big red cat sees it .")]
    if model == "polarity-en":
        return [sc.PolarityRequest(text="fun"), sc.PolarityRequest(text="dull " * 12)]
    if model == DETECT_MODEL:
        return [sc.DetectRequest(text="however"), sc.DetectRequest(text="my dog lol " * 5)]
    return [
        sc.QARequest(question="谁？", context="李白。"),
        sc.QARequest(question="中国的首都是哪里？", context="中国的首都是北京，历史悠久。"),
    ]


@pytest.mark.parametrize("model", ["pos-en", "polarity-en", DETECT_MODEL, QA_MODEL])
def test_padding_does_not_change_outputs(fp32_runners, model_repo, model):
    require_model(model_repo, model)
    runners, tasks = fp32_runners
    short, longer = _items(tasks, model, _requests(model))
    assert short.length < longer.length
    runner = runners[model]
    alone = runner.run_batch([short])[0]
    padded = runner.run_batch([longer, short, longer])[1]
    assert alone.keys() == padded.keys()
    for name in alone:
        assert alone[name].shape == padded[name].shape  # sequence outputs cut to length
        np.testing.assert_allclose(alone[name], padded[name], rtol=0, atol=1e-5)


def test_a_one_token_input_keeps_every_class_logit(fp32_runners):
    """Only outputs whose second axis is ``sequence`` are cut to the item's length: a
    one-word polarity input still gets both class logits ([batch, 2] output)."""
    from service.api import schemas as sc

    runners, tasks = fp32_runners
    (one,) = _items(tasks, "polarity-en", [sc.PolarityRequest(text="fun")])
    assert one.length == 1
    assert runners["polarity-en"].run_batch([one])[0]["logits"].shape == (2,)


@pytest.mark.parametrize("model", ["pos-en", "polarity-en", DETECT_MODEL, QA_MODEL])
def test_shape_grid_rounds_batches_without_changing_outputs(fp32_runners, model_repo, model):
    """The CUDA shape grid (here forced on the CPU): 3 sequences run as 4 rows at a width
    rounded to the multiple; every item's outputs are those of the exact-shape run."""
    require_model(model_repo, model)
    runners, tasks = fp32_runners
    s = settings(model_repo, variant="fp32", shape_multiple=8, max_batch_size=8)
    entries = [e for e in discover_models(model_repo) if e.name == model]
    gridded = load_runners(s, entries=entries)[model]
    assert runners[model].shape_multiple == 1  # the CPU default: exact shapes
    short, longer = _items(tasks, model, _requests(model))
    rows, width = gridded.padded_shape(3, longer.length)
    assert rows == 4 and width % 8 == 0 or width == gridded.manifest.max_length
    assert longer.length <= width < longer.length + 8
    batch = [longer, short, longer]
    exact = runners[model].run_batch(batch)
    rounded = gridded.run_batch(batch)
    assert len(rounded) == 3
    for want, got in zip(exact, rounded, strict=True):
        for name in want:
            assert want[name].shape == got[name].shape
            np.testing.assert_allclose(want[name], got[name], rtol=0, atol=1e-5)


def test_shape_grid_is_what_warmup_runs(model_repo, monkeypatch):
    require_model(model_repo, DETECT_MODEL)
    metrics = Metrics()
    s = settings(model_repo, variant="fp32", shape_multiple=16, max_batch_size=6)
    entries = [e for e in discover_models(model_repo) if e.name == DETECT_MODEL]
    runner = load_runners(s, metrics, entries)[DETECT_MODEL]
    top = runner.manifest.max_length
    grid = runner.shape_grid()
    widths = sorted({w for _, w in grid})
    assert sorted({r for r, _ in grid}) == [1, 2, 4, 6]  # powers of two, capped at the max
    assert widths == sorted({*range(16, top, 16), top})
    # every shape a batch can take is in the grid
    assert {runner.padded_shape(n, n_tok) for n in range(1, 7) for n_tok in range(1, top + 1)} == (
        set(grid)
    )
    ran: list[tuple[tuple[int, ...], bool]] = []
    real_run = runner._run

    def spy(feeds):
        mask = feeds["attention_mask"]
        ran.append((mask.shape, bool((mask == 0).any())))
        return real_run(feeds)

    with monkeypatch.context() as patched:
        patched.setattr(runner, "_run", spy)
        runner.warmup()
    # every grid shape ran once without padding and once with padding in its mask, then the
    # CPU's token cost was measured (5 runs of a full-length batch, test_token_cost_*)
    warm, measured = ran[: 2 * len(grid)], ran[2 * len(grid) :]
    assert sorted(warm) == sorted([(shape, pad) for shape in grid for pad in (False, True)])
    rows = min(runner.max_rows, CPU_BATCH_TOKENS // top)
    assert measured == [(runner.padded_shape(rows, top), False)] * 5
    assert runner.token_cost_s is not None
    assert metric_value(metrics.render().decode(), "nlpserve_batch_size_count") == 0
    # padding efficiency counts the grid's padding: 1 sequence of 17 tokens runs as 1 x 32
    tasks = build_tasks(entries, s)
    item = _items(tasks, DETECT_MODEL, _requests(DETECT_MODEL))[0]
    runner.metrics = metrics
    runner.run_batch([item])
    text = metrics.render().decode()
    padded = metric_value(text, "nlpserve_batch_tokens_total", model=DETECT_MODEL, kind="padded")
    assert padded == runner.padded_shape(1, item.length)[1]
    # ... and `longest` does not: how well traffic fits the buckets, the alert's measure
    longest = metric_value(text, "nlpserve_batch_tokens_total", model=DETECT_MODEL, kind="longest")
    assert longest == item.length < padded


def test_int8_dynamic_quantisation_is_batch_dependent_but_bounded(model_repo):
    """Documented trade-off: int8 activations are quantised with per-batch scales."""
    require_model(model_repo, DETECT_MODEL)
    s = settings(model_repo, variant="int8")
    entries = [e for e in discover_models(model_repo) if e.name == DETECT_MODEL]
    runner = load_runners(s, entries=entries)[DETECT_MODEL]
    assert runner.variant == "int8"
    tasks = build_tasks(entries, s)
    short, longer = _items(tasks, DETECT_MODEL, _requests(DETECT_MODEL))
    alone = runner.run_batch([short])[0]["logits"]
    padded = runner.run_batch([longer, short])[1]["logits"]
    assert np.abs(alone - padded).max() < 5e-3


def test_warmup_runs_every_bucket_without_recording(model_repo):
    metrics = Metrics()
    s = settings(model_repo)
    entries = [e for e in discover_models(model_repo) if e.name == "pos-en"]
    runner = load_runners(s, metrics, entries)["pos-en"]
    assert runner.warmup() >= 0
    text = metrics.render().decode()
    assert metric_value(text, "nlpserve_batch_size_count") == 0
    # A dummy item of each bucket edge runs (char_ids sized from the manifest).
    for b, edge in enumerate(runner.buckets):
        out = runner.run_batch([runner.dummy_item(edge, b)], record=False)[0]
        assert out["logits"].shape[0] == edge


def _spin(seconds: float) -> None:
    """Busy for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_token_cost_is_the_best_of_several_runs(model_repo, monkeypatch):
    """Workers starting side by side on few cores slow each other's measuring runs: one slow
    measure must not decide the padding floor, so the best of five counts."""
    s = settings(model_repo, warmup=False)
    (entry,) = [e for e in discover_models(model_repo) if e.name == "pos-en"]
    runner = load_runners(s, None, [entry])["pos-en"]
    costs = iter([0.05, 0.05, 0.05, 0.05, 0.002])  # slow, slow, ..., then quick
    monkeypatch.setattr(runner, "run_batch", lambda *a, **k: _spin(next(costs)))
    assert runner._measure_token_cost() < 0.01 / runner.manifest.max_length
    with pytest.raises(StopIteration):
        next(costs)  # all five ran


def test_token_cost_is_cpu_time_not_time_waiting_for_a_core(model_repo, monkeypatch):
    """With one intra-op thread (the CPU default) the batch runs on the measuring thread: the
    time it waits for a core (a busy machine, here a sleep) is no cost of the model's."""
    s = settings(model_repo, warmup=False)
    (entry,) = [e for e in discover_models(model_repo) if e.name == "pos-en"]
    runner = load_runners(s, None, [entry])["pos-en"]
    assert runner.intra_op_threads == 1

    def descheduled_then_run(*a, **k):
        time.sleep(0.05)
        _spin(0.002)

    monkeypatch.setattr(runner, "run_batch", descheduled_then_run)
    tokens = runner.manifest.max_length * max(
        1, min(runner.max_rows, CPU_BATCH_TOKENS // runner.manifest.max_length)
    )
    cost = runner._measure_token_cost() * tokens
    assert 0.002 <= cost < 0.02, cost  # the 2 ms of CPU, not the 52 ms of wall clock


@pytest.mark.parametrize("grid", [None, 8], ids=["no-grid", "cpu-shape-grid"])
def test_warmup_measures_the_token_cost_that_sets_the_cpu_padding_floor(model_repo, grid):
    """Also with a shape grid on the CPU (NLPSERVE_SHAPE_MULTIPLE): its warm-up measured
    nothing, and every model, the cheap LSTMs too, kept the 0.95 floor."""
    # The explicit test floor (0.0) would hide the default rule: leave it unset here.
    s = settings(model_repo, min_padding_efficiency=None, shape_multiple=grid)
    entries = [e for e in discover_models(model_repo) if e.name in ("pos-en", "detector-en")]
    runners = load_runners(s, None, entries)
    for r in runners.values():
        assert r.token_cost_s is not None and 0 < r.token_cost_s < 1.0
        cheap = r.token_cost_s < CHEAP_TOKEN_S
        assert r.batch_policy().min_padding_efficiency == (
            0.0 if cheap else CPU_MIN_PADDING_EFFICIENCY
        )
        assert r.describe()["min_padding_efficiency"] == r.batch_policy().min_padding_efficiency
    # Without warm-up nothing is measured: the provider's default floor applies.
    cold = load_runners(s.model_copy(update={"warmup": False}), None, entries)["pos-en"]
    assert cold.token_cost_s is None
    assert cold.batch_policy().min_padding_efficiency == CPU_MIN_PADDING_EFFICIENCY


def test_bucket_edges_override(model_repo):
    m = load_manifest(model_repo / "pos-en" / "1")
    assert bucket_edges(m, settings(model_repo)) == m.buckets
    s = settings(model_repo, buckets={"pos-en": [32, 10, 10, 999]})
    assert bucket_edges(m, s) == [10, 32, m.max_length]
    with pytest.raises(ValueError, match="pos-en: bucket edges are sequence lengths"):
        settings(model_repo, buckets={"pos-en": [32, 0]})  # was dropped without a word


def test_one_bad_item_fails_alone(fp32_runners):
    runners, tasks = fp32_runners
    good = _items(tasks, "polarity-en", _requests("polarity-en"))
    bad = WorkItem("polarity-en", 0, 3, {"word_ids": np.array([1, 10**9, 2], dtype=np.int64)}, 1e12)
    results = run_batch_isolating(runners["polarity-en"], [good[0], bad, good[1]])
    assert isinstance(results[1], Exception)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    want = runners["polarity-en"].run_batch([good[0]])[0]["logits"]
    np.testing.assert_allclose(results[0]["logits"], want, atol=1e-6)


@pytest.mark.parametrize("model", ["pos-en", "polarity-en", DETECT_MODEL, QA_MODEL])
def test_a_runner_on_cuda_takes_its_io_binding_path_with_the_plain_runs_outputs(
    fp32_runners, model_repo, model, caplog
):
    """What a CUDA runner does differently, short of the GPU: the shape grid, the warm-up of
    every grid shape and IO binding (outputs bound to "cuda"; a CPU-only onnxruntime keeps
    them on the host, so the path runs here), with the dynamic output axes (batch, sequence,
    tags) sized by ORT. It must not give up IO binding, and every item's outputs are those
    of the plain run."""
    require_model(model_repo, model)
    runners, tasks = fp32_runners
    s = settings(model_repo, variant="fp32")
    entry = next(e for e in discover_models(model_repo) if e.name == model)
    loaded = create_session(entry.path, entry.manifest, s)
    cuda = LoadedSession(loaded.session, CUDA, loaded.variant, CUDA, loaded.path)
    runner = ModelRunner(entry, cuda, s)
    assert runner._use_io_binding and runner.shape_multiple == 16
    with caplog.at_level(logging.WARNING):
        runner.warmup()
        short, longer = _items(tasks, model, _requests(model))
        batch = [longer, short, longer]
        got = runner.run_batch(batch)
    assert runner._use_io_binding, caplog.text  # no fallback to the plain run
    assert "IO binding failed" not in caplog.text
    want = runners[model].run_batch(batch)
    for w, g in zip(want, got, strict=True):
        for name in w:
            assert w[name].shape == g[name].shape
            np.testing.assert_allclose(w[name], g[name], rtol=0, atol=1e-5)
