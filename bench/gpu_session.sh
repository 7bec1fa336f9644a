#!/usr/bin/env bash
# The whole GPU benchmark in ONE device call (bench/README.md, "GPU session"): detector-en and
# qa-zh, fp32 and fp16, on CUDA; every configuration of bench/run.py against the naive
# per-request PyTorch baseline on the same GPU. Results land in $OUT (at most 8 files come
# back): <model>-cuda-<gpu>.{json,md,png} per model, gpu_session.log, and qa-zh-1-manifest.json
# (qa-zh's fp16 variant scored on CUDA; SKIP_FP16_EVAL=1 skips it).
#
# Needs, carried into the call: .whl (bench/gpu_prepare.sh) and .ortgpu/ort-gpu-device.sh,
# .ortgpu/WHEEL, .ortgpu/SHA256, with the onnxruntime-gpu chunks sent in the calls just
# before (the machine keeps /tmp only while warm).
#
# Knobs (environment): BENCH_BUDGET_S (default 420: the whole script, installs included;
# run it with the device call's timeout_s >= budget + 40), BENCH_REQUESTS (6000),
# BENCH_BASELINE_REQUESTS (1500), BENCH_CONCURRENCY (32), BENCH_MODELS ("detector-en qa-zh"),
# BENCH_VARIANTS (fp32,fp16), BENCH_CONFIGS (baseline,raw,inprocess,redis),
# BENCH_RAW_SECONDS (2), BENCH_BASELINE_DTYPE (fp32; fp16: torch half),
# BENCH_QA_HF_DIR (a QA checkpoint; default: rebuilt from ONNX), BENCH_API_REPLICAS (1:
# in-process servers in (c), API processes in front of the one worker in (d)),
# BENCH_REDIS_API_REPLICAS (BENCH_API_REPLICAS: (d)'s API processes alone),
# BENCH_CLIENT_PROCS (1: load-generator processes), BENCH_NAME_SUFFIX (appended to the result
# names, e.g. dec08: <model>-cuda-h200-dec08.*, apart from the committed files of earlier runs).
# For a dry run on a machine without a GPU: SKIP_INSTALL=1 BENCH_DEVICE=cpu MODELS_DIR=...
# (GPU_SESSION_TMP: where the wheels, the nlpserve wrapper and redis go; default /tmp).
# Exit status: 0, or 3/4 when the setup failed, 5 when a model's run failed or was skipped
# for want of time (not a timeout: an interrupted run still writes its report).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"

BUDGET=${BENCH_BUDGET_S:-420}
DEVICE=${BENCH_DEVICE:-cuda}
REQUESTS=${BENCH_REQUESTS:-6000}
BASELINE_REQUESTS=${BENCH_BASELINE_REQUESTS:-1500}
CONCURRENCY=${BENCH_CONCURRENCY:-32}
MODELS=${BENCH_MODELS:-"detector-en qa-zh"}
VARIANTS=${BENCH_VARIANTS:-fp32,fp16}
CONFIGS=${BENCH_CONFIGS:-baseline,raw,inprocess,redis}
RAW_SECONDS=${BENCH_RAW_SECONDS:-2}
BASELINE_DTYPE=${BENCH_BASELINE_DTYPE:-fp32}
API_REPLICAS=${BENCH_API_REPLICAS:-1}
REDIS_API_REPLICAS=${BENCH_REDIS_API_REPLICAS:-$API_REPLICAS}
CLIENT_PROCS=${BENCH_CLIENT_PROCS:-1}
MODELS_DIR=${MODELS_DIR:-models}
PY=${PY:-python3}
WORK=${GPU_SESSION_TMP:-/tmp}
elapsed() { echo $(($(date +%s) - start)); }
say() { echo "[gpu_session +$(elapsed)s] $*"; }

