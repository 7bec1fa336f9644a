"""Benchmark reports: the machine description, JSON, Markdown table and PNG plot."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import REPO_ROOT


def gpu_description(use_torch: bool = False) -> list[dict[str, Any]] | None:
    """The GPUs, from ``nvidia-smi`` (name, memory, driver); else, when ``use_torch``, from
    ``torch.cuda`` (name, memory). None on a machine without either."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        gpus = []
        for line in out.strip().splitlines():
            parts = [x.strip() for x in line.split(",")]
            if parts and parts[0]:
                gpus.append({"name": parts[0], "memory": parts[1] if len(parts) > 1 else None,
                             "driver": parts[2] if len(parts) > 2 else None})  # fmt: skip
        if gpus:
            return gpus
    if use_torch:
        with contextlib.suppress(Exception):  # torch missing or its CUDA init failing
            import torch

            if torch.cuda.is_available():
                return [
                    {
                        "name": torch.cuda.get_device_name(i),
                        "memory": f"{torch.cuda.get_device_properties(i).total_memory >> 20} MiB",
                        "torch_cuda": torch.version.cuda,
                    }  # fmt: skip
                    for i in range(torch.cuda.device_count())
                ]
    return None


PREFIX_MARK = "<python prefix>"


def ort_description() -> dict[str, Any]:
    """The onnxruntime that is really imported: with onnxruntime-gpu installed beside the CPU
    wheel (or put first on PYTHONPATH), the two distributions' metadata disagree."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    where = Path(ort.__file__).parent
    try:  # inside the interpreter's prefix (a venv): no machine-specific path in the report
        shown = f"{PREFIX_MARK}/{where.relative_to(sys.prefix)}"
    except ValueError:  # elsewhere (PYTHONPATH): exactly what the record is for
        shown = str(where)
    return {
        "version": ort.__version__,
        "path": shown,
        "available_providers": list(ort.get_available_providers()),
    }


def machine_description(device: str = "cpu") -> dict[str, Any]:
    """What a reader needs to compare numbers across machines: CPU, cores, memory, GPU,
    versions, the onnxruntime really imported."""
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    # Cloud VMs often name the CPU "AMD EPYC" whatever its generation: family and model
    # tell them apart (family 25 model 17 is Zen 4, family 26 Zen 5).
    ident: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu = value.strip()
                elif key in ("vendor_id", "cpu family", "model", "stepping"):
                    ident.setdefault(key, value.strip())
                elif key == "flags" and not flags:
                    have = set(value.split())
                    # The SIMD flags that decide ORT's CPU kernels (and int8 speed-ups).
                    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                              "amx_int8", "fma")  # fmt: skip
                    flags = [x for x in wanted if x in have]
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "torch", "transformers", "tokenizers",
                "fastapi", "uvicorn", "httpx", "redis", "numpy", "pydantic"):  # fmt: skip
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    redis_v = None
    with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
        redis_v = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=5
        ).stdout.split()[2]
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=REPO_ROOT, timeout=5,
        ).stdout.strip() or None  # fmt: skip
    return {
        "cpu": cpu,
        "cpu_id": " ".join(f"{k} {v}" for k, v in ident.items()) or None,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "device": device,
        "gpu": gpu_description(use_torch=device == "cuda"),
        "onnxruntime": ort_description(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "redis_server": redis_v,
        "git_commit": commit,
    }


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _answers_lines(answers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The parity checks (the JSON's ``answers``), one line each."""
    out = ["", "## Answers", "",
           "Each configuration's answers against raw ORT on the same requests (`answers` in "
           "the JSON file):", ""]  # fmt: skip
    for name, check in answers.items():
        parts = []
        for k, v in check.items():
            if isinstance(v, float) and ("agreement" in k):
                parts.append(f"{k.replace('_', ' ')} {v:.1%}")
            elif isinstance(v, float):
                parts.append(f"{k.replace('_', ' ')} {v:.3g}")
            else:
                parts.append(f"{k.replace('_', ' ')} {v}")
        out.append(f"- {name}: {', '.join(parts)}")
    return out


