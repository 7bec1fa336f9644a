#!/usr/bin/env bash
# Prepare, on THIS machine, everything bench/gpu_session.sh needs on the lent GPU machine
# (Python 3.12, torch with CUDA, a CPU-only onnxruntime, no network). Run from the repo root:
#
#   bash bench/gpu_prepare.sh            # wheels, redis-server, requests, onnxruntime-gpu chunks
#   SKIP_ORT=1 bash bench/gpu_prepare.sh # everything but the ~256 MB onnxruntime-gpu download
#
# Writes (all git-ignored: .whl/ and .ortgpu/ are in .gitignore):
#   .whl/*.whl              the serving deps the GPU image lacks, cp312 manylinux, one version
#                           each (pip install --no-index --no-deps --target on the device)
#   .whl/redis.tar.gz       this machine's redis-server with its shared libraries, for (d)
#   .whl/requests/*.jsonl.gz  the benchmark's requests, generated here from ../shared/data
#                           (the data set does not travel; the requests do, 1-2 MB)
#   .whl/data/cmrc2018/cmrc2018_dev.json.gz  the QA dev set (1 MB), for measuring the fp16
#                           variant's F1 on CUDA (`nlpserve evaluate --record`), only where
#                           models/qa-zh/1 commits model.fp16.onnx
#   .ortgpu/                onnxruntime-gpu in 20 MiB chunks (../shared/tools/ort-gpu-prepare),
#                           which must reach the device one chunk per call BEFORE the bench call
# and checks that the bench call fits 64 MiB (bench/device_carry.py: it prints the commands
# that leave the models not benchmarked and bench/results out of that call).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REQUESTS=${BENCH_REQUESTS:-6000}
DATA=${DATA:-../shared/data}
MODELS=${MODELS:-"detector-en qa-zh"}

# The serving deps the GPU image lacks: the dependency closure of the serving packages as this
# virtualenv has them (versions the tests here ran), markers evaluated for the device's Python
# 3.12. A fixed list went stale once already (fastapi 0.165 added opentelemetry-api).
ROOTS="fastapi uvicorn uvloop httptools pydantic pydantic-settings redis hiredis"
mapfile -t pins < <("$PY" - $ROOTS <<'PYEOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

env = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
seen, stack = {}, list(sys.argv[1:])
while stack:
    name = re.sub(r"[-_.]+", "-", stack.pop()).lower()
    if name in seen:
        continue
    seen[name] = md.version(name)
    for raw in md.distribution(name).requires or []:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate(env):
            stack.append(req.name)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
PYEOF
)
[ "${#pins[@]}" -gt 0 ] || { echo "could not resolve the serving deps" >&2; exit 1; }

# Only what this script makes: a stale second version of a wheel would stop the install.
rm -rf .whl/*.whl .whl/redis.tar.gz .whl/requests .whl/data && mkdir -p .whl/requests
echo "== wheels for cp312 manylinux: ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl/*.whl | wc -l | xargs echo "   wheels:"

echo "== redis-server (for configuration (d), nlpserve via Redis)"
if exe=$(command -v redis-server); then
  stage=$(mktemp -d)
  mkdir -p "$stage/redis/lib"
  cp "$exe" "$stage/redis/redis-server.bin"
  # Its shared libraries except the C runtime (the device's newer glibc/libstdc++ serve).
  ldd "$exe" | awk '/=> \//{print $3}' | while read -r lib; do
    case $(basename "$lib") in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*) ;;
      *) cp -L "$lib" "$stage/redis/lib/" ;;
    esac
  done
  cat > "$stage/redis/redis-server" <<'EOF'
#!/bin/sh
# redis-server carried from the development machine, with its own libraries.
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
EOF
  chmod +x "$stage/redis/redis-server"
  tar -C "$stage" -czf .whl/redis.tar.gz redis
  rm -rf "$stage"
  "$exe" --version
else
  echo "   no redis-server here: the GPU session will skip (d)"
fi

echo "== requests ($REQUESTS per model, from $DATA)"
for m in $MODELS; do
  data_args=()
  [ -d "$DATA" ] && data_args=(--data "$DATA")
  "$PY" -m bench.run --model "$m" --requests "$REQUESTS" "${data_args[@]}" \
    --save-requests ".whl/requests/$m.jsonl.gz"
done

# Only where qa-zh/1 commits an fp16 file, the one gpu_session.sh scores: the bench call has no
# room to carry data for a step it skips.
if [ -f "$DATA/cmrc2018/cmrc2018_dev.json" ] && [ -f models/qa-zh/1/model.fp16.onnx ]; then
  mkdir -p .whl/data/cmrc2018
  gzip -c "$DATA/cmrc2018/cmrc2018_dev.json" > .whl/data/cmrc2018/cmrc2018_dev.json.gz
  echo "== CMRC 2018 dev set packed for the fp16 measurement on CUDA"
fi

if [ -z "${SKIP_ORT:-}" ]; then
  echo "== onnxruntime-gpu (../shared/tools/ort-gpu-prepare)"
  if [ -f .ortgpu/WHEEL ] && [ -f .ortgpu/SHA256 ] && ls .ortgpu/c[0-9][0-9] >/dev/null 2>&1; then
    echo "   .ortgpu/ is ready ($(cat .ortgpu/WHEEL)); delete it to fetch again"
  else
    ../shared/tools/ort-gpu-prepare
  fi
fi

echo "== size of the bench call (working tree + .whl; limit 64 MiB a call)"
# The whole tree and .whl are over 64 MiB: the bench call leaves out the models it does not
# benchmark and bench/results (the commands are printed); stop here when even that is over.
"$PY" -m bench.device_carry --models "$MODELS" --carry .whl || exit 1
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s+=$1} END {print s+0}')
total=$((tree + $(du -sb .whl | cut -f1)))
extra=""
if [ -f .ortgpu/WHEEL ]; then
  chunks=(.ortgpu/c[0-9][0-9])
  last=${chunks[-1]}
  c00=$(stat -c %s .ortgpu/c00)
  echo "   each chunk call: tree $((tree >> 20)) MiB + chunk $((c00 >> 20)) MiB"
  with_last=$((total + $(stat -c %s "$last")))
  if [ "$with_last" -le $((62 << 20)) ]; then
    echo "   the last chunk fits in the bench call ($((with_last >> 20)) MiB): carry $last there"
    echo "   too and skip its chunk call (gpu_session.sh appends it at its offset)"
    extra=", \"$last\""
  else
    echo "   send every chunk in its own call (the last does not fit beside .whl)"
  fi
fi
cat <<EOF
== the bench call (after the chunk calls; size BENCH_BUDGET_S from status, bench/README.md):
   run(command="cat /tmp/ort/parts/c[0-9][0-9] > /tmp/ort/whl && BENCH_BUDGET_S=540 "
               "BENCH_API_REPLICAS=4 BENCH_REDIS_API_REPLICAS=6 BENCH_CLIENT_PROCS=4 "
               "BENCH_NAME_SUFFIX=-<date> bash bench/gpu_session.sh",
       carry=[".whl", ".ortgpu/ort-gpu-device.sh", ".ortgpu/WHEEL", ".ortgpu/SHA256"$extra],
       timeout_s=590)   # budget = device time left - 60, timeout = budget + 50
EOF
echo "done: see bench/README.md, 'GPU session'"
