"""A/B two server setups on one machine, round by round, with each process's CPU per request.

On a shared 2-core VM one round's throughput moves by ±10% with the neighbours' load, so one
run of each setup cannot tell a 5% change from noise. This script alternates them on the same
pre-generated requests, in the order A B, B A, A B, ... (the second of a pair ran 2-3% slower
on one host, whichever setup it was: a fixed order would charge that to B). It prints, per
round, the throughput and the CPU per request of each process (the API's event loop and its
other threads, the Redis worker, redis-server, this load generator) and the batches' mean size
and padding efficiency (from the ``/metrics`` of the process running the model), then the
medians and B/A per pair of rounds, with each setup's p50/p99 and, where the response cache
is on, its hit ratio. The warm-up sends other texts than the measured ones, so a cache
starts each round knowing none of them.

    # a setting
    python -m bench.ab --data ../shared/data --rounds 4 --a-env NLPSERVE_FAST_PATH=0
    # another commit's code (A) against this tree (B)
    git worktree add /tmp/old <commit>
    python -m bench.ab --data ../shared/data --rounds 4 --a-source /tmp/old
    # the Redis path (1 API process, 1 worker), with a model that costs nothing
    python -m bench.ab --data ../shared/data --queue redis --near-free --a-source /tmp/old
    # the response cache, off (A) and on (B), when half the requests repeat 100 texts
    python -m bench.ab --data ../shared/data --hot-fraction 0.5 --hot-set 100 \
        --b-env NLPSERVE_RESPONSE_CACHE_MB=64

``--near-free`` serves a copy of the model whose ONNX files are replaced by a graph of a few
nodes with the same inputs and outputs (:func:`near_free_repo`). The model then costs nothing,
and what is measured is the serving path alone: HTTP, validation, tokenizing, queueing,
decoding. That is what bounds one API process or one worker in front of a GPU. Answers are
meaningless there. ``--a-source`` puts another source tree first on ``PYTHONPATH``, so
``service`` is imported from there. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.cpu_account import Account, measure, process_cpu, warm_up
from bench.loadgen import (
    build_requests,
    hot_set_requests,
    metrics_delta,
    model_folder_problem,
    scrape_metrics,
)
from bench.raw_ort import device_providers
from service.repository import load_manifest

# ---------------------------------------------------------------------------- a free model


def _free_graph(manifest: Any) -> Any:
    """An ONNX graph with the manifest's inputs and outputs and almost no work: every output
    is the first ``[batch, sequence]`` input cast and broadcast to the output's shape."""
    import onnx
    from onnx import TensorProto, helper

    dtypes = {"int64": TensorProto.INT64, "int32": TensorProto.INT32,
              "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}  # fmt: skip
    src = next((i for i in manifest.inputs if list(i.shape)[:2] == ["batch", "sequence"]), None)
    if src is None:
        raise ValueError(f"{manifest.name}: no [batch, sequence] input to derive outputs from")
    inputs = [helper.make_tensor_value_info(i.name, dtypes[i.dtype], list(i.shape))
              for i in manifest.inputs]  # fmt: skip
    outputs, nodes, inits = [], [], []
    for k, out in enumerate(manifest.outputs):
        shape = list(out.shape)
        outputs.append(helper.make_tensor_value_info(out.name, dtypes[out.dtype], shape))
        cast = f"cast{k}"
        nodes.append(helper.make_node("Cast", [src.name], [cast], to=dtypes[out.dtype]))
        fixed = [d if isinstance(d, int) else len(manifest.labels or []) for d in shape[2:]]
        if shape[:2] == ["batch", "sequence"] and not fixed:
            nodes.append(helper.make_node("Identity", [cast], [out.name]))
        elif shape[:2] == ["batch", "sequence"]:  # [batch, sequence, C]
            inits.append(helper.make_tensor(f"ax{k}", TensorProto.INT64, [1], [2]))
            inits.append(helper.make_tensor(f"to{k}", TensorProto.INT64, [3], [1, 1, *fixed]))
            nodes.append(helper.make_node("Unsqueeze", [cast, f"ax{k}"], [f"u{k}"]))
            nodes.append(helper.make_node("Expand", [f"u{k}", f"to{k}"], [out.name]))
        else:  # [batch, C]
            cols = shape[1] if isinstance(shape[1], int) else len(manifest.labels or [])
            inits.append(helper.make_tensor(f"to{k}", TensorProto.INT64, [2], [1, cols]))
            nodes.append(helper.make_node("ReduceMean", [cast], [f"m{k}"], axes=[1], keepdims=1))
            nodes.append(helper.make_node("Expand", [f"m{k}", f"to{k}"], [out.name]))
    graph = helper.make_graph(nodes, f"{manifest.name}-near-free", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def near_free_repo(version_dir: Path, dest: Path) -> Path:
    """A model repository at ``dest`` with one model: a copy of ``version_dir`` (tokenizer,
    labels, buckets, manifest) whose every variant file is a near-free graph."""
    import onnx

    manifest = load_manifest(version_dir, check_files=False)
    target = dest / manifest.name / version_dir.name
    shutil.copytree(version_dir, target)
    raw = json.loads((target / "manifest.json").read_text("utf-8"))
    model = _free_graph(manifest)
    for spec in raw["variants"].values():
        path = target / spec["file"]
        onnx.save(model, path)
        spec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (target / "manifest.json").write_text(json.dumps(raw, indent=2), "utf-8")
    return dest


# ---------------------------------------------------------------------------- the rounds


@dataclass
class Round:
    label: str
    account: Account
    worker_ms: float | None = None
    redis_ms: float | None = None
    # The round's batches, from /metrics: a setting can win by forming bigger batches.
    batches: dict[str, float | None] = field(default_factory=dict)

    def line(self) -> str:
        extra = ""
        if self.worker_ms is not None:
            extra = f" | worker {self.worker_ms:.3f}, redis-server {self.redis_ms:.3f} ms/request"
        mean, eff = self.batches.get("mean_batch_size"), self.batches.get("padding_efficiency")
        if mean is not None and eff is not None:
            extra += f" | mean batch {mean:.2f}, padding {eff:.3f}"
        if (hits := self.batches.get("cache_hit_ratio")) is not None:
            extra += f" | cache hits {hits:.1%}"
        p50, p99 = self.account.p50_ms, self.account.p99_ms
        if p50 is not None and p99 is not None:
            extra += f" | p50 {p50:.1f}, p99 {p99:.1f} ms"
        return f"{self.label}: {self.account.line()}{extra}"


@dataclass
class Setup:
    label: str
    env: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    def environ(self, common: dict[str, str]) -> dict[str, str]:
        env = {**common, **self.env}
        if self.source is not None:
            path = [str(self.source.resolve()), os.environ.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return env

    def start(self, name: str, argv: list[str], logs: Path, env: dict[str, str]) -> procs.Proc:
        """Start a process of this setup. ``python -m`` puts its working directory ahead of
        ``PYTHONPATH`` on ``sys.path``, so a source tree runs from its own folder: from this
        repository, ``service`` would be imported from here whatever ``PYTHONPATH`` says."""
        cwd = self.source.resolve() if self.source is not None else None
        return procs.start(name, argv, logs, env=env, cwd=cwd)


def _serve_argv(role: str, models: Path) -> list[str]:
    # `python -m service.cli`, not the entry point: PYTHONPATH then decides whose code runs.
    return [sys.executable, "-m", "service.cli", role, "--models", str(models)]


def run_round(setup: Setup, args: argparse.Namespace, models: Path, specs: Sequence[Any],
              warm: Sequence[Any], logs: Path, redis_url: str | None,
              redis_pid: int | None) -> Round:  # fmt: skip
    common = {
        "NLPSERVE_PROVIDERS": device_providers("cpu"),
        "NLPSERVE_QUEUE": args.queue,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.variant:
        common["NLPSERVE_VARIANT"] = args.variant
    env = setup.environ(common)
    started: list[procs.Proc] = []
    with procs.stopping(started):
        worker = None
        if redis_url is not None:
            env["NLPSERVE_REDIS_URL"] = redis_url
            wport = procs.free_port()
            worker = setup.start(f"worker-{setup.label}", _serve_argv("worker", models), logs,
                                 env={**env, "NLPSERVE_METRICS_PORT": str(wport)})  # fmt: skip
            started.append(worker)
        port = procs.free_port()
        api = setup.start(f"api-{setup.label}", [*_serve_argv("serve", models), "--port",
                          str(port)], logs, env=env)  # fmt: skip
        started.append(api)
        url = f"http://127.0.0.1:{port}"
        procs.wait_http(api, f"{url}/readyz", timeout_s=180)
        if worker is not None:
            procs.wait_http(worker, f"http://127.0.0.1:{wport}/readyz", timeout_s=180)
        warm_up(url, warm, args.concurrency)
        # Batches run where the model runs: the API in-process, the worker with Redis.
        metrics_url = f"{url}/metrics" if worker is None else f"http://127.0.0.1:{wport}/metrics"
        watched: list[int] = []  # processes besides the API whose CPU the round accounts
        if worker is not None:
            assert redis_pid is not None
            watched = [worker.pid, redis_pid]
        m0, before = scrape_metrics([metrics_url]), [process_cpu(p) for p in watched]
        account = measure(api.pid, url, specs, args.concurrency)
        after = [process_cpu(p) for p in watched]
        batches = metrics_delta(m0, scrape_metrics([metrics_url]), args.model)
    if worker is None:
        return Round(setup.label, account=account, batches=batches)
    worker_ms, redis_ms = ((b - a) * 1000 / len(specs) for a, b in zip(before, after, strict=True))
    return Round(setup.label, account, worker_ms, redis_ms, batches)


def summarize(rounds: list[Round]) -> dict[str, Any]:
    """Medians per setup, and B/A throughput per pair of rounds (the same moment's noise)."""
    out: dict[str, Any] = {}
    for label in ("A", "B"):
        rs = [r for r in rounds if r.label == label]
        out[label] = {
            "rounds_rps": [round(r.account.throughput, 1) for r in rs],
            "median_rps": statistics.median(r.account.throughput for r in rs),
            "median_event_loop_ms": statistics.median(r.account.main_ms for r in rs),
            "median_other_threads_ms": statistics.median(r.account.other_ms for r in rs),
            "median_client_ms": statistics.median(r.account.client_ms for r in rs),
        }
        for key in ("p50_ms", "p99_ms"):
            values = [v for r in rs if (v := getattr(r.account, key)) is not None]
            out[label][f"median_{key}"] = statistics.median(values) if values else None
        for key in ("mean_batch_size", "padding_efficiency", "cache_hit_ratio"):
            values = [v for r in rs if (v := r.batches.get(key)) is not None]
            out[label][f"median_{key}"] = statistics.median(values) if values else None
        if rs and rs[0].worker_ms is not None:
            out[label]["median_worker_ms"] = statistics.median(r.worker_ms or 0 for r in rs)
    a = [r for r in rounds if r.label == "A"]
    b = [r for r in rounds if r.label == "B"]
    ratios = [y.account.throughput / x.account.throughput for x, y in zip(a, b, strict=False)]
    out["order"] = [r.label for r in rounds]
    out["b_over_a"] = [round(x, 3) for x in ratios]
    out["median_b_over_a"] = statistics.median(ratios) if ratios else None
    return out


def _flush(redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        r.flushall()


def _env_pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench.ab: expected KEY=VALUE, got {kv!r}")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.ab",
        usage="python -m bench.ab [options]  (--help lists them)",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--models", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    p.add_argument("--model", default="detector-en", help="default: detector-en")
    p.add_argument("--version", default=None, help="default: the model's highest version")
    p.add_argument("--variant", default=None, help="NLPSERVE_VARIANT for both setups")
    p.add_argument(
        "--data", type=Path, default=None, help="data root for the request texts (else built-in)"
    )
    p.add_argument("--requests", type=int, default=3000, help="per round (default: 3000)")
    p.add_argument("--warmup", type=int, default=300, help="per round, unmeasured (default: 300)")
    p.add_argument("--concurrency", type=int, default=32, help="clients (default: 32)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per setup, alternated")
    p.add_argument("--queue", choices=["inprocess", "redis"], default="inprocess")
    p.add_argument("--near-free", action="store_true", help="serve a copy that costs nothing")
    p.add_argument(
        "--hot-fraction",
        type=float,
        default=0.0,
        help="share of requests repeating a text of the hot set (default: 0)",
    )
    p.add_argument(
        "--hot-set",
        type=int,
        default=100,
        help="the hot set: that many texts, drawn Zipf-like (default: 100)",
    )
    p.add_argument("--a-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--a-source", type=Path, default=None, help="A's source tree (PYTHONPATH)")
    p.add_argument("--b-source", type=Path, default=None, help="B's source tree (PYTHONPATH)")
    p.add_argument("--json", type=Path, default=None, help="also write the rounds here")
    args = p.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        raise SystemExit("bench.ab: needs Linux /proc")
    setups = [Setup("A", _env_pairs(args.a_env), args.a_source),
              Setup("B", _env_pairs(args.b_env), args.b_source)]  # fmt: skip
    for s in setups:
        if s.source is not None and not (s.source / "service" / "cli.py").exists():
            raise SystemExit(f"bench.ab: {s.source} is not an nlpserve source tree")

    # A mistyped path or name: one line and exit status 2, not a traceback.
    problem = model_folder_problem(args.models, args.model)
    if problem is not None:
        p.error(problem)
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder (leave --data out for built-in texts)")
    folder = args.models / args.model
    versions = sorted((d for d in folder.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    if args.version is not None and not (folder / args.version / "manifest.json").is_file():
        have = ", ".join(d.name for d in versions) or "none"
        p.error(f"--version {args.version}: no {folder / args.version}/manifest.json "
                f"(versions there: {have})")  # fmt: skip
    if args.version is None and not versions:
        p.error(f"--model {args.model}: no numbered version under {folder}")
    version = folder / args.version if args.version else versions[-1]
    with tempfile.TemporaryDirectory(prefix="nlpserve-ab-") as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "repo"
        if args.near_free:
            near_free_repo(version, models)
        else:
            shutil.copytree(version, models / args.model / version.name)
        # Warm-up texts are others than the measured ones: a response cache would know them.
        specs = build_requests(args.model, args.requests + args.warmup, models_dir=models,
                               data_dir=args.data)  # fmt: skip
        specs, warm = specs[: args.requests], specs[args.requests :]
        specs = hot_set_requests(specs, args.hot_fraction, args.hot_set)
        started: list[procs.Proc] = []
        with procs.stopping(started):
            redis_url = redis_pid = None
            if args.queue == "redis":
                rp, redis_url = procs.start_redis(tmp / "logs")
                started.append(rp)
                redis_pid = rp.pid
            rounds: list[Round] = []
            for r in range(args.rounds):
                for setup in setups if r % 2 == 0 else setups[::-1]:
                    if redis_url is not None:  # each round starts from an empty Redis
                        _flush(redis_url)
                    one = run_round(setup, args, models, specs, warm, tmp / "logs", redis_url,
                                    redis_pid)  # fmt: skip
                    rounds.append(one)
                    print(f"round {r + 1} {one.line()}", flush=True)
                    time.sleep(0.5)
    summary = summarize(rounds)
    for label in ("A", "B"):
        s = summary[label]
        worker = f", worker {s['median_worker_ms']:.3f}" if "median_worker_ms" in s else ""
        batch = s["median_mean_batch_size"]
        batch = f", mean batch {batch:.2f}" if batch is not None else ""
        print(f"{label}: median {s['median_rps']:.1f} req/s, event loop "
              f"{s['median_event_loop_ms']:.2f} ms/request{worker}{batch}")  # fmt: skip
    print(f"B/A per round: {summary['b_over_a']}, median {summary['median_b_over_a']:.3f}")
    if args.json is not None:
        from bench.report import machine_description

        args.json.write_text(json.dumps({"args": vars(args) | {"models": str(args.models)},
                                         "machine": machine_description("cpu"),
                                         "summary": summary}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
