"""Side-by-side benchmark (``make bench``): same machine, same weights, same requests.

    python -m bench.run --models models --data ../shared/data --requests 1000 --concurrency 32

Configurations, each fed the identical pre-generated request list (closed loop):
  (a) baseline          naive FastAPI + PyTorch, one forward per request (bench/baseline_app.py)
  (b) raw ORT           the ONNX model on pre-sorted batches, no HTTP (bench/raw_ort.py)
  (c) nlpserve          ``nlpserve serve`` with the in-process queue
  (d) nlpserve+redis    ``nlpserve serve`` (NLPSERVE_QUEUE=redis) + one ``nlpserve worker`` +
                        a private redis-server
(c) and (d) run once per ONNX variant present (fp32, int8: ``NLPSERVE_VARIANT``), (b) too.
Throughput is reported as a ratio to (a) and as a fraction of (b) of the same variant; every
HTTP answer is checked against the raw ORT answer for the same request (same weights, and
padding/batching must not change results). Writes ``bench/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
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
    metrics_delta,
    run_load,
    scrape_metrics,
    summarize,
)
from bench.report import machine_description, write_reports

RESULTS_DIR = procs.REPO_ROOT / "bench" / "results"  # committed: the measured numbers


def _latest_version(models_dir: Path, model: str) -> Path:
    versions = sorted(
        (p for p in (models_dir / model).iterdir() if (p / "manifest.json").is_file()),
        key=lambda p: int(p.name) if p.name.isdigit() else -1,
    )
    if not versions:
        raise FileNotFoundError(f"no version of {model} under {models_dir}")
    return versions[-1]


def find_hf_checkpoint(version_dir: Path, explicit: Path | None) -> Path | None:
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
        cands += [p.parent for p in reversed(found) if "detect" in str(p)]
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
    url: str,
    specs: Sequence[RequestSpec],
    concurrency: int,
    metrics_urls: Sequence[str],
    model: str,
    warmup: int,
) -> tuple[list[Result], float, dict[str, Any]]:
    if warmup:
        # Not measured: first requests pay for connection setup, thread pools, allocator.
        await run_load(url, specs[:warmup], concurrency=concurrency, keep_body=False)
    before = scrape_metrics(metrics_urls)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    results, wall = await run_load(
        url, specs, concurrency=concurrency, policy=RetryPolicy(retries=0), timeout_s=300.0
    )
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    after = scrape_metrics(metrics_urls)
    delta: dict[str, Any] = dict(metrics_delta(before, after, model))
    # The load generator shares the CPU with the server: say how much of it it took.
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    delta["client_cpu_ms_per_request"] = round(1000 * cpu / max(len(results), 1), 3)
    return results, wall, delta


def _answers(results: Sequence[Result]) -> dict[int, float]:
    out = {}
    for r in results:
        if r.status == 200 and r.body and "machine_probability" in r.body:
            out[r.id] = float(r.body["machine_probability"])
    return out


def _compare(got: dict[int, float], want: dict[int, float]) -> dict[str, Any]:
    common = sorted(set(got) & set(want))
    if not common:
        return {"compared": 0}
    g = np.array([got[i] for i in common])
    w = np.array([want[i] for i in common])
    return {
        "compared": len(common),
        "max_abs_diff_machine_probability": float(np.max(np.abs(g - w))),
        "label_agreement": float(np.mean((g >= 0.5) == (w >= 0.5))),
    }


def _softmax_machine(logits: dict[int, list[float]], machine_index: int) -> dict[int, float]:
    out = {}
    for i, row in logits.items():
        x = np.asarray(row, dtype=np.float64)
        e = np.exp(x - x.max())
        out[i] = float(e[machine_index] / e.sum())
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.version_dir = _latest_version(args.models, args.model)
        self.manifest = json.loads((self.version_dir / "manifest.json").read_text())
        self.repo = _single_model_repo(tmp, self.version_dir)
        self.logs = tmp / "logs"
        self.summaries: list[dict[str, Any]] = []
        self.lat: dict[str, list[float]] = {}
        self.answers: dict[str, dict[int, float]] = {}
        self.notes: list[str] = []
        self._loadavg_before = round(os.getloadavg()[0], 2)
        self.specs = build_requests(
            args.model,
            args.requests,
            models_dir=args.models,
            data_dir=args.data if args.data and args.data.is_dir() else None,
            seed=args.seed,
        )
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
        self.lat[name] = latencies(results)
        self.answers[name] = _answers(results)
        print(
            f"  {name}: {s['throughput_rps']:.1f} req/s, p50 {s['latency_ms']['p50']} ms, "
            f"p99 {s['latency_ms']['p99']} ms, errors {s['errors']}, "
            f"padding {s.get('padding_efficiency')}",
            flush=True,
        )
        return s

    def _settle(self) -> None:
        """Wait (bounded) for the machine to be idle: other jobs skew every number."""
        deadline = time.monotonic() + self.args.settle_s
        while time.monotonic() < deadline and os.getloadavg()[0] > self.args.max_load:
            time.sleep(2.0)
        self._loadavg_before = round(os.getloadavg()[0], 2)

    def _serve(self, name: str, env: dict[str, str]) -> tuple[procs.Proc, str]:
        port = procs.free_port()
        env = {**env, "NLPSERVE_HOST": "127.0.0.1", "NLPSERVE_PORT": str(port)}
        p = procs.start(name, [procs.nlpserve_bin(), "serve"], self.logs, env=env)
        url = f"http://127.0.0.1:{port}"
        procs.wait_http(p, url + "/readyz", timeout_s=180)
        return p, url

    def _run_http(self, name: str, url: str, metrics_urls: list[str], **extra: Any) -> None:
        self._settle()
        results, wall, mdelta = asyncio.run(
            _drive(url, self.specs, self.args.concurrency, metrics_urls, self.args.model,
                   self.args.warmup)
        )  # fmt: skip
        self._record(name, results, wall, mdelta, **extra)

    # ------------------------------------------------------------------ configurations
    def baseline(self) -> None:
        hf = find_hf_checkpoint(self.version_dir, self.args.hf_dir)
        source = f"checkpoint {hf}"
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
        self.notes.append(f"baseline weights: {source}; see `answers` for the parity check.")
        port = procs.free_port()
        argv = [sys.executable, "-m", "bench.baseline_app", "--hf-dir", str(hf),
                "--manifest-dir", str(self.version_dir), "--port", str(port)]  # fmt: skip
        p = procs.start("baseline", argv, self.logs, env=self._env())
        with procs.stopping([p]):
            url = f"http://127.0.0.1:{port}"
            procs.wait_http(p, url + "/readyz", timeout_s=180)
            self._run_http("baseline (PyTorch, per request)", url, [], weights=source)

    def raw(self, variant: str) -> None:
        from bench.raw_ort import run_raw_ort
        from service.config import Settings

        # The ceiling is the best of a few batch sizes: on a CPU, the largest batch is not
        # always the fastest per sequence (cache), and nlpserve's batches vary in size.
        sweep = []
        for bs in sorted({int(x) for x in self.args.raw_batch_sizes.split(",") if x.strip()}):
            self._settle()
            settings = Settings(model_dir=self.repo, max_batch_size=bs)
            r = run_raw_ort(self.specs, self.repo, self.args.model, variant=variant,
                            settings=settings, min_seconds=self.args.raw_seconds)  # fmt: skip
            sweep.append((r.throughput_sps, bs, r))
            print(f"    raw ORT ({variant}) batch<={bs}: {r.throughput_sps:.1f} seq/s", flush=True)
        best_sps, best_bs, res = max(sweep, key=lambda t: t[0])
        s = res.summary()
        s["max_batch_size"] = best_bs
        s["sweep_sps_by_max_batch_size"] = {str(bs): round(sps, 2) for sps, bs, _ in sweep}
        s["loadavg_before"] = self._loadavg_before
        self.summaries.append(s)
        machine = self.manifest["labels"].index("machine")
        self.answers[s["name"]] = _softmax_machine(res.outputs, machine)
        print(f"  {s['name']}: {s['throughput_rps']:.1f} seq/s, padding "
              f"{s['padding_efficiency']:.3f}", flush=True)  # fmt: skip

    def _nlpserve_env(self, **extra: str) -> dict[str, str]:
        env = self._env(**extra)
        if self.buckets is not None:
            env["NLPSERVE_BUCKETS"] = json.dumps({self.args.model: self.buckets})
        # --serve-env: settings for the nlpserve processes only (raw ORT keeps the defaults
        # it shares with them, the baseline has no such settings).
        env.update(dict(kv.split("=", 1) for kv in self.args.serve_env))
        return env

    def inprocess(self, variant: str, manifest_buckets: bool = False) -> None:
        env = self._nlpserve_env(NLPSERVE_QUEUE="inprocess", NLPSERVE_VARIANT=variant)
        name = f"nlpserve in-process ({variant})"
        if manifest_buckets:  # the comparison run: buckets as exported
            env.pop("NLPSERVE_BUCKETS", None)
            name = f"in-process, manifest buckets {self.manifest['buckets']} ({variant})"
        p, url = self._serve(f"serve-{variant}", env)
        with procs.stopping([p]):
            self._run_http(name, url, [url + "/metrics"], variant=variant)

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
            api, url = self._serve(f"serve-redis-{variant}", common)
            started.append(api)
            procs.wait_http(w, f"http://127.0.0.1:{mport}/readyz", timeout_s=180)
            self._run_http(f"nlpserve via Redis ({variant}, 1 worker)", url,
                           [url + "/metrics", f"http://127.0.0.1:{mport}/metrics"],
                           variant=variant)  # fmt: skip

    # ------------------------------------------------------------------ report
    def _targets(self, base: dict[str, Any] | None, raw: dict[str, dict[str, Any]],
                 inproc: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
        redis = {
            s["variant"]: s for s in self.summaries if s["name"].startswith("nlpserve via Redis")
        }
        return _targets_of(base, raw, inproc, redis)

    def finish(self, out_base: Path, command: str) -> list[Path]:
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
        # baseline: PyTorch vs its own ONNX export), and int8 against fp32.
        checks: dict[str, Any] = {}
        raw_fp32 = self.answers.get(raw_by_variant.get("fp32", {}).get("name", ""), {})
        for s in self.summaries:
            if s["name"].startswith("raw"):
                continue
            ref = raw_by_variant.get(s.get("variant", "fp32")) or raw_by_variant.get("int8")
            if ref:
                checks[f"{s['name']} vs {ref['name']}"] = _compare(
                    self.answers.get(s["name"], {}), self.answers.get(ref["name"], {})
                )
        if "int8" in raw_by_variant and raw_fp32:
            checks["raw ORT int8 vs fp32 (same requests)"] = _compare(
                self.answers[raw_by_variant["int8"]["name"]], raw_fp32
            )
        variants = self.manifest.get("variants", {})
        accuracy = {v: variants[v].get("metrics", {}) for v in ("fp32", "int8") if v in variants}
        if accuracy.get("int8", {}).get("accuracy_drop") is not None:
            self.notes.append(
                f"int8 accuracy cost on the held-out test split (manifest): accuracy "
                f"{accuracy['int8'].get('accuracy'):.4f} vs fp32 "
                f"{accuracy['fp32'].get('accuracy'):.4f} (drop "
                f"{accuracy['int8']['accuracy_drop']:+.4f}), ROC AUC drop "
                f"{accuracy['int8'].get('roc_auc_drop', float('nan')):+.4f}."
            )
        lengths = np.array([s.tokens for s in self.specs])
        meta = {
            "title": f"{self.args.model} v{self.version_dir.name}, concurrency "
            f"{self.args.concurrency}, {self.args.requests} mixed-length requests",
            "command": command,
            "model": f"{self.args.model}/{self.version_dir.name}",
            "requests": self.args.requests,
            "concurrency": self.args.concurrency,
            "lengths": {
                "tokens_p50": int(np.median(lengths)),
                "tokens_p90": int(np.percentile(lengths, 90)),
                "tokens_max": int(lengths.max()),
                "at_max_length": float(np.mean(lengths >= self.manifest["max_length"])),
                "source": "HC3 English sentences" if self.args.data else "built-in word list",
            },
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": "nlpserve defaults (max_batch_size 32, max_batch_tokens 8192, "
            "max_wait_ms 5) unless NLPSERVE_* set in the environment",
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
        return write_reports(
            out_base, self.summaries, self.lat, meta, machine_description(), self.notes, extra
        )


def _target(name: str, measured: float | None, goal: float, higher: bool = True,
            fmt: str = "{:.2f}") -> dict[str, Any] | None:  # fmt: skip
    if measured is None:
        return None
    met = measured >= goal if higher else measured < goal
    return {"target": name, "measured": fmt.format(measured), "met": bool(met)}


def _targets_of(base: dict[str, Any] | None, raw: dict[str, dict[str, Any]],
                inproc: dict[str, dict[str, Any]], redis: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:  # fmt: skip
    """Issue 7's CPU targets, checked against this run (reported, never asserted)."""
    out: list[dict[str, Any] | None] = []
    for v, s in inproc.items():
        goal = {"fp32": 2.5, "int8": 4.0}.get(v)
        if goal is not None:
            name = f"in-process {v} >= {goal}x baseline"
            out.append(_target(name, s.get("ratio_to_baseline"), goal, fmt="{:.2f}x"))
        if base is not None:
            p99 = base["latency_ms"]["p99"]
            name = f"in-process {v} p99 < baseline p99 ({p99} ms)"
            out.append(_target(name, s["latency_ms"]["p99"], p99, higher=False, fmt="{:.0f} ms"))
        if v in raw:
            name = f"in-process {v} >= 85% of raw ORT"
            out.append(_target(name, s.get("fraction_of_raw_ort"), 0.85, fmt="{:.1%}"))
        name = f"in-process {v} padding efficiency >= 0.90"
        out.append(_target(name, s.get("padding_efficiency"), 0.90, fmt="{:.3f}"))
        if v in redis:
            name = f"Redis {v} >= 80% of in-process"
            out.append(_target(name, redis[v].get("fraction_of_inprocess"), 0.80, fmt="{:.1%}"))
    return [t for t in out if t is not None]


