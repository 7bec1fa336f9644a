"""The same requests over /v1 REST, /v2 REST (KServe V2), gRPC ModelInfer and (on request)
gRPC ModelStreamInfer, on one server.

    python -m bench.protocols --data ../shared/data --near-free --rounds 4 \\
        --name protocols-near-free-cpu-2core
    python -m bench.protocols --data ../shared/data --rounds 3 --requests 1000 \\
        --name protocols-detector-en-int8-cpu-2core

Each round starts one ``nlpserve serve`` (in-process queue, ``NLPSERVE_GRPC_PORT`` on),
warms each protocol up, then sends the identical pre-generated items (``bench.loadgen``,
one item per request, closed loop, ``--concurrency`` clients) over each protocol in turn;
the order rotates from one round to the next (v1 v2 grpc, v2 grpc v1, ...), so no protocol
always runs first or last. ``grpc_stream`` (``--protocols v1,grpc,grpc_stream``) sends the
same items as ModelStreamInfer requests: ``--grpc-streams`` streams share the
``--concurrency`` requests in flight, each stream sending its next as one of its own is
answered. Per protocol and round: throughput, p50/p99, the API process's
CPU per request (event loop and other threads, from ``/proc``) and the load generator's own
(it shares the cores). The report gives each protocol's medians and, per round, its
throughput and CPU per request against /v1's of the same round (the same moment's noise).
``--near-free`` serves a copy of the model that costs nothing (``bench.ab``): the serving
path alone. Writes ``bench/results/<name>.{json,md}`` with the machine description. Linux
only (``/proc``); gRPC needs the ``grpc`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.ab import near_free_repo
from bench.cpu_account import thread_cpu
from bench.grpcload import run_grpc_load, run_grpc_stream_load, v2_rest_specs
from bench.loadgen import (
    RequestSpec,
    Result,
    build_requests,
    metrics_delta,
    percentile,
    run_load,
    scrape_metrics,
)
from bench.raw_ort import device_providers

PROTOCOLS = ("v1", "v2", "grpc", "grpc_stream")
DEFAULT_PROTOCOLS = "v1,v2,grpc"  # grpc_stream on request (--protocols)
RESULTS = Path(__file__).with_name("results")


@dataclass
class Run:
    """One protocol in one round."""

    protocol: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    event_loop_ms: float  # the API's main thread, CPU per request
    other_threads_ms: float  # the API's other threads (ONNX Runtime's, gRPC's own)
    client_ms: float  # the load generator's process
    # The protocol's batches (from /metrics): one that delivers requests in bursts forms
    # bigger ones, which on a real model is worth more than its own parsing cost.
    mean_batch_size: float | None = None

    @property
    def server_ms(self) -> float:
        return self.event_loop_ms + self.other_threads_ms


async def _send(
    protocol: str, url: str, target: str, model: str, specs: Sequence[RequestSpec],
    concurrency: int, channels: int = 1, streams: int = 4,
) -> tuple[list[Result], float]:  # fmt: skip
    if protocol == "grpc":
        return await run_grpc_load(target, model, specs, concurrency=concurrency,
                                   channels=channels)  # fmt: skip
    if protocol == "grpc_stream":
        return await run_grpc_stream_load(target, model, specs, concurrency=concurrency,
                                          streams=streams, channels=channels)  # fmt: skip
    return await run_load(url, specs, concurrency=concurrency, keep_body=False)


def measure(protocol: str, r: int, pid: int, url: str, target: str, model: str,
            specs: Sequence[RequestSpec], concurrency: int, channels: int = 1,
            streams: int = 4) -> Run:  # fmt: skip
    m0 = scrape_metrics([f"{url}/metrics"])
    before, c0 = thread_cpu(pid), time.process_time()
    results, wall = asyncio.run(_send(protocol, url, target, model, specs, concurrency,
                                      channels, streams))  # fmt: skip
    after, c1 = thread_cpu(pid), time.process_time()
    batches = metrics_delta(m0, scrape_metrics([f"{url}/metrics"]), model)
    failed = [x for x in results if x.status != 200]
    if len(results) < len(specs):
        raise SystemExit(f"bench.protocols: {protocol}: {len(specs) - len(results)} of "
                         f"{len(specs)} requests were never sent (a stream failed)")  # fmt: skip
    if failed:
        first = failed[0]
        raise SystemExit(f"bench.protocols: {protocol}: {len(failed)} of {len(results)} "
                         f"requests failed, first: {first.status} {first.error}")  # fmt: skip
    n = len(specs)
    per_thread = {tid: (after[tid] - before.get(tid, 0.0)) * 1000 / n for tid in after}
    main = per_thread.pop(pid, 0.0)
    lat = [x.latency_s for x in results]
    return Run(protocol, r, n / wall, 1000 * (percentile(lat, 50) or 0.0),
               1000 * (percentile(lat, 99) or 0.0), main, sum(per_thread.values()),
               (c1 - c0) * 1000 / n, batches["mean_batch_size"])  # fmt: skip


def run_round(r: int, order: Sequence[str], args: argparse.Namespace, models: Path,
              work: dict[str, list[RequestSpec]], warm: dict[str, list[RequestSpec]],
              logs: Path) -> list[Run]:  # fmt: skip
    port, gport = procs.free_port(), procs.free_port()
    env = {
        "NLPSERVE_PROVIDERS": device_providers("cpu"),
        "NLPSERVE_GRPC_PORT": str(gport),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.variant:
        env["NLPSERVE_VARIANT"] = args.variant
    argv = [sys.executable, "-m", "service.cli", "serve", "--models", str(models),
            "--port", str(port)]  # fmt: skip
    started: list[procs.Proc] = []
    out = []
    with procs.stopping(started):
        api = procs.start(f"api-{r}", argv, logs, env=env)
        started.append(api)
        url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{gport}"
        procs.wait_http(api, f"{url}/readyz", timeout_s=180)
        for protocol in order:  # unmeasured: connections, sessions and allocators settle
            asyncio.run(_send(protocol, url, target, args.model, warm[protocol], args.concurrency,
                              args.grpc_channels, args.grpc_streams))  # fmt: skip
        for protocol in order:
            one = measure(protocol, r, api.pid, url, target, args.model, work[protocol],
                          args.concurrency, args.grpc_channels, args.grpc_streams)  # fmt: skip
            print(f"round {r + 1} {protocol:>11}: {one.rps:7.1f} req/s, p50 {one.p50_ms:.1f} "
                  f"p99 {one.p99_ms:.1f} ms | CPU ms/request: event loop "
                  f"{one.event_loop_ms:.3f}, other threads {one.other_threads_ms:.3f}, "
                  f"load generator {one.client_ms:.3f} | mean batch "
                  f"{one.mean_batch_size or 0:.2f}", flush=True)  # fmt: skip
            out.append(one)
    return out


def summarize(runs: Sequence[Run], protocols: Sequence[str]) -> dict[str, Any]:
    """Each protocol's medians, and per round its ratios to /v1 of the same round."""
    out: dict[str, Any] = {}
    base = {x.round: x for x in runs if x.protocol == protocols[0]}
    for p in protocols:
        rs = [x for x in runs if x.protocol == p]
        med = {k: statistics.median(getattr(x, k) for x in rs)
               for k in ("rps", "p50_ms", "p99_ms", "event_loop_ms", "other_threads_ms",
                         "server_ms", "client_ms")}  # fmt: skip
        batch = [x.mean_batch_size for x in rs if x.mean_batch_size is not None]
        med["mean_batch_size"] = statistics.median(batch) if batch else 0.0
        rps_ratio = [x.rps / base[x.round].rps for x in rs]
        cpu_ratio = [x.server_ms / base[x.round].server_ms for x in rs]
        out[p] = {
            "rounds_rps": [round(x.rps, 1) for x in rs],
            **{f"median_{k}": v for k, v in med.items()},
            f"rps_over_{protocols[0]}": [round(v, 3) for v in rps_ratio],
            f"median_rps_over_{protocols[0]}": statistics.median(rps_ratio),
            f"median_server_cpu_over_{protocols[0]}": statistics.median(cpu_ratio),
        }
    return out


