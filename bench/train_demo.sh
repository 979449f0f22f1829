#!/usr/bin/env bash
# Train the embedded demo pair (structure + image model, preset `cpu`) on the training images of
# bench/splits/monuseg.json and export them as checkpoints/structure-demo.* and image-demo.* would be.
#
#   bash bench/train_demo.sh --gpu [OUT]   # one H100/H200: from scratch, 128 px tiles, GPU_MINUTES (8) of training
#   bash bench/train_demo.sh --cpu [OUT]   # 2-core CPU: continues the current demo pair on 128 px tiles;
#                                          # resumable (run again to continue), TIME_LIMIT minutes per call
#
# OUT (default ~/.cache/nudiff/demo-train) receives runs/, data/ (links to the split's images) and the
# exported pair OUT/structure-demo.{json,safetensors}, OUT/image-demo.{json,safetensors} (fp16), the image
# model's guidance w calibrated on the split's validation images (never its test images).
# Environment: DATA (default ../shared/data/monuseg/train), TIME_LIMIT (CPU: minutes per model per call,
# default 100), PY (python, default .venv/bin/python or python), CALIBRATE (0: export without calibrating
# w, e.g. on a GPU machine without diffusers or the validation images; bench/gpu_kit.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:---cpu}
OUT=${2:-$HOME/.cache/nudiff/demo-train}
DATA=${DATA:-../shared/data/monuseg/train}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
[ -d "$DATA/images" ] || { echo "error: no labeled images in $DATA (set DATA=...)" >&2; exit 2; }

# the split's training and validation images as folders of links (the test images are never linked)
TRAIN=$("$PY" bench/monuseg.py link train "$OUT/data" --data "$DATA")
VAL=$("$PY" bench/monuseg.py link validation "$OUT/data" --data "$DATA" 2>/dev/null || true)
RUNS=$OUT/runs
LICENSE='CC BY-NC-SA 4.0 (inherited from the MoNuSeg 2018 training data)'
WHAT="MoNuSeg 2018 training images: the 23 train images of bench/splits/monuseg.json (validation and test images held out); 128x128 tiles, stride 64"

case "$MODE" in
  --gpu)
    # one GPU: bf16 autocast, batch 32, both from scratch. The structure model and the image model train side
    # by side (two processes on the one GPU) for GPU_MINUTES (default 8) each; the image model's budget is
    # split 3:1 by time between its conditional stage and the classifier-free stage (drop rate 0.2), so it
    # always reaches the latter whatever the device's speed
    M=${GPU_MINUTES:-8}
    M1=$(awk -v m="$M" 'BEGIN { printf "%g", m * 0.75 }'); M2=$(awk -v m="$M" 'BEGIN { printf "%g", m * 0.25 }')
    GPU_COMMON=(--data "$TRAIN" --preset cpu --image-size 128 --tile-stride 64 --batch-size 32 --save-every 500
                --preview-every 0 --sample-size 128 --quiet)
    "$PY" -m engine train-structure --run-dir "$RUNS/structure" --steps 1000000 --lr 2e-4 --time-limit "$M" \
        "${GPU_COMMON[@]}" &
    STRUCTURE=$!
    "$PY" -m engine train-image --run-dir "$RUNS/image-stage1" --steps 1000000 --finetune-steps 0 --lr 2e-4 \
        --time-limit "$M1" "${GPU_COMMON[@]}"
    "$PY" -m engine train-image --run-dir "$RUNS/image" --init-from "$RUNS/image-stage1/model.json" --steps 0 \
        --finetune-steps 1000000 --finetune-lr 2e-5 --drop-rate 0.2 --time-limit "$M2" "${GPU_COMMON[@]}"
    wait "$STRUCTURE"
    ;;
  --cpu)
    T=${TIME_LIMIT:-100}
    "$PY" -m engine train-structure --data "$TRAIN" --run-dir "$RUNS/structure" \
        --init-from checkpoints/structure-demo.json --image-size 128 --tile-stride 64 --steps 100000 \
        --batch-size 4 --lr 1e-4 --save-every 100 --preview-every 0 --sample-size 128 --time-limit "$T" --quiet
    "$PY" -m engine train-image --data "$TRAIN" --run-dir "$RUNS/image" --init-from checkpoints/image-demo.json \
        --image-size 128 --tile-stride 64 --steps 0 --finetune-steps 100000 --finetune-lr 1e-4 --drop-rate 0.2 \
        --batch-size 4 --save-every 100 --preview-every 0 --sample-size 128 --time-limit "$T" --quiet
    ;;
  *) echo "usage: bash bench/train_demo.sh --gpu|--cpu [OUT]" >&2; exit 2 ;;
esac

"$PY" -m engine export-model "$RUNS/structure/latest.json" "$OUT/structure-demo" --sample-size 128 \
    --meta license="$LICENSE" --meta training_data="$WHAT" --reference "$TRAIN"
"$PY" -m engine export-model "$RUNS/image/latest.json" "$OUT/image-demo" --sample-size 128 \
    --meta license="$LICENSE" --meta training_data="$WHAT"
if [ "${CALIBRATE:-1}" = 1 ]; then
  [ -n "$VAL" ] || { echo "error: the split's validation images are not in $DATA (CALIBRATE=0 skips this)" >&2; exit 2; }
  "$PY" -m engine calibrate-w --checkpoint "$OUT/image-demo.json" --real "$VAL" --n 16
fi
echo "exported $OUT/structure-demo.json and $OUT/image-demo.json"