def main(argv: Sequence[str] | None = None) -> int:
    shared = procs.REPO_ROOT.parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, default=procs.REPO_ROOT / "models")
    p.add_argument("--model", default="detector-en")
    p.add_argument("--data", type=Path, default=shared if shared.is_dir() else None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--variants", default="fp32,int8", help="those present in the manifest run")
    p.add_argument("--configs", default="baseline,raw,inprocess,redis")
    p.add_argument("--hf-dir", type=Path, default=None, help="PyTorch checkpoint for (a)")
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
    p.add_argument("--raw-seconds", type=float, default=8.0)
    p.add_argument("--raw-batch-sizes", default="8,16,32", help="(b) reports the best of these")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for loadavg below this")
    p.add_argument("--settle-s", type=float, default=60.0, help="...for at most this long")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--name", default=None, help="results file name (default: timestamped)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NLPSERVE_X=V",
        help="setting for the nlpserve runs (c)/(d) only; repeatable",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="nlpserve-bench-") as td:
        bench = Bench(args, Path(td))
        bench.notes.extend(args.note)
        present = set(bench.manifest["variants"])
        variants = [v for v in args.variants.split(",") if v in present]
        print(f"benchmark {args.model} v{bench.version_dir.name}: {len(bench.specs)} requests, "
              f"concurrency {args.concurrency}, variants {variants}, configs {configs}",
              flush=True)  # fmt: skip
        try:
            if "baseline" in configs:
                bench.baseline()
            for v in variants:
                if "raw" in configs:
                    bench.raw(v)
                if "inprocess" in configs:
                    bench.inprocess(v)
                    if bench.buckets is not None and args.also_manifest_buckets:
                        bench.inprocess(v, manifest_buckets=True)
                if "redis" in configs:
                    try:
                        bench.redis(v)
                    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
                        bench.notes.append(f"redis ({v}) not run: {e}".splitlines()[0])
                        print(f"  redis ({v}): FAILED {e}", flush=True)
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", flush=True)
        finally:
            name = args.name or f"{args.model}-cpu-{datetime.now().strftime('%Y%m%d-%H%M')}"
            with contextlib.suppress(Exception):
                logs = sorted((Path(td) / "logs").glob("*.log"))
                for lp in logs:
                    if "Traceback" in lp.read_text(errors="replace"):
                        print(f"--- {lp.name} (has a traceback)\n{lp.read_text()[-3000:]}")
            paths = bench.finish(args.results_dir / name, command)
            for pth in paths:
                print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
