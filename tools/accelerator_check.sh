#!/usr/bin/env bash
# The accelerator check of issue 15, in one run (about 8 minutes on one GPU):
#   1. the device (device.txt);
#   2. a synthetic store at 256 px (pgjax synth + preprocess; no data leaves the machine);
#   3. `pgjax bench train --config configs/pg.py` (ViT-B/16, global batch 256, bf16) at 256 and
#      224 px, with the fused attention kernel (cuDNN) in the image encoder and without (XLA);
#   4. a plain-JAX ViT-B/16 step of the same shapes (tools/plain_vit_step.py, no pgjax), both
#      attention implementations;
#   5. `pgjax bench loader` on this host's cores;
#   6. `pgjax bench compile` of the same step on one device, batch 64, with remat and without:
#      the device's own buffers (a CPU compile cannot show what remat saves);
#   7. summary.txt: images/s, MFU (XLA's and model FLOPs) against the 45% target, and PG's
#      achieved FLOP rate over the plain step's (target >= 0.95); the compiled peaks.
# Every record goes to the folder given by --out. `--tiny`: the same steps at CPU size (pg.py:tiny,
# 32 px only, batch 16, one step, one round of the real loop; the fused kernel is a GPU one, so
# "fused" is JAX's own choice there), for the test that keeps this script working
# (tests/test_accelerator_check.py, in the default suite: about 45 s of CPU).
#
#   tools/accelerator_check.sh --out benchmarks/results/accelerator-$(date -u +%Y%m%d)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="" TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "accelerator_check.sh: unknown argument $1 (use --out DIR [--tiny])" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "accelerator_check.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's pgjax
pg() { "$PY" -m pgjax.cli "$@"; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$TINY" = 1 ]; then
  # Compiling dominates at this size: LLVM's cheapest settings, XLA:CPU's older elemental
  # emitters (the PG step compiled in 8.6 s of CPU, not 13-14 s, measured), one image size, one
  # step, one round of the real loop.
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
  # On a CPU both attention settings compile the same program: compile it once.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$WORK/jax-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  CONFIG=configs/pg.py:tiny SIZE=32 SECOND="" BATCH=16 STEPS=1 ROUNDS=1 FUSED="" VIT=mu PATCH=8
  COMPILE_BATCH=16 REMATS="True"  # one compile: the remat path is the one the test keeps
  DTYPE=float32 SYNTH=(--studies 6 --xr-size 32 --ct-size 32 --ct-slices 4-6 --mr-size 32
    --mr-slices 4-6 --us-size 32 --us-frames 2)
  LOADER=(--images 64 --size 32 --steps 2 --rounds 1 --workers 0)
else
  CONFIG=configs/pg.py SIZE=256 SECOND=224 BATCH=256 STEPS=5 ROUNDS=5 FUSED=cudnn VIT=b PATCH=16
  COMPILE_BATCH=64 REMATS="False True"
  DTYPE=bfloat16 SYNTH=(--studies 80 --workers 8)
  LOADER=(--images 4096 --steps 20 --rounds 3 --workers 0,all)
fi

echo "== 1. device"
"$PY" -c 'import jax; d = jax.devices(); print(f"{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}")' \
  | tee "$OUT/device.txt"

echo "== 2. synthetic store, ${SIZE} px"
pg synth --out "$WORK/dicom" "${SYNTH[@]}" > /dev/null
pg preprocess "$WORK/dicom" --out "$WORK/store" --image-size "$SIZE" --min-patients 1 \
  --set split_fractions=1,0,0 > /dev/null

echo "== 3. pgjax bench train, fused attention and XLA's"
for impl in "$FUSED" xla; do
  value=None
  [ -z "$impl" ] || value="'$impl'"
  pg bench train --config "$CONFIG" --config.input.store="$WORK/store" \
    --config.input.global_batch="$BATCH" --config.model.image_encoder_kw="{'attention_impl': $value}" \
    --steps "$STEPS" --rounds "$ROUNDS" ${SECOND:+--image-sizes "$SECOND"} --out "$OUT"
done

echo "== 4. plain-JAX ViT step"
for impl in "$FUSED" xla; do
  "$PY" tools/plain_vit_step.py --size "$VIT" --patch "$PATCH" --sizes "$SIZE${SECOND:+,$SECOND}" \
    --batch "$BATCH" --steps "$STEPS" --dtype "$DTYPE" ${impl:+--attention "$impl"} --out "$OUT"
done

echo "== 5. pgjax bench loader"
pg bench loader --config "$CONFIG" --batch "$BATCH" "${LOADER[@]}" --out "$OUT"

echo "== 6. the compiled step's memory on one device, with remat and without"
# XLA:CPU keeps no recomputation late, so remat's saving can only be measured here (README,
# 'What fits on a device'): one per-device batch, with the fused attention kernel.
ATTN=None
[ -z "$FUSED" ] || ATTN="'$FUSED'"
for remat in $REMATS; do
  pg bench compile --config "$CONFIG" --store "$WORK/store" --mesh data=1 --image-size "$SIZE" \
    --config.input.global_batch="$COMPILE_BATCH" \
    --config.model.image_encoder_kw="{'attention_impl': $ATTN, 'remat': $remat}" \
    --out "$OUT"
done

echo "== 7. summary"
"$PY" -m pgjax.bench.accelerator "$OUT" | tee "$OUT/summary.txt"
