#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md and docs/deepspeed.md, as ONE script for one short lease of
# one H100/H200 (run it from the repository root):
#
#   DATA=path/to/roco_v1_radiology.jsonl OUT=bench-gpu BUDGET=500 bash tests/gpu/bench_gpu.sh
#
# On a lent machine run it through tests/gpu/device_run.sh (finds the right python, preflight).
#
# Steps, most important first (ONLY="versions cls_base ..." runs a subset); each has its own time
# limit, and a step that would start with less than half of it (or 20 s) of BUDGET left is skipped,
# so a lease that runs short still returns what was measured:
#   versions        card, driver, torch/CUDA, transformers, accelerate, deepspeed, flash-attn
#   maths           the CUDA tests: packed batches (varlen and blocks) = the padded batch in bf16;
#                   radtrain's packed attention forward = transformers' on the varlen kernel;
#                   FlexAttention's packed step = the block attention's
#   flex            `radtrain bench`, base, batch 512 packed: data.packed_attention=flex
#                   (FlexAttention with per-caption block masks) against the varlen kernel, eager
#   compile_time    cold start and step time, eager vs compiled layer by layer (batch 512, base),
#                   and the warm start from a filled Inductor cache
#   compile         `radtrain bench`, base: seed, batch 512 eager vs compiled, batch 128 compiled,
#                   and batch 512 packed to exact lengths (every step a new matrix-product shape)
#   attention       one attention call (fwd + bwd, base shape, batch 512 of real lengths): the varlen
#                   kernel vs block attention vs FlexAttention with a per-caption block mask
#                   (several captions per tile: the base MFU floor), compile and mask-build times
#   flex_compiled   the same, flex compiled with the layers (own process: a slow cold compile
#                   costs only its own row)
#   packed_forward  radtrain's packed attention forward vs transformers' (base, batch 512)
#   cls_base        base: seed, fast, batch 512 packed with the varlen kernel and with block
#                   attention (a preset that runs out of memory is reported as such; the others
#                   still run)
#   cls_b1024       batch 1024 eager and compiled (own process)
#   cls_large       the ModernBERT-large shape: seed, batch 512 eager and compiled
#   mlm_base        the MLM phase (real tokens/s), eager and compiled
#   zero            plain vs ZeRO-2 vs ZeRO-3, ModernBERT-large shape, through `accelerate launch`
#   profile         where the time of a batch-512 step goes (GPU busy vs idle, top kernels)
# Everything lands in $OUT/results.tar (one JSON and one log per step, appended as each step ends)
# and $OUT/steps.txt; the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/roco_v1_radiology.jsonl}
OUT=${OUT:-bench-gpu}
BUDGET=${BUDGET:-500}
# The clock starts where the lease's command starts (device_run.sh sets the deadline before its
# interpreter search, wheel install and preflight), not here.
DEADLINE=${RADTRAIN_GPU_DEADLINE:-$(($(date +%s) + BUDGET))}
# A fresh folder per call: a rerun on a still-warm machine must not report (or resume!) the
# previous call's runs.
OWN_WORK=0
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d /tmp/radtrain-gpu.XXXXXX); OWN_WORK=1; fi
PY=${PY:-python3}  # tests/gpu/device_run.sh sets it to the interpreter that has torch
BASE=${BASE:-scratch:base} LARGE=${LARGE:-scratch:large} STEPS=${STEPS:-20}  # smaller: a CPU dry run
ATTN_BATCH=${ATTN_BATCH:-512}  # a CPU dry run: 32 (eager FlexAttention there builds the dense T x T scores)
START=$SECONDS
KILL_AFTER=15
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
mkdir -p "$OUT" "$WORK"
[ -f "$DATA" ] && DATA=$(realpath "$DATA")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RADTRAIN_PROGRESS=0 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline RADTRAIN_CACHE="$WORK/cache" RADTRAIN_ROCO="$DATA"
[ -f "$DATA" ] || { echo "no captions at DATA=$DATA" >&2; exit 2; }

step() {  # step NAME LIMIT_S COMMAND...: skipped unless half its limit (>= 20 s) is left
  local name=$1 limit=$2 left t0 rc
  shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac  # ONLY="versions cls_base ...": a subset
  left=$((DEADLINE - $(date +%s) - 5 - KILL_AFTER))
  if [ "$left" -lt 20 ] || [ "$left" -lt $((limit / 2)) ]; then
    echo "$name skipped: ${left}s of budget left, it needs ~$((limit / 2))s" | tee -a "$OUT/steps.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  # SIGTERM at the limit: `radtrain bench` then writes the rows it measured (exit 75); KILL later.
  timeout --preserve-status -k "$KILL_AFTER" "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  tail -n 12 "$WORK/$name.log"
  (cd "$WORK" && tar -rf "$OUT/results.tar" "$name.log" $(ls "$name".json 2>/dev/null))
  return "$rc"
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" - <<'PY'
import importlib, torch
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
print("torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("transformers", "accelerate", "deepspeed", "flash_attn", "tokenizers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "not available:", type(exc).__name__, str(exc)[:120])
from radtrain import packing
print("torch varlen kernel:", packing.torch_varlen_kernel(), "| flash-attn:", packing.flash_attn_installed())
PY
}

