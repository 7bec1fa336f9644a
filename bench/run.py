"""Side-by-side benchmark (``make bench``): same machine, same weights, same requests.

    python -m bench.run --models models --data ../shared/data --requests 1000 --concurrency 32
    python -m bench.run --model qa-zh --device cuda --variants fp32,fp16 --derive-variants

(bench/README.md: every option, the GPU session, what each configuration means.)

Configurations, each fed the identical pre-generated request list (closed loop):
  (a) baseline          naive FastAPI + PyTorch, one forward per request (bench/baseline_app.py)
  (b) raw ORT           the ONNX model on pre-sorted batches, no HTTP (bench/raw_ort.py)
  (c) nlpserve          ``nlpserve serve`` with the in-process queue
  (d) nlpserve+redis    ``nlpserve serve`` (NLPSERVE_QUEUE=redis) + one ``nlpserve worker`` +
                        a private redis-server
(c) and (d) run once per ONNX variant present (fp32, int8, fp16: ``NLPSERVE_VARIANT``), (b)
too; ``--derive-variants`` makes the fp32/fp16 files a version does not commit
(bench/variants.py). ``--device cuda`` runs (a) on the GPU and (b)-(d) on ONNX Runtime's
CUDA provider, with ``NLPSERVE_REQUIRE_GPU=1`` so a silent CPU fallback cannot pass for a
GPU number. Throughput is reported as a ratio to (a) and as a fraction of (b) of the same
variant; every HTTP answer is checked against the raw ORT answer for the same request (same
weights, and padding/batching must not change results): the detector's machine probability,
QA's answer span and score. Writes ``bench/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs
from bench.loadgen import (
    RequestSpec,
    Result,
    RetryPolicy,
    build_requests,
    latencies,
    load_requests,
    metrics_delta,
    model_folder_problem,
    run_load,
    run_load_procs,
    save_requests,
    scrape_metrics,
    summarize,
)
from bench.raw_ort import CUDA, device_providers
from bench.report import machine_description, write_reports

RESULTS_DIR = procs.REPO_ROOT / "bench" / "results"  # committed: the measured numbers
CONFIGS = ("baseline", "raw", "inprocess", "redis")  # (a)-(d), the names --configs takes
PRECISIONS = ("fp32", "int8", "fp16")  # a manifest variant's precision is one of these


def _latest_version(models_dir: Path, model: str) -> Path:
    versions = sorted(
        (p for p in (models_dir / model).iterdir() if (p / "manifest.json").is_file()),
        key=lambda p: int(p.name) if p.name.isdigit() else -1,
    )
    if not versions:
        raise FileNotFoundError(f"no version of {model} under {models_dir}")
    return versions[-1]


def find_hf_checkpoint(
    version_dir: Path, explicit: Path | None, task: str = "detect"
) -> Path | None:
    """The PyTorch weights the ONNX model was exported from.

    Looked for in: ``--hf-dir``; ``$NLPSERVE_BENCH_HF_DIR``; ``<version>/hf``; the training
    work folders under ``runs/`` that hold a ``best/`` checkpoint. Whichever is used, the
    benchmark checks its answers against the ONNX model's (``answers`` in the report), so a
    checkpoint that is not the same weights shows up as a mismatch rather than a silent win.
    """
    cands: list[Path] = []
    if explicit is not None:
        cands.append(explicit)
    if os.environ.get("NLPSERVE_BENCH_HF_DIR"):
        cands.append(Path(os.environ["NLPSERVE_BENCH_HF_DIR"]))
    cands.append(version_dir / "hf")
    runs = procs.REPO_ROOT / "runs"
    if runs.is_dir():
        found = sorted(runs.glob("**/best/config.json"), key=lambda p: p.stat().st_mtime)
        # runs/<...detect...>/best for the detector, runs/qa-zh/best for QA
        key = "detect" if task == "detect" else task
        cands += [p.parent for p in reversed(found) if key in str(p.relative_to(runs))]
    for c in cands:
        if (c / "config.json").is_file():
            return c
    return None


def _single_model_repo(tmp: Path, version_dir: Path) -> Path:
    """A repository holding only the benchmarked model (symlinked): servers load nothing else."""
    repo = tmp / "models"
    (repo / version_dir.parent.name).mkdir(parents=True, exist_ok=True)
    link = repo / version_dir.parent.name / version_dir.name
    if not link.exists():
        link.symlink_to(version_dir.resolve(), target_is_directory=True)
    return repo


async def _drive(
    url: str | Sequence[str],
    specs: Sequence[RequestSpec],
    concurrency: int,
    metrics_urls: Sequence[str],
    model: str,
    warmup: int,
    client_procs: int = 1,
) -> tuple[list[Result], float, dict[str, Any]]:
    if warmup:
        # Not measured: first requests pay for connection setup, thread pools, allocator.
        await run_load(url, specs[:warmup], concurrency=concurrency, keep_body=False)
    before = scrape_metrics(metrics_urls)
    if client_procs > 1:
        results, wall, cpu = await asyncio.to_thread(
            run_load_procs, url, specs, processes=client_procs, concurrency=concurrency,
            policy=RetryPolicy(retries=0), timeout_s=300.0,
        )  # fmt: skip
    else:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        results, wall = await run_load(
            url, specs, concurrency=concurrency, policy=RetryPolicy(retries=0), timeout_s=300.0
        )
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    after = scrape_metrics(metrics_urls)
    delta: dict[str, Any] = dict(metrics_delta(before, after, model))
    # The load generator shares the CPU with the server: say how much of it it took.
    delta["client_cpu_ms_per_request"] = round(1000 * cpu / max(len(results), 1), 3)
    if client_procs > 1:
        delta["client_processes"] = client_procs
    return results, wall, delta


QA_KEYS = ("answer", "start", "end", "score")


def _answers(results: Sequence[Result]) -> dict[int, Any]:
    """What parity is checked on: the detector's machine probability; QA's whole answer."""
    out: dict[int, Any] = {}
    for r in results:
        if r.status != 200 or not r.body:
            continue
        if "machine_probability" in r.body:
            out[r.id] = float(r.body["machine_probability"])
        elif all(k in r.body for k in QA_KEYS):
            out[r.id] = {k: r.body[k] for k in QA_KEYS}
    return out


def _compare(got: dict[int, Any], want: dict[int, Any]) -> dict[str, Any]:
    common = sorted(set(got) & set(want))
    if not common:
        return {"compared": 0}
    if isinstance(got[common[0]], dict):  # QA: the same span, and how far the score moved
        same = [(got[i]["start"], got[i]["end"]) == (want[i]["start"], want[i]["end"])
                for i in common]  # fmt: skip
        text = [got[i]["answer"] == want[i]["answer"] for i in common]
        score = [abs(float(got[i]["score"]) - float(want[i]["score"])) for i in common]
        return {
            "compared": len(common),
            "span_agreement": float(np.mean(same)),
            "answer_text_agreement": float(np.mean(text)),
            "max_abs_diff_score": float(np.max(score)),
        }
    g = np.array([got[i] for i in common])
    w = np.array([want[i] for i in common])
    return {
        "compared": len(common),
        "max_abs_diff_machine_probability": float(np.max(np.abs(g - w))),
        "label_agreement": float(np.mean((g >= 0.5) == (w >= 0.5))),
    }


def _layout(r: Any) -> str:
    intra = r.intra_op_threads or "all"
    return f"{r.threads} batch{'es' if r.threads > 1 else ''} at once x {intra} ORT threads"


def _softmax_machine(logits: dict[int, list[float]], machine_index: int) -> dict[int, float]:
    out = {}
    for i, row in logits.items():
        x = np.asarray(row, dtype=np.float64)
        e = np.exp(x - x.max())
        out[i] = float(e[machine_index] / e.sum())
    return out


class DeviceError(RuntimeError):
    """The benchmark was asked for a device this machine cannot give it."""


def check_device(device: str, configs: Sequence[str], baseline_dtype: str = "fp32") -> None:
    """Fail before anything starts when ``device`` cannot run the chosen configurations:
    a CUDA benchmark on a machine without CUDA must say so at once, not hang or fall back."""
    if device == "cpu":
        if baseline_dtype != "fp32" and "baseline" in configs:
            raise DeviceError("--baseline-dtype fp16 needs --device cuda")
        return
    if device != "cuda":
        raise DeviceError(f"--device must be cpu or cuda, not {device!r}")
    if "baseline" in configs:
        try:
            import torch
        except ImportError as e:
            raise DeviceError(f"--device cuda: the baseline needs torch ({e})") from e
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda: torch sees no CUDA device (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); run on a GPU "
                "machine, or leave 'baseline' out of --configs"
            )
    if {"raw", "inprocess", "redis"} & set(configs):
        import onnxruntime as ort

        have = ort.get_available_providers()
        if CUDA not in have:
            raise DeviceError(
                f"--device cuda: this onnxruntime ({ort.__version__}, {ort.__file__}) has no "
                f"{CUDA} (available: {', '.join(have)}); install onnxruntime-gpu "
                "(bench/README.md, 'GPU session')"
            )


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.device: str = args.device
        self.notes: list[str] = []
        self.version_dir = _latest_version(args.models, args.model)
        if args.derive_variants:
            from bench.variants import derive_version

            wanted = [v for v in args.variants.split(",") if v.strip()]
            try:
                self.version_dir, derived = derive_version(
                    self.version_dir, tmp / "derived", wanted, hf_dir=args.hf_dir
                )
            except NotImplementedError as e:  # the LSTM models: their variants as committed
                derived = [f"--derive-variants: {e}; the committed variants are used"]
            self.notes.extend(derived)
        self.manifest = json.loads((self.version_dir / "manifest.json").read_text())
        self.task: str = self.manifest["task"]
        self.repo = _single_model_repo(tmp, self.version_dir)
        self.logs = tmp / "logs"
        self.summaries: list[dict[str, Any]] = []
        self.lat: dict[str, list[float]] = {}
        self.answers: dict[str, dict[int, Any]] = {}
        self.providers_used: dict[str, str] = {}
        self._loadavg_before = round(os.getloadavg()[0], 2)
        self.load_waits: list[dict[str, Any]] = []  # _settle's waits, for the notes
        data = args.data  # main() refused a --data folder that does not exist
        if args.requests_file is not None:
            # Pre-generated (bench/gpu_prepare.sh): the data set need not travel with it.
            self.specs = load_requests(args.requests_file)[: args.requests]
            self.requests_source = f"{args.requests_file.name} (made by --save-requests)"
        else:
            self.specs = build_requests(
                args.model, args.requests, models_dir=args.models, data_dir=data, seed=args.seed
            )
            self.requests_source = _source_of(self.task, data)
            if self.requests_source.startswith("built-in"):
                why = "no --data given" if data is None else f"none of its texts in {data}"
                self.notes.append(f"request texts: {self.requests_source} ({why}).")
                print(f"bench: request texts from the {self.requests_source} ({why})",
                      file=sys.stderr, flush=True)  # fmt: skip
        self.buckets = self._bucket_override(args.buckets)

    def _bucket_override(self, spec: str) -> list[int] | None:
        """NLPSERVE_BUCKETS for the nlpserve runs: none (the manifest's), explicit edges, or
        ``auto``: quartiles (and p90) of the request lengths *below* max_length, rounded up to
        multiples of 8. Below the max on purpose: texts cut at max_length all land in the last
        bucket anyway, and quantiles over them collapse every edge onto the max."""
        if not spec:
            return None
        max_len = int(self.manifest["max_length"])
        if spec != "auto":
            edges = sorted({int(x) for x in spec.split(",") if x.strip()})
        else:
            below = np.array([s.tokens for s in self.specs if s.tokens < max_len])
            qs = np.quantile(below, [0.25, 0.5, 0.75, 0.9]) if len(below) else []
            edges = sorted({int(-(-q // 8) * 8) for q in qs})
        return [e for e in edges if 0 < e < max_len] + [max_len]

    # ------------------------------------------------------------------ helpers
    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            "NLPSERVE_MODEL_DIR": str(self.repo),
            "NLPSERVE_LOG_LEVEL": "WARNING",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        env.update(extra)
        return env

    def _record(self, name: str, results: list[Result], wall: float, mdelta: dict[str, Any],
                **extra: Any) -> dict[str, Any]:  # fmt: skip
        s = summarize(name, results, wall, self.specs, mdelta)
        s["loadavg_before"] = self._loadavg_before
        s.update(extra)
        self.summaries.append(s)
        # Kept with its round until merge_rounds picks the round that is reported.
        s[LATENCIES_KEY] = latencies(results)
        self.answers[name] = _answers(results)
        print(
            f"  {name}: {s['throughput_rps']:.1f} req/s, p50 {s['latency_ms']['p50']} ms, "
            f"p99 {s['latency_ms']['p99']} ms, errors {s['errors']}, "
            f"padding {s.get('padding_efficiency')}",
            flush=True,
        )
        return s

    def _settle(self) -> None:
        """Wait (bounded) for the machine to be idle: other jobs skew every number. Each wait
        is said on stderr, with how to skip it, and counted in the report's notes."""
        max_load, settle_s = self.args.max_load, self.args.settle_s
        load = os.getloadavg()[0]
        if load <= max_load or settle_s <= 0:
            self._loadavg_before = round(load, 2)
            return
        print(f"bench: 1-minute load average {load:.2f} is above --max-load {max_load:g}: "
              f"waiting up to {settle_s:g} s (--settle-s) for it to drop; --settle-s 0 or a "
              "higher --max-load skips the wait", file=sys.stderr, flush=True)  # fmt: skip
        t0 = time.monotonic()
        deadline = t0 + settle_s
        while (left := deadline - time.monotonic()) > 0 and load > max_load:
            time.sleep(min(2.0, left))
            load = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if load > max_load:
            print(f"bench: load average still {load:.2f} after {waited:.0f} s: running anyway",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.load_waits.append(
            {"waited_s": round(waited, 1), "load_after": round(load, 2), "gave_up": load > max_load}
        )
        self._loadavg_before = round(load, 2)

    def _serve(self, name: str, env: dict[str, str], started: list[procs.Proc],
               replicas: int = 1) -> list[str]:  # fmt: skip
        """Start ``replicas`` ``nlpserve serve`` processes (all at once: on a GPU each warms
        its shapes up, in parallel), append them to ``started``, wait until all are ready."""
        urls = []
        for k in range(replicas):
            port = procs.free_port()
            penv = {**env, "NLPSERVE_HOST": "127.0.0.1", "NLPSERVE_PORT": str(port)}
            label = f"{name}-{k}" if replicas > 1 else name
            started.append(procs.start(label, [procs.nlpserve_bin(), "serve"], self.logs,
                                       env=penv))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        t0 = time.perf_counter()
        for p, url in zip(started[-replicas:], urls, strict=True):
            procs.wait_http(p, url + "/readyz", timeout_s=180)
        # Start-up is mostly the warm-up (on CUDA every shape of the grid): the GPU log
        # should tell what it costs a device session.
        print(f"    {name}: {replicas} server(s) ready in {time.perf_counter() - t0:.1f} s",
              flush=True)  # fmt: skip
        return urls

    def _run_http(self, name: str, url: str | list[str], metrics_urls: list[str],
                  specs: Sequence[RequestSpec] | None = None, **extra: Any) -> None:  # fmt: skip
        self._settle()
        specs = self.specs if specs is None else specs
        results, wall, mdelta = asyncio.run(
            _drive(url, specs, self.args.concurrency, metrics_urls, self.args.model,
                   self.args.warmup, self.args.client_procs)
        )  # fmt: skip
        self._record(name, results, wall, mdelta, **extra)

    def _served_provider(self, url: str) -> str | None:
        """The provider the server says the model ACTUALLY runs on (``GET /v1/models``);
        None where inference runs on remote workers (Redis mode)."""
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
                models = json.loads(resp.read())["models"]
        except (OSError, ValueError, KeyError):
            return None
        info: dict[str, Any] = next((m for m in models if m.get("name") == self.args.model), {})
        return info.get("provider")

    # ------------------------------------------------------------------ configurations
    def baseline(self) -> None:
        hf = find_hf_checkpoint(self.version_dir, self.args.hf_dir, self.task)
        source = f"checkpoint {hf}"
        if hf is not None and hf.parent == self.version_dir and self.args.derive_variants:
            source = f"checkpoint {hf.name}/ of the benchmark's derived copy (see notes)"
        if hf is None:
            # No training checkpoint here (a fresh clone has only models/): read the very
            # same weights back out of the fp32 ONNX file.
            from bench.onnx_to_torch import hf_from_onnx

            try:
                hf, kind = hf_from_onnx(self.version_dir, self.tmp / "hf-from-onnx")
            except (NotImplementedError, RuntimeError) as e:
                self.notes.append(f"baseline skipped: no PyTorch weights ({e}).")
                print(f"  baseline: SKIPPED ({e})", flush=True)
                return
            source = (
                "rebuilt from the fp32 ONNX file (bench/onnx_to_torch.py): the served weights"
                if kind == "fp32"
                else "DEQUANTIZED from the int8 ONNX file (no fp32 file or checkpoint here): "
                "an equivalent model, not the same weights; pass --hf-dir for an exact baseline"
            )
        self.notes.append(
            f"baseline weights: {source}; see Answers (`answers` in the JSON) for the parity check."
        )
        port = procs.free_port()
        dtype = self.args.baseline_dtype
        argv = [sys.executable, "-m", "bench.baseline_app", "--hf-dir", str(hf),
                "--manifest-dir", str(self.version_dir), "--port", str(port),
                "--device", self.device, "--dtype", dtype]  # fmt: skip
        p = procs.start("baseline", argv, self.logs, env=self._env())
        # A slow baseline may run on the first N requests only: per-request serving has no
        # batches, so its throughput does not depend on how many requests it is fed.
        n = self.args.baseline_requests or len(self.specs)
        name = "baseline (PyTorch, per request)"
        if self.cuda or dtype != "fp32":
            name = f"baseline (PyTorch {dtype} on {self.device}, per request)"
        with procs.stopping([p]):
            url = f"http://127.0.0.1:{port}"
            procs.wait_http(p, url + "/readyz", timeout_s=180)
            self._run_http(name, url, [], specs=self.specs[:n], weights=source,
                           device=self.device, dtype=dtype)  # fmt: skip
        self.providers_used[name] = f"torch {self.device} {dtype}"

    def raw(self, variant: str) -> None:
        from bench.raw_ort import run_raw_sweep
        from service.config import Settings

        # The ceiling is the best of a few batch sizes: on a CPU, the largest batch is not
        # always the fastest per sequence (cache), and nlpserve's batches vary in size. On a
        # CPU also of two thread layouts: nlpserve's default (a batch per core, one core
        # each) and one batch at a time on all cores (ORT's own default).
        sizes = sorted({int(x) for x in self.args.raw_batch_sizes.split(",") if x.strip()})
        base = Settings(model_dir=self.repo, providers=device_providers(self.device),
                        require_gpu=self.cuda)  # fmt: skip
        layouts = [base]
        if not self.cuda and base.inference_threads_for() > 1:
            layouts.append(base.model_copy(update={"inference_threads": 1, "intra_op_threads": 0}))
        sweep = []
        for settings in layouts:
            results = run_raw_sweep(self.specs, self.repo, self.args.model, batch_sizes=sizes,
                                    variant=variant, settings=settings,
                                    min_seconds=self.args.raw_seconds,
                                    before_each=self._settle)  # fmt: skip
            for bs, r in zip(sizes, results, strict=True):
                sweep.append((r.throughput_rps, bs, r))
                print(f"    raw ORT ({variant}) batch<={bs}, {_layout(r)}: "
                      f"{r.throughput_rps:.1f} req/s ({r.throughput_sps:.1f} seq/s) on "
                      f"{r.provider}", flush=True)  # fmt: skip
        best_rps, best_bs, res = max(sweep, key=lambda t: t[0])
        s = res.summary()
        s["max_batch_size"] = best_bs
        s["sweep_rps"] = {f"batch<={bs}, {_layout(r)}": round(rps, 2) for rps, bs, r in sweep}
        s["loadavg_before"] = self._loadavg_before
        self.summaries.append(s)
        self.providers_used[s["name"]] = res.provider
        if self.task == "detect":
            machine = self.manifest["labels"].index("machine")
            self.answers[s["name"]] = _softmax_machine(res.outputs, machine)
        else:
            self.answers[s["name"]] = dict(res.outputs)
        print(f"  {s['name']}: {s['throughput_rps']:.1f} req/s, padding "
              f"{s['padding_efficiency']:.3f}", flush=True)  # fmt: skip

    def _nlpserve_env(self, **extra: str) -> dict[str, str]:
        # Explicit providers: a CPU run on a GPU machine stays on the CPU, and a CUDA run
        # refuses to start on the CPU (REQUIRE_GPU) instead of reporting CPU numbers.
        env = self._env(
            NLPSERVE_PROVIDERS=device_providers(self.device),
            NLPSERVE_REQUIRE_GPU="1" if self.cuda else "0",
            **extra,
        )
        if self.buckets is not None:
            env["NLPSERVE_BUCKETS"] = json.dumps({self.args.model: self.buckets})
        # --serve-env: settings for the nlpserve processes only (raw ORT keeps the defaults
        # it shares with them, the baseline has no such settings).
        env.update(dict(kv.split("=", 1) for kv in self.args.serve_env))
        return env

    def inprocess(self, variant: str, manifest_buckets: bool = False) -> None:
        env = self._nlpserve_env(NLPSERVE_QUEUE="inprocess", NLPSERVE_VARIANT=variant)
        # --api-replicas N: N independent servers, each with its own queue and its own
        # session of the model (on one GPU: N CUDA sessions), the clients spread over them.
        n_api = self.args.api_replicas
        reps = f", {n_api} replicas" if n_api > 1 else ""
        name = f"nlpserve in-process ({variant}{reps})"
        if manifest_buckets:  # the comparison run: buckets as exported
            env.pop("NLPSERVE_BUCKETS", None)
            name = f"in-process, manifest buckets {self.manifest['buckets']} ({variant}{reps})"
        started: list[procs.Proc] = []
        with procs.stopping(started):
            urls = self._serve(f"serve-{variant}", env, started, n_api)
            provider = self._served_provider(urls[0])
            self._run_http(name, urls if n_api > 1 else urls[0], [u + "/metrics" for u in urls],
                           variant=variant, provider=provider, api_replicas=n_api)  # fmt: skip
        self.providers_used[name] = provider or "unknown"

    def redis(self, variant: str) -> None:
        started: list[procs.Proc] = []
        with procs.stopping(started):
            rp, redis_url = procs.start_redis(self.logs)
            started.append(rp)
            mport = procs.free_port()
            common = self._nlpserve_env(NLPSERVE_QUEUE="redis", NLPSERVE_REDIS_URL=redis_url,
                                        NLPSERVE_VARIANT=variant)  # fmt: skip
            w = procs.start(f"worker-{variant}", [procs.nlpserve_bin(), "worker"], self.logs,
                            env={**common, "NLPSERVE_METRICS_PORT": str(mport)})  # fmt: skip
            started.append(w)
            # --api-replicas N (or --redis-api-replicas): N API processes in front of the one
            # worker, the clients spread over them (what a gateway does): the scale-out past
            # one API process.
            n_api = self.args.redis_api_replicas or self.args.api_replicas
            urls = self._serve(f"serve-redis-{variant}", common, started, n_api)
            procs.wait_http(w, f"http://127.0.0.1:{mport}/readyz", timeout_s=180)
            apis = f"{n_api} API processes, " if n_api > 1 else ""
            name = f"nlpserve via Redis ({variant}, {apis}1 worker)"
            # The API runs no model in Redis mode; the worker got the same providers and,
            # on CUDA, NLPSERVE_REQUIRE_GPU: it cannot have fallen back and still be ready.
            provider = common["NLPSERVE_PROVIDERS"].split(",")[0]
            metrics = [u + "/metrics" for u in urls] + [f"http://127.0.0.1:{mport}/metrics"]
            self._run_http(name, urls if n_api > 1 else urls[0], metrics, variant=variant,
                           provider=f"worker: {provider}", api_replicas=n_api)  # fmt: skip
            self.providers_used[name] = f"worker: {provider}"

    # ------------------------------------------------------------------ report
    def _targets(self, base: dict[str, Any] | None, raw: dict[str, dict[str, Any]],
                 inproc: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
        redis = {
            s["variant"]: s for s in self.summaries if s["name"].startswith("nlpserve via Redis")
        }
        return _targets_of(base, raw, inproc, redis, device=self.device)

    def finish(self, out_base: Path, command: str) -> list[Path]:
        self.summaries = merge_rounds(self.summaries)
        self.notes = list(dict.fromkeys(self.notes))  # each round repeats its notes
        for s in self.summaries:
            if LATENCIES_KEY in s:
                self.lat[s["name"]] = s.pop(LATENCIES_KEY)
        if self.load_waits:
            gave_up = sum(w["gave_up"] for w in self.load_waits)
            self.notes.append(
                f"load wait: {len(self.load_waits)} run(s) first waited for the 1-minute load "
                f"average to drop below --max-load {self.args.max_load:g} "
                f"({sum(w['waited_s'] for w in self.load_waits):.0f} s in all, at most "
                f"--settle-s {self.args.settle_s:g} each); {gave_up} ran with it still above."
            )
        if self.args.rounds > 1:
            self.notes.append(
                f"{self.args.rounds} rounds: every configuration ran once per round, "
                "alternating; each row is its median round (by throughput), `rounds_rps` "
                "lists every round's req/s in run order."
            )
        base = next((s for s in self.summaries if s["name"].startswith("baseline")), None)
        raw_by_variant = {s["variant"]: s for s in self.summaries if s["name"].startswith("raw")}
        inproc_by_variant = {
            s["variant"]: s for s in self.summaries if s["name"].startswith("nlpserve in-process")
        }
        for s in self.summaries:
            rps = s.get("throughput_rps")
            if base and rps and base.get("throughput_rps"):
                s["ratio_to_baseline"] = rps / base["throughput_rps"]
            raw = raw_by_variant.get(s.get("variant", ""))
            if raw and rps and not s["name"].startswith("raw"):
                s["fraction_of_raw_ort"] = rps / raw["throughput_rps"]
            inproc = inproc_by_variant.get(s.get("variant", ""))
            if inproc and s["name"].startswith("nlpserve via Redis") and rps:
                s["fraction_of_inprocess"] = rps / inproc["throughput_rps"]

        # Answers: every HTTP configuration against raw ORT of its variant (fp32 for the
        # baseline: PyTorch vs its own ONNX export), and every other variant against fp32.
        checks: dict[str, Any] = {}
        fallback_ref = raw_by_variant.get("fp32") or next(iter(raw_by_variant.values()), None)
        for s in self.summaries:
            if s["name"].startswith("raw"):
                continue
            ref = raw_by_variant.get(s.get("variant", "fp32")) or fallback_ref
            if ref:
                checks[f"{s['name']} vs {ref['name']}"] = _compare(
                    self.answers.get(s["name"], {}), self.answers.get(ref["name"], {})
                )
        raw_fp32 = self.answers.get(raw_by_variant.get("fp32", {}).get("name", ""), {})
        for v, r in raw_by_variant.items():
            if v != "fp32" and raw_fp32:
                checks[f"raw ORT {v} vs fp32 (same requests)"] = _compare(
                    self.answers[r["name"]], raw_fp32
                )
        variants = self.manifest.get("variants", {})
        accuracy = {
            v: variants[v].get("metrics", {}) for v in ("fp32", "int8", "fp16") if v in variants
        }
        int8 = accuracy.get("int8", {})
        # fp32's figures: its variant entry, else the manifest's (measured on fp32 at export).
        fp32_acc = accuracy.get("fp32", {}).get(
            "accuracy", self.manifest["metrics"].get("accuracy")
        )
        ran_int8 = "int8" in raw_by_variant or "int8" in inproc_by_variant
        if (
            ran_int8
            and int8.get("accuracy_drop") is not None
            and None not in (int8.get("accuracy"), fp32_acc)
        ):
            self.notes.append(
                f"int8 accuracy cost on the held-out test split (manifest): accuracy "
                f"{int8['accuracy']:.4f} vs fp32 {fp32_acc:.4f} (drop "
                f"{int8['accuracy_drop']:+.4f}), ROC AUC drop "
                f"{int8.get('roc_auc_drop', float('nan')):+.4f}."
            )
        if self.providers_used:
            used = ", ".join(f"{k}: {v}" for k, v in self.providers_used.items())
            self.notes.append(f"ran on: {used}.")
        lengths = np.array([s.tokens for s in self.specs])
        machine = machine_description(self.device)
        machine["providers_used"] = dict(self.providers_used)
        where = self.device
        if self.cuda and machine.get("gpu"):
            where = f"cuda ({machine['gpu'][0].get('name')})"
        unit = "context characters" if self.task == "qa" else "tokens"
        length_info: dict[str, Any] = {
            "unit": unit,
            "p50": int(np.median(lengths)),
            "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "source": self.requests_source,
        }
        if self.task != "qa":  # QA lengths are characters: windows, not truncation
            length_info["at_max_length"] = float(np.mean(lengths >= self.manifest["max_length"]))
        meta = {
            "title": f"{self.args.model} v{self.version_dir.name} on {where}, concurrency "
            f"{self.args.concurrency}, {len(self.specs)} mixed-length requests",
            "command": command,
            "model": f"{self.args.model}/{self.version_dir.name}",
            "device": self.device,
            "requests": len(self.specs),
            "baseline_requests": min(
                self.args.baseline_requests or len(self.specs), len(self.specs)
            ),  # fmt: skip
            "concurrency": self.args.concurrency,
            "lengths": length_info,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": _settings_line(self.device),
            "serve_env": dict(kv.split("=", 1) for kv in self.args.serve_env) or None,
            "buckets": {
                "manifest": self.manifest["buckets"],
                "nlpserve runs": self.buckets or self.manifest["buckets"],
            },
        }
        targets = self._targets(base, raw_by_variant, inproc_by_variant)
        for t in targets:
            mark = "met" if t["met"] else "NOT met"
            self.notes.append(f"target {t['target']}: measured {t['measured']} ({mark})")
        extra = {"answers": checks, "variant_metrics": accuracy, "targets": targets}
        return write_reports(out_base, self.summaries, self.lat, meta, machine, self.notes, extra)


LATENCIES_KEY = "_latencies"


def log_warnings(text: str, limit: int = 10) -> list[str]:
    """A child's WARNING/ERROR/CRITICAL log lines, each message once (its first line, the
    time stamp left off), at most ``limit`` of them."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        for level in (" WARNING ", " ERROR ", " CRITICAL "):
            if level in line:
                seen.setdefault(level.strip() + " " + line.split(level, 1)[1])
                break
        if len(seen) >= limit:
            break
    return list(seen)


def merge_rounds(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per configuration name, in first-run order: the round with the median
    throughput (the lower median for an even count), with ``rounds_rps`` listing every
    round's throughput in run order. On a shared 2-core VM consecutive identical runs differ
    by ±7%: the median of alternated rounds ranks two configurations, one run does not."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(s["name"], []).append(s)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        ranked = sorted(runs, key=lambda r: r.get("throughput_rps") or 0.0)
        chosen = dict(ranked[(len(ranked) - 1) // 2])
        chosen["rounds_rps"] = [round(r.get("throughput_rps") or 0.0, 2) for r in runs]
        out.append(chosen)
    return out


def _source_of(task: str, data: Path | None) -> str:
    if task == "qa":
        have = data is not None and (data / "cmrc2018" / "cmrc2018_dev.json").is_file()
        return "CMRC 2018 dev (question, context) pairs" if have else "built-in Chinese passage"
    if task == "detect" and data is not None and any((data / "hc3" / "en").glob("*.jsonl")):
        return "HC3 English sentences"
    return "built-in word list"  # the detector without HC3; pos and polarity always


def _settings_line(device: str) -> str:
    from service.config import Settings

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    policy = Settings(
        _env_file=None, max_batch_tokens=None, max_wait_ms=None, min_padding_efficiency=None
    ).batch_policy(provider)
    return (
        f"nlpserve defaults (max_batch_size {policy.max_batch_size}, max_batch_tokens "
        f"{policy.max_batch_tokens} on {device}, max_wait_ms {policy.max_wait_s * 1000:g}, "
        f"min_padding_efficiency {policy.min_padding_efficiency:g}) "
        "unless NLPSERVE_* set in the environment or --serve-env"
    )


def _target(name: str, measured: float | None, goal: float, higher: bool = True,
            fmt: str = "{:.2f}") -> dict[str, Any] | None:  # fmt: skip
    if measured is None:
        return None
    met = measured >= goal if higher else measured < goal
    return {"target": name, "measured": fmt.format(measured), "met": bool(met)}


# The GPU targets: nlpserve in-process against the naive per-request PyTorch baseline
# on the same GPU, and against raw ORT on CUDA (every variant: fp32 and fp16).
GPU_RATIO_TO_BASELINE = 20.0
GPU_FRACTION_OF_RAW = 0.70
# Issue 7's CPU targets, per variant.
CPU_RATIO_TO_BASELINE = {"fp32": 2.5, "int8": 4.0}
CPU_FRACTION_OF_RAW = 0.85


def _targets_of(base: dict[str, Any] | None, raw: dict[str, dict[str, Any]],
                inproc: dict[str, dict[str, Any]], redis: dict[str, dict[str, Any]],
                device: str = "cpu") -> list[dict[str, Any]]:  # fmt: skip
    """The targets of ``device``, checked against this run (reported, never asserted)."""
    out: list[dict[str, Any] | None] = []
    if device == "cuda":
        for v, s in inproc.items():
            name = f"in-process {v} >= {GPU_RATIO_TO_BASELINE:g}x baseline (same GPU)"
            out.append(_target(name, s.get("ratio_to_baseline"), GPU_RATIO_TO_BASELINE,
                               fmt="{:.2f}x"))  # fmt: skip
            if v in raw:
                name = f"in-process {v} >= {GPU_FRACTION_OF_RAW:.0%} of raw ORT CUDA"
                out.append(_target(name, s.get("fraction_of_raw_ort"), GPU_FRACTION_OF_RAW,
                                   fmt="{:.1%}"))  # fmt: skip
        return [t for t in out if t is not None]
    for v, s in inproc.items():
        goal = CPU_RATIO_TO_BASELINE.get(v)
        if goal is not None:
            name = f"in-process {v} >= {goal}x baseline"
            out.append(_target(name, s.get("ratio_to_baseline"), goal, fmt="{:.2f}x"))
        if base is not None:
            p99 = base["latency_ms"]["p99"]
            name = f"in-process {v} p99 < baseline p99 ({p99} ms)"
            out.append(_target(name, s["latency_ms"]["p99"], p99, higher=False, fmt="{:.0f} ms"))
        if v in raw:
            name = f"in-process {v} >= {CPU_FRACTION_OF_RAW:.0%} of raw ORT"
            out.append(_target(name, s.get("fraction_of_raw_ort"), CPU_FRACTION_OF_RAW,
                               fmt="{:.1%}"))  # fmt: skip
        name = f"in-process {v} padding efficiency >= 0.90"
        out.append(_target(name, s.get("padding_efficiency"), 0.90, fmt="{:.3f}"))
        if v in redis:
            name = f"Redis {v} >= 80% of in-process"
            out.append(_target(name, redis[v].get("fraction_of_inprocess"), 0.80, fmt="{:.1%}"))
    return [t for t in out if t is not None]


def _interrupt(signum: int, frame: Any) -> None:
    # `timeout` (the GPU session's time guard) sends SIGTERM: treat it like Ctrl-C so the
    # runs measured so far are still written.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM is :func:`_interrupt` inside the block, and what it was after it: main() also
    runs in-process (tests), where the handler must not outlive the call."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each option's help wrapped with its default (when it
    has one: an unset option's help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _check_variants(p: argparse.ArgumentParser, args: argparse.Namespace,
                    configs: Sequence[str]) -> None:  # fmt: skip
    """Refuse --variants that name no precision and no variant of the version, or (for the
    configurations that run per variant) none the version has or --derive-variants makes."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    version = _latest_version(args.models, args.model)
    have = json.loads((version / "manifest.json").read_text())["variants"]
    names = set(have) | {v.get("precision", k) for k, v in have.items()}
    unknown = [v for v in wanted if v not in PRECISIONS and v not in names]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(PRECISIONS)} "
                f"({args.model} v{version.name} has {', '.join(sorted(have))})")  # fmt: skip
    if not set(configs) & {"raw", "inprocess", "redis"}:
        return  # the baseline alone runs no variant
    from bench.variants import DERIVABLE

    runnable = names | (set(DERIVABLE) if args.derive_variants else set())
    if not wanted:
        p.error("--variants is empty")
    if not set(wanted) & runnable:
        p.error(f"--variants {','.join(wanted)}: {args.model} v{version.name} has none of them "
                f"(it has {', '.join(sorted(have))}); --derive-variants makes "
                f"{'/'.join(DERIVABLE)}")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """bench.run's command line (every option has help; ``--help`` shows the defaults)."""
    shared = procs.REPO_ROOT.parent / "shared" / "data"
    p = argparse.ArgumentParser(
        prog="bench.run",
        usage="python -m bench.run [options]  (--help lists them)",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--models",
        type=Path,
        default=procs.REPO_ROOT / "models",
        help="model repository: <model>/<version>/manifest.json (the highest version runs)",
    )
    p.add_argument(
        "--model",
        default="detector-en",
        help="the model to benchmark: detector-en, qa-zh, pos-en or polarity-en",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=shared if shared.is_dir() else None,
        help="data root for the request texts (hc3/en for the detector, cmrc2018 for QA); "
        "must exist when given; left out, built-in texts (the report says so)",
    )
    p.add_argument("--requests", type=int, default=1000, help="measured requests per run")
    p.add_argument(
        "--requests-file",
        type=Path,
        default=None,
        help="requests saved by --save-requests (the first --requests of them)",
    )
    p.add_argument(
        "--save-requests",
        type=Path,
        default=None,
        metavar="FILE",
        help="only write the generated requests to FILE (JSON lines) and exit",
    )
    p.add_argument("--concurrency", type=int, default=32, help="clients (closed loop)")
    p.add_argument(
        "--warmup",
        type=int,
        default=64,
        help="requests sent before each HTTP run, not measured",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the configurations this many times, alternating, and report each one's "
        "median round (a shared CPU drifts by several %% between runs)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: (a) on the GPU, (b)-(d) on ORT's CUDA provider (no fallback)",
    )
    p.add_argument(
        "--variants",
        default="fp32,int8",
        help=f"of {', '.join(PRECISIONS)} (or the manifest's variant names): those the version "
        "has run, the others are noted",
    )
    p.add_argument(
        "--derive-variants",
        action="store_true",
        help="make requested fp32/fp16 variants the version lacks (bench/variants.py)",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="any of baseline (a), raw (b), inprocess (c), redis (d), comma-separated",
    )
    p.add_argument(
        "--hf-dir",
        type=Path,
        default=None,
        help="PyTorch checkpoint for (a) (default: one found under runs/, else the weights "
        "rebuilt from the ONNX file)",
    )
    p.add_argument(
        "--baseline-dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="torch dtype of (a); fp16 needs --device cuda",
    )
    p.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="(a) runs the first N requests only (default: all)",
    )
    p.add_argument(
        "--buckets",
        default="",
        help="NLPSERVE_BUCKETS for (c)/(d): '' = the "
        "manifest's, 'auto' = from the request lengths, or edges '32,64,128'",
    )
    p.add_argument(
        "--also-manifest-buckets",
        action="store_true",
        help="with --buckets: also run (c) with the manifest's buckets",
    )
    p.add_argument(
        "--raw-seconds",
        type=float,
        default=8.0,
        help="(b): pass over the requests for at least this many seconds per batch size",
    )
    p.add_argument("--raw-batch-sizes", default="8,16,32", help="(b) reports the best of these")
    p.add_argument(
        "--max-load",
        type=float,
        default=1.0,
        help="before each run, wait while the 1-minute load average is above this (said on "
        "stderr and in the notes)",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=60.0,
        help="...for at most this many seconds per run (0: never wait)",
    )
    p.add_argument("--seed", type=int, default=13, help="seed of the generated requests")
    p.add_argument(
        "--name",
        default=None,
        help="results file name (default: <model>-<device>-<timestamp>)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NLPSERVE_X=V",
        help="setting for the nlpserve runs (c)/(d) only; repeatable",
    )
    p.add_argument(
        "--api-replicas",
        type=int,
        default=1,
        help="(c): N in-process servers, each with its own model session; (d): N API "
        "processes in front of the one worker; the clients are spread over them",
    )
    p.add_argument(
        "--redis-api-replicas",
        type=int,
        default=None,
        help="(d) only: N API processes in front of the one worker (default: --api-replicas); "
        "on a GPU one worker can feed more API processes than (c) has useful replicas",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="load-generator processes for the measured runs (one Python process tops out "
        "at a few thousand req/s)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where <name>.json/.md/.png go",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)

    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    # Mistyped inputs: one line and exit status 2 before anything runs, not a traceback, and
    # not an empty report (a config name) or numbers on other texts (a --data path).
    problem = model_folder_problem(args.models, args.model)
    if problem is not None:
        p.error(problem)
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder (leave --data out for built-in texts)")
    if args.save_requests is not None:
        specs = build_requests(args.model, args.requests, models_dir=args.models,
                               data_dir=args.data, seed=args.seed)  # fmt: skip
        args.save_requests.parent.mkdir(parents=True, exist_ok=True)
        save_requests(specs, args.save_requests)
        print(f"wrote {len(specs)} {args.model} requests to {args.save_requests}")
        return 0
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        what = f"unknown {', '.join(unknown)}" if unknown else "none given"
        p.error(f"--configs: {what}; valid: {', '.join(CONFIGS)}")
    _check_variants(p, args, configs)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        check_device(args.device, configs, args.baseline_dtype)
    except DeviceError as e:
        raise SystemExit(f"bench: {e}") from None
    with _sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="nlpserve-bench-") as td:
        bench = Bench(args, Path(td))
        bench.notes.extend(args.note)
        present = {v.get("precision", k): k for k, v in bench.manifest["variants"].items()}
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        variants = [v for v in wanted if v in bench.manifest["variants"] or v in present]
        for v in wanted:
            if v not in variants:
                bench.notes.append(
                    f"variant {v} not in the manifest: not run (--derive-variants makes it)."
                )
        print(f"benchmark {args.model} v{bench.version_dir.name} on {args.device}: "
              f"{len(bench.specs)} requests, concurrency {args.concurrency}, variants "
              f"{variants}, configs {configs}", flush=True)  # fmt: skip
        failed: list[str] = []

        def attempt(label: str, run: Any, *a: Any, **kw: Any) -> None:
            # One configuration failing (a server that does not start on CUDA, say) must not
            # cost the others: on a lent GPU there is no second try. It is in the notes.
            try:
                run(*a, **kw)
            except Exception as e:  # reported in the notes, and the exit status says so
                lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [""]
                # The first line says what failed; a child's log tail ends with why.
                first = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
                if isinstance(e, FileNotFoundError) and label.startswith("redis"):
                    bench.notes.append(f"{label} not run: {first}")  # no redis-server here
                    print(f"  {label}: not run ({first})", flush=True)
                    return
                bench.notes.append(f"{label} FAILED: {type(e).__name__}: {first}")
                print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
                failed.append(label)

        try:
            for r in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {r + 1}/{args.rounds}", flush=True)
                if "baseline" in configs:
                    attempt("baseline", bench.baseline)
                for v in variants:
                    if "raw" in configs:
                        attempt(f"raw ORT ({v})", bench.raw, v)
                    if "inprocess" in configs:
                        attempt(f"in-process ({v})", bench.inprocess, v)
                        if bench.buckets is not None and args.also_manifest_buckets:
                            attempt(f"in-process, manifest buckets ({v})", bench.inprocess, v,
                                    manifest_buckets=True)  # fmt: skip
            # Redis last: the targets need (a)-(c) of every variant, and a time limit
            # (bench/gpu_session.sh) should cut the scale-out runs first.
            for _ in range(args.rounds if "redis" in configs else 0):
                for v in variants:
                    attempt(f"redis ({v})", bench.redis, v)
        except KeyboardInterrupt:
            bench.notes.append("interrupted (time limit): only the runs above were measured.")
            print("interrupted: writing what was measured", flush=True)
        finally:
            stamp = datetime.now().strftime("%Y%m%d-%H%M")
            name = args.name or f"{args.model}-{args.device}-{stamp}"
            with contextlib.suppress(Exception):
                logs = sorted((Path(td) / "logs").glob("*.log"))
                for lp in logs:
                    text = lp.read_text(errors="replace")
                    if "Traceback" in text:
                        print(f"--- {lp.name} (has a traceback)\n{text[-3000:]}")
                    elif warned := log_warnings(text):
                        # e.g. "IO binding failed", a provider fallback, non-finite fp16
                        # outputs: the logs go with the temporary folder, the GPU log stays
                        print(f"--- {lp.name} (warnings)\n" + "\n".join(warned))
            paths = bench.finish(args.results_dir / name, command)
            for pth in paths:
                print(f"wrote {pth}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