def _time_split_lines(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where an answered request's time went, per nlpserve configuration (its Server-Timing
    header, means in ms; `rest` is the mean latency less the server's parts)."""
    split = [(s["name"], s["server_ms_mean"]) for s in summaries if s.get("server_ms_mean")]
    if not split:
        return []
    names = list(dict.fromkeys(k for _, t in split for k in t))
    out = ["", "## Where the time went", "",
           "Means over answered requests, ms, from each answer's `Server-Timing` header; "
           "`rest` is the mean latency less those (HTTP, JSON, validation, event-loop turns, "
           "the load generator).", "",
           "| configuration | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]  # fmt: skip
    for name, t in split:
        out.append(f"| {name} | " + " | ".join(_fmt(t.get(k), 2) for k in names) + " |")
    return out


def markdown(
    summaries: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    machine: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    answers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    lines = [f"# nlpserve benchmark: {meta.get('title', meta.get('model', ''))}", ""]
    keys = ("command", "model", "requests", "concurrency", "rate", "lengths", "buckets",
            "serve_env", "when")  # fmt: skip
    for k in keys:
        if meta.get(k) is not None:
            v = meta[k]
            lines.append(f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}")
    rounds = any(s.get("rounds_rps") for s in summaries)
    header = (
        "| configuration | req/s | × baseline | of raw ORT | p50 ms | p95 ms | p99 ms "
        "| errors | padding eff. | mean batch |" + (" rounds req/s |" if rounds else "")
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|" + ("---|" if rounds else "")
    lines += ["", header, rule]
    for s in summaries:
        per_round = " / ".join(_fmt(x) for x in s.get("rounds_rps") or []) or "–"
        lat = s.get("latency_ms") or {}
        errs = ", ".join(f"{k}×{v}" for k, v in (s.get("errors") or {}).items()) or "0"
        ratio = s.get("ratio_to_baseline")
        frac = s.get("fraction_of_raw_ort")
        lines.append(
            f"| {s['name']} | {_fmt(s.get('throughput_rps'))} "
            f"| {_fmt(ratio, 2) + '×' if ratio is not None else '–'} "
            f"| {_fmt(100 * frac, 0) + '%' if frac is not None else '–'} "
            f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} "
            f"| {errs} | {_fmt(s.get('padding_efficiency'), 3)} "
            f"| {_fmt(s.get('mean_batch_size'))} |" + (f" {per_round} |" if rounds else "")
        )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += _time_split_lines(summaries)
    if answers:
        lines += _answers_lines(answers)
    if machine:
        lines += ["", "## Machine", "", "```json", json.dumps(machine, indent=2), "```"]
    return "\n".join(lines) + "\n"


def figure(
    summaries: Sequence[Mapping[str, Any]],
    lat_by_config: Mapping[str, Sequence[float]],
    title: str = "",
) -> Any:
    """The report's matplotlib figure: latency CDF per configuration and a throughput bar per
    configuration. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers/CI
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, lat in lat_by_config.items():
        if not len(lat):
            continue
        xs = np.sort(np.asarray(lat) * 1000.0)
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax1.step(xs, ys, where="post", label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms, log scale)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency CDF (successful requests)")
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.get_lines():  # a run of raw ORT alone has no HTTP latencies to plot
        ax1.legend(fontsize=8)
    names = [s["name"] for s in summaries]
    rps = [s.get("throughput_rps") or 0.0 for s in summaries]
    bars = ax2.bar(range(len(names)), rps, color="tab:blue")
    for b, v in zip(bars, rps, strict=True):
        ax2.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                     fontsize=8)  # fmt: skip
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    # throughput_rps: requests/s (a QA request is one sequence per window, so not sequences/s)
    ax2.set_ylabel("requests / s")
    ax2.set_title("throughput")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(
    out_png: Path,
    summaries: Sequence[Mapping[str, Any]],
    lat_by_config: Mapping[str, Sequence[float]],
    title: str = "",
) -> bool:
    """:func:`figure` written to ``out_png``; False without matplotlib."""
    try:
        fig = figure(summaries, lat_by_config, title)
        import matplotlib.pyplot as plt
    except ImportError:  # the `bench` extra is not installed: the JSON/MD still get written
        return False
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def write_reports(
    out_base: Path,
    summaries: Sequence[Mapping[str, Any]],
    lat_by_config: Mapping[str, Sequence[float]],
    meta: Mapping[str, Any],
    machine: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """``out_base``.json / .md / .png; returns the paths written."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    machine = machine if machine is not None else machine_description()
    doc = {"meta": dict(meta), "machine": machine, "results": list(summaries), "notes": list(notes)}
    doc.update(extra or {})
    paths = [out_base.with_suffix(".json"), out_base.with_suffix(".md")]
    paths[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(summaries, meta, machine, notes, (extra or {}).get("answers")))
    png = out_base.with_suffix(".png")
    if plot(png, summaries, lat_by_config, title=str(meta.get("title", ""))):
        paths.append(png)
    return paths
