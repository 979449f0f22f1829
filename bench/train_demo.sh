#!/usr/bin/env bash
# Train the embedded demo pair (structure + image model, preset `cpu`) on the training images of
# bench/splits/monuseg.json and export them as checkpoints/structure-demo.* and image-demo.* would be.
#
#   bash bench/train_demo.sh --gpu [OUT]   # one H100/H200: from scratch, 128 px tiles, ~11 min of training
#   bash bench/train_demo.sh --cpu [OUT]   # 2-core CPU: continues the current demo pair on 128 px tiles;
#                                          # resumable (run again to continue), TIME_LIMIT minutes per call
#
# OUT (default ~/.cache/nudiff/demo-train) receives runs/, data/ (links to the split's images) and the
# exported pair OUT/structure-demo.{json,safetensors}, OUT/image-demo.{json,safetensors} (fp16), the image
# model's guidance w calibrated on the split's validation images (never its test images).
# Environment: DATA (default ../shared/data/monuseg/train), TIME_LIMIT (CPU: minutes per model per call,
# default 100), PY (python, default .venv/bin/python or python).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:---cpu}
OUT=${2:-$HOME/.cache/nudiff/demo-train}
DATA=${DATA:-../shared/data/monuseg/train}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
SPLIT=bench/splits/monuseg.json
[ -d "$DATA/images" ] || { echo "error: no labeled images in $DATA (set DATA=...)" >&2; exit 2; }

# the split's training and validation images as folders of links (the test images are never linked)
"$PY" - "$DATA" "$OUT/data" "$SPLIT" <<'EOF'
import json, os, sys
data, out, split = os.path.realpath(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
for role in ("train", "validation"):
    for kind in ("images", "labels"):
        os.makedirs(f"{out}/{role}/{kind}", exist_ok=True)
        for stem in split[role]:
            dst = f"{out}/{role}/{kind}/{stem}.png"
            if not os.path.lexists(dst):
                os.symlink(f"{data}/{kind}/{stem}.png", dst)
EOF
TRAIN=$OUT/data/train; VAL=$OUT/data/validation; RUNS=$OUT/runs
LICENSE='CC BY-NC-SA 4.0 (inherited from the MoNuSeg 2018 training data)'
WHAT="MoNuSeg 2018 training images: the 23 train images of bench/splits/monuseg.json (validation and test images held out); 128x128 tiles, stride 64"

case "$MODE" in
  --gpu)
    # one GPU: bf16 autocast, batch 32, both from scratch; fixed step counts (so that the image model
    # always reaches its classifier-free stage), with time limits of 4 + 7 min as a guard
    "$PY" -m engine train-structure --data "$TRAIN" --run-dir "$RUNS/structure" --preset cpu --image-size 128 \
        --tile-stride 64 --steps 5000 --batch-size 32 --lr 2e-4 --save-every 500 --preview-every 0 \
        --sample-size 128 --time-limit 4 --quiet
    "$PY" -m engine train-image --data "$TRAIN" --run-dir "$RUNS/image" --preset cpu --image-size 128 \
        --tile-stride 64 --steps 4000 --finetune-steps 2000 --batch-size 32 --lr 2e-4 --finetune-lr 2e-5 \
        --drop-rate 0.2 --save-every 500 --preview-every 0 --sample-size 128 --time-limit 7 --quiet
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
"$PY" -m engine calibrate-w --checkpoint "$OUT/image-demo.json" --real "$VAL" --n 16
echo "exported $OUT/structure-demo.json and $OUT/image-demo.json"