main() {

# 1. onnxruntime-gpu (reassembled from the chunk calls) and the serving deps.
if [ -z "${SKIP_INSTALL:-}" ]; then
  if [ ! -f .ortgpu/ort-gpu-device.sh ]; then
    say "FATAL: .ortgpu/ort-gpu-device.sh not carried (bench/README.md, GPU session)"; exit 3
  fi
  # A chunk carried with this call (the last one fits beside the tree and .whl) is appended
  # like the chunk calls do it: only at its exact offset, so a repeat is harmless.
  # Every chunk but the last has the size it was split with (20 MiB by default, 55 MiB as
  # bench/README.md sends them): read it off the first chunk, when that one is here.
  chunk_bytes=${ORT_CHUNK_BYTES:-$(stat -c %s .ortgpu/c00 2>/dev/null || echo 20971520)}
  for c in .ortgpu/c[0-9][0-9]; do
    [ -f "$c" ] || continue
    mkdir -p /tmp/ort
    have=$(stat -c %s /tmp/ort/whl 2>/dev/null || echo 0)
    idx=${c#.ortgpu/c}
    if [ "$have" = $((10#$idx * chunk_bytes)) ]; then cat "$c" >> /tmp/ort/whl; fi
    say "chunk $c: /tmp/ort/whl now $(stat -c %s /tmp/ort/whl 2>/dev/null || echo 0) bytes"
  done
  # shellcheck disable=SC1091
  source .ortgpu/ort-gpu-device.sh || {
    say "FATAL: onnxruntime-gpu not installed: send the chunk calls first, back to back"; exit 3; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl || { say "FATAL: wheel install failed"; exit 3; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# `nlpserve` is not pip-installed there: the benchmark finds this wrapper on PATH.
mkdir -p "$WORK/nlpbin"
pyexe=$("$PY" -c 'import sys; print(sys.executable)')
printf '#!/bin/sh\nexec %s -m service.cli "$@"\n' "$pyexe" > "$WORK/nlpbin/nlpserve"
chmod +x "$WORK/nlpbin/nlpserve"
export PATH="$WORK/nlpbin:$PATH"

# 2. redis-server for (d): the one carried from the dev machine, else the machine's own.
redis_note=""
if [ -f .whl/redis.tar.gz ]; then
  mkdir -p "$WORK/redis" && tar -C "$WORK/redis" -xzf .whl/redis.tar.gz
  if "$WORK/redis/redis/redis-server" --version >/dev/null 2>&1; then
    export PATH="$WORK/redis/redis:$PATH"
  fi
fi
if ! redis-server --version >/dev/null 2>&1; then
  CONFIGS=$(echo "$CONFIGS" | tr ',' '\n' | grep -vx redis | paste -sd, -)
  redis_note="redis-server could not run on this machine: configuration (d) not run."
  say "$redis_note"
fi

# 3. What this machine is; stop early when the GPU stack is not there.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
BENCH_DEVICE=$DEVICE MODELS_DIR=$MODELS_DIR "$PY" - <<'EOF' \
  || { say "FATAL: setup check failed"; exit 4; }
import glob, os, sys
import fastapi, onnxruntime as ort, pydantic, pydantic_settings, redis, torch, uvicorn  # noqa
import service.api.app  # noqa: the server imports
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
      torch.cuda.is_available(), "ort", ort.__version__, ort.__file__,
      ort.get_available_providers())
if os.environ["BENCH_DEVICE"] == "cuda":
    # ORT lists CUDA even when its libraries cannot load; a real session tells.
    path = sorted(glob.glob(os.environ["MODELS_DIR"] + "/*/*/*.onnx"))[0]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sess = ort.InferenceSession(path, so, providers=wanted)
    print("CUDA session check:", path, sess.get_providers())
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        sys.exit("onnxruntime cannot run on CUDA here (see its messages above)")
EOF
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
  | grep -oiE 'H200|H100|A100|L40S|L4|A10G|T4|V100' | head -1 | tr 'A-Z' 'a-z')
tag="${DEVICE}${gpu:+-$gpu}${BENCH_NAME_SUFFIX:+-$BENCH_NAME_SUFFIX}"
say "setup done; device $DEVICE, tag $tag, configs $CONFIGS"

# 4. qa-zh's fp16 variant, where the version commits one, scored on CUDA (its export could only
# use the CPU provider): the manifest with the figures comes back as
# $OUT/qa-zh-1-manifest.json, to copy into models/.
if [ "$DEVICE" = cuda ] && [ -f .whl/data/cmrc2018/cmrc2018_dev.json.gz ] \
   && [ -f "$MODELS_DIR/qa-zh/1/model.fp16.onnx" ] && [ -z "${SKIP_FP16_EVAL:-}" ]; then
  mkdir -p "$WORK/evaldata/cmrc2018" && rm -rf "$WORK/qa-zh-1"
  gunzip -c .whl/data/cmrc2018/cmrc2018_dev.json.gz > "$WORK/evaldata/cmrc2018/cmrc2018_dev.json"
  cp -r "$MODELS_DIR/qa-zh/1" "$WORK/qa-zh-1"
  say "qa-zh fp16 on CUDA: nlpserve evaluate --record"
  timeout 120 nlpserve evaluate "$WORK/qa-zh-1" --data "$WORK/evaldata" --variant fp16 \
    --providers CUDAExecutionProvider,CPUExecutionProvider --record \
    && cp "$WORK/qa-zh-1/manifest.json" "$OUT/qa-zh-1-manifest.json"
  say "qa-zh fp16 evaluation: exit $?"
fi

# 5. The runs. Each model gets a share of what is left, under `timeout`: bench.run turns the
# SIGTERM into an interrupt and still writes what it measured.
set -- $MODELS
n=$#
i=0
failed=()
for m in "$@"; do
  i=$((i + 1))
  left=$((BUDGET - $(elapsed) - 10))
  share=$((left / (n - i + 1)))
  [ "$i" -eq 1 ] && [ "$n" -gt 1 ] && share=$((share + share / 5))  # the detector derives fp32
  if [ "$share" -lt 60 ]; then say "no time left for $m ($share s)"; failed+=("$m"); continue; fi
  args=(--device "$DEVICE" --model "$m" --models "$MODELS_DIR" --variants "$VARIANTS"
        --derive-variants --configs "$CONFIGS" --requests "$REQUESTS"
        --baseline-requests "$BASELINE_REQUESTS" --baseline-dtype "$BASELINE_DTYPE"
        --concurrency "$CONCURRENCY" --warmup 200 --api-replicas "$API_REPLICAS"
        --redis-api-replicas "$REDIS_API_REPLICAS" --client-procs "$CLIENT_PROCS"
        --raw-seconds "$RAW_SECONDS" --max-load 1000 --settle-s 0
        --results-dir "$OUT" --name "$m-$tag")
  [ -f ".whl/requests/$m.jsonl.gz" ] && args+=(--requests-file ".whl/requests/$m.jsonl.gz")
  [ "$m" = qa-zh ] && [ -n "${BENCH_QA_HF_DIR:-}" ] && args+=(--hf-dir "$BENCH_QA_HF_DIR")
  [ -n "$redis_note" ] && args+=(--note "$redis_note")
  say "$m: up to ${share}s"
  timeout -s TERM -k 20 "$share" "$PY" -m bench.run "${args[@]}"
  rc=$?
  say "$m: exit $rc"
  # 124: its share ran out, and bench.run wrote what it had measured
  [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || failed+=("$m")
done
ls -la "$OUT"
if ((${#failed[@]})); then say "FAILED or skipped: ${failed[*]} (see above)"; return 5; fi
say "done"
}

# A pipeline, not `exec > >(tee)`: the call returns only once the log is complete.
main 2>&1 | tee -a "$OUT/gpu_session.log"
exit "${PIPESTATUS[0]}"