def markdown(meta: dict[str, Any], machine: dict[str, Any], summary: dict[str, Any],
             protocols: Sequence[str]) -> str:  # fmt: skip
    base = protocols[0]
    lines = [f"# {meta['name']}", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if k != "name"]
    lines += [f"- **machine**: {machine.get('cpu')} ({machine.get('cpu_id')}; "
              f"{machine.get('usable_cpus')} usable CPUs), "
              f"onnxruntime {machine.get('onnxruntime', {}).get('version')}, "
              f"commit {machine.get('git_commit')}", ""]  # fmt: skip
    lines += [
        "Medians over the rounds; ratios are per round against /v1 of the same round, then "
        "the median. CPU is ms per request: the API process (event loop, other threads) and "
        "the load generator, which shares the cores.",
        "",
        f"| protocol | req/s (median) | rounds | × {base} (median of rounds) | p50 ms | p99 ms "
        f"| API event loop | API other threads | API total | API CPU × {base} | load generator "
        "| mean batch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in protocols:
        s = summary[p]
        rounds = " / ".join(f"{x:.0f}" for x in s["rounds_rps"])
        lines.append(
            f"| {p} | {s['median_rps']:.1f} | {rounds} | {s[f'median_rps_over_{base}']:.3f} "
            f"| {s['median_p50_ms']:.1f} | {s['median_p99_ms']:.1f} "
            f"| {s['median_event_loop_ms']:.3f} | {s['median_other_threads_ms']:.3f} "
            f"| {s['median_server_ms']:.3f} | {s[f'median_server_cpu_over_{base}']:.3f} "
            f"| {s['median_client_ms']:.3f} | {s['median_mean_batch_size']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.protocols", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--models", type=Path, default=Path("models"), help="default: models")
    p.add_argument("--model", default="detector-en", help="default: detector-en")
    p.add_argument("--variant", default=None, help="NLPSERVE_VARIANT (default: the server's)")
    p.add_argument("--data", type=Path, default=None, help="data root for the texts")
    p.add_argument("--requests", type=int, default=2000, help="per protocol and round")
    p.add_argument("--warmup", type=int, default=200, help="per protocol and round, unmeasured")
    p.add_argument("--concurrency", type=int, default=32, help="clients (default: 32)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (default: 4)")
    p.add_argument(
        "--grpc-channels",
        type=int,
        default=1,
        help="gRPC channels (TCP connections) the clients share (default: 1)",
    )
    p.add_argument(
        "--grpc-streams",
        type=int,
        default=4,
        help="grpc_stream: ModelStreamInfer streams that share the --concurrency requests in\n"
        "flight (default: 4, so 8 each: under the server's 16 a stream)",
    )
    p.add_argument(
        "--protocols",
        default=DEFAULT_PROTOCOLS,
        help=f"a list of {', '.join(PROTOCOLS)}; the first is the one the others are compared\n"
        f"to (default: {DEFAULT_PROTOCOLS})",
    )
    p.add_argument("--near-free", action="store_true", help="serve a copy that costs nothing")
    p.add_argument("--name", default=None, help="write bench/results/NAME.{json,md}")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where NAME goes")
    args = p.parse_args(argv)
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not protocols or set(protocols) - set(PROTOCOLS):
        p.error(f"--protocols {args.protocols}: a list of {', '.join(PROTOCOLS)}")
    if not Path("/proc/self/stat").exists():
        raise SystemExit("bench.protocols: needs Linux /proc")
    folder = args.models / args.model
    versions = sorted((d for d in folder.glob("*") if d.name.isdigit()), key=lambda d: int(d.name))
    if not versions:
        p.error(f"--model {args.model}: no numbered version under {folder}")
    with tempfile.TemporaryDirectory(prefix="nlpserve-protocols-") as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "repo"
        if args.near_free:
            near_free_repo(versions[-1], models)
        else:
            shutil.copytree(versions[-1], models / args.model / versions[-1].name)
        # Warm-up texts are others than the measured ones (a response cache would know them).
        specs = build_requests(args.model, args.requests + args.warmup, models_dir=models,
                               data_dir=args.data)  # fmt: skip
        v1_work, v1_warm = specs[: args.requests], specs[args.requests :]
        work = {"v1": v1_work, "v2": v2_rest_specs(args.model, v1_work), "grpc": v1_work,
                "grpc_stream": v1_work}  # fmt: skip
        warm = {"v1": v1_warm, "v2": v2_rest_specs(args.model, v1_warm), "grpc": v1_warm,
                "grpc_stream": v1_warm}  # fmt: skip
        runs: list[Run] = []
        for r in range(args.rounds):
            order = protocols[r % len(protocols) :] + protocols[: r % len(protocols)]
            runs += run_round(r, order, args, models, work, warm, tmp / "logs")
    summary = summarize(runs, protocols)
    for proto in protocols:
        s = summary[proto]
        print(f"{proto:>11}: median {s['median_rps']:.1f} req/s, "
              f"× {protocols[0]} {s[f'median_rps_over_{protocols[0]}']:.3f}, API CPU "
              f"{s['median_server_ms']:.3f} ms/request, load generator "
              f"{s['median_client_ms']:.3f}")  # fmt: skip
    if args.name:
        from bench.report import machine_description

        meta = {"name": args.name, "command": "python -m bench.protocols " + " ".join(
                    sys.argv[1:] if argv is None else argv),
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
                "variant": args.variant or "the server's default",
                "near_free": args.near_free, "requests": args.requests, "warmup": args.warmup,
                "concurrency": args.concurrency, "grpc_channels": args.grpc_channels,
                "grpc_streams": args.grpc_streams,
                "rounds": args.rounds}  # fmt: skip
        machine = machine_description("cpu")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.json").write_text(json.dumps(
            {"meta": meta, "machine": machine, "summary": summary,
             "runs": [asdict(x) for x in runs]}, indent=2, default=str))  # fmt: skip
        (args.out_dir / f"{args.name}.md").write_text(markdown(meta, machine, summary, protocols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
