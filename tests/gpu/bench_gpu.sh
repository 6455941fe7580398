#!/usr/bin/env bash
# GPU half of docs/benchmarks.md: run from anywhere on a machine with one H100 or H200.
#
#   DATA=/path/to/roco_v1_radiology.jsonl OUT=bench-gpu bash tests/gpu/bench_gpu.sh
#
# 1. the maths check on the GPU: packed batches through the CUDA varlen kernel (flash-attn if
#    installed, else PyTorch's own) give the padded batch's loss and gradients in bf16;
# 2. `radtrain bench` for the classifier on the ModernBERT-base and -large shapes (random init,
#    the real ROCO captions, labels seen >= 10 times): seed (fp32, pad 256, batch 8), fast (our
#    defaults: bf16, length buckets, packing, batch 8) and user = fast at batch 128 (the
#    throughput configuration the issue's 10,000 captions/s target is about);
# 3. the MLM phase likewise (real tokens/s), and torch.compile over the same presets.
# Everything lands in $OUT as JSON rows + logs; copy the tables into docs/benchmarks.md with the
# card name and the versions printed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/roco_v1_radiology.jsonl}
OUT=${OUT:-bench-gpu}
STEPS=${STEPS:-60}
mkdir -p "$OUT"
export RADTRAIN_PROGRESS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f "$DATA" ] || { echo "no captions at DATA=$DATA" >&2; exit 2; }
python -c "import radtrain" 2>/dev/null || python -m pip install -q --no-deps -e .

python - <<'PY' | tee "$OUT/versions.txt"
import torch, transformers, accelerate
print("device", torch.cuda.get_device_name(0), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| accelerate", accelerate.__version__)
try:
    import flash_attn; print("flash_attn", flash_attn.__version__)
except Exception as exc:
    print("flash_attn not installed:", type(exc).__name__, "-> PyTorch varlen attention")
PY

# 1. maths (bf16 varlen kernels vs padded SDPA, fp32 packed vs seed)
python -m pytest -q -p no:cacheprovider tests/test_bench.py -k "cuda or seed_loss or mlm" 2>&1 | tee "$OUT/maths.log"

common=(--data "$DATA" --steps "$STEPS" --warmup 5 --rounds 3 data.min_label_count=10 train.batch_size=128)
# 2. classifier
for size in base large; do
  radtrain bench "${common[@]}" --model "scratch:$size" --presets seed,fast,user \
    --json "$OUT/classify_$size.json" 2>&1 | tee "$OUT/classify_$size.log"
done
# 3. MLM and compile (base shape)
radtrain bench "${common[@]}" --model scratch:base --task mlm --presets seed,fast,user \
  --json "$OUT/mlm_base.json" 2>&1 | tee "$OUT/mlm_base.log"
radtrain bench "${common[@]}" --model scratch:base --presets fast,user train.compile=true \
  --json "$OUT/classify_base_compile.json" 2>&1 | tee "$OUT/classify_base_compile.log"