bench() {  # bench NAME [radtrain bench args...]
  local name=$1
  shift
  # exec: the step's `timeout` then signals radtrain bench itself and waits for it to write its rows
  # (a bash in between dies at once on SIGTERM, and the step would tar before the rows exist).
  exec "$PY" -m radtrain bench --data "$DATA" --json "$WORK/$name.json" "$@" data.min_label_count=10
}

export -f versions bench
export DATA WORK PY
step versions 60 versions || { echo "versions failed: stopping before the benchmarks"; exit 3; }
B=data.packed_attention=blocks
# The maths first: a benchmark of a path that computes something else would be worthless.
step maths 90 "$PY" -m pytest -q -p no:cacheprovider --basetemp="$WORK/pytest" tests/test_bench.py \
  tests/test_packed_attention.py -k "cuda or seed_loss or real_step or mlm or rotary or waits or filler"
# The lease's first question (session 8): data.packed_attention=flex (FlexAttention, per-caption
# block masks, several captions per tile) against the varlen kernel in a whole training step.
# Packing asked for (a GPU in bf16 packs anyway): where it cannot run, the step fails instead of
# timing padded rows under a flex label.
F=data.packed_attention=flex P=data.packing=on
step flex 150 bench flex --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 --presets "" \
  --variant b512:train.batch_size=512,$P --variant b512_flex:train.batch_size=512,$P,$F
# Then the open question of 2026-11-27: what compiling layer by layer costs (cold start) and gains.
step compile_time 260 "$PY" tests/gpu/compile_time.py --data "$DATA" --model "$BASE" --batch 512 --steps 10 \
  --modes eager,layers,layers --timeout 90 --out "$WORK/compile_time.json"
step compile 150 bench compile --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 --presets seed \
  --variant b512:train.batch_size=512 --variant b512_compiled:train.batch_size=512,train.compile=true \
  --variant b128_compiled:train.batch_size=128,train.compile=true \
  --variant b512_exact:train.batch_size=512,data.pad_to_multiple_of=1
# Is an attention with several captions per tile faster than the varlen kernel (the base floor)?
step attention 150 "$PY" tests/gpu/attention_probe.py --data "$DATA" --batch "$ATTN_BATCH" --json "$WORK/attention.json"
# FlexAttention compiled with the whole layer (a cold Inductor compile of base with Triton's flex
# templates, never timed): a step of its own, after the eager pair, so a slow compile costs no rows.
step flex_compiled 150 bench flex_compiled --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 --presets "" \
  --variant b512:train.batch_size=512,$P --variant b512_flex_compiled:train.batch_size=512,$P,$F,train.compile=true
# radtrain's packed attention forward against transformers' own (same batches, same weights).
step packed_forward 90 "$PY" tests/gpu/packed_forward.py --data "$DATA" --model "$BASE" --steps "$STEPS" \
  --json "$WORK/packed_forward.json" train.batch_size=512 data.min_label_count=10
# Batch 1024 in a process of its own: every preset of a bench process stays resident (weights and
# AdamW state, ~2.4 GB each for base), which would crowd a 1024 batch's ~35 GB of activations.
step cls_base 120 bench cls_base --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 --presets seed,fast \
  --variant b512:train.batch_size=512 --variant b512_blocks:train.batch_size=512,$B
step cls_b1024 90 bench cls_b1024 --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 --presets "" \
  --variant b1024:train.batch_size=1024 --variant b1024_compiled:train.batch_size=1024,train.compile=true
step cls_large 150 bench cls_large --model "$LARGE" --steps $((STEPS * 2 / 3 > 2 ? STEPS * 2 / 3 : 2)) --warmup 3 \
  --rounds 2 --presets seed --variant b512:train.batch_size=512 \
  --variant b512_compiled:train.batch_size=512,train.compile=true
step mlm_base 150 bench mlm_base --task mlm --model "$BASE" --steps "$STEPS" --warmup 3 --rounds 2 \
  --presets seed --variant b512:train.batch_size=512 --variant b512_compiled:train.batch_size=512,train.compile=true
step zero 260 "$PY" tests/gpu/bench_zero.py --data "$DATA" --steps 30 --timeout 110 --work "$WORK/zero" \
  --out "$WORK/zero.json"
step profile 90 "$PY" tests/gpu/profile_step.py --data "$DATA" --model "$BASE" --warmup 5 --steps 5 \
  train.batch_size=512 data.min_label_count=10

echo "== total $((SECONDS - START))s"
cat "$OUT/steps.txt"
for f in "$WORK"/*.log; do
  echo "== $(basename "$f")"
  grep -E "^(preset|-----|seed |fast |b[0-9]|user |radtrain|transformers |\| |plain|zero|device|torch|wall|GPU busy|[0-9]+ passed|FAILED|varlen|blocks|flex|\{\"mode)" "$f" | head -20
done
[ "$OWN_WORK" = 1 ] && rm -rf "$WORK"  # every step's log and JSON is in $OUT/results.tar
exit 0
