#!/usr/bin/env bash
# A lent GPU's device time is short (15 minutes, machine start included), so nothing is set up there:
#
#   bash bench/gpu_kit.sh prepare            # here: .gpu/ holds the split's 23 train images (lossless WebP:
#                                            # the PNGs and the repo would not fit the 64 MiB a call carries)
#   device run, carry [".gpu"], command:     # there: decode them, train the demo pair (bench/train_demo.sh
#     bash bench/gpu_kit.sh run              # --gpu: both models side by side for GPU_MINUTES, default 8),
#     timeout_s 720                          # copy the exported pair and the logs' tails to $OUT (~10 min)
#   bash bench/gpu_kit.sh finish DIR         # here: calibrate w on the validation images, score realism
#
# The device's python3 holds PyTorch and accelerate; training and export need no diffusers (sampling does,
# so calibration and the realism figures run here, on the CPU, from the exported models).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
case "${1:-}" in
  prepare)
    DATA=${DATA:-../shared/data/monuseg/train}
    PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
    "$PY" - "$DATA" "$KIT" bench/splits/monuseg.json <<'EOF'
import json, os, shutil, sys
import numpy as np
from PIL import Image
data, kit, split = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
os.makedirs(f"{kit}/train/images", exist_ok=True)
os.makedirs(f"{kit}/train/labels", exist_ok=True)
total = 0
for stem in split["train"]:  # validation and test images stay here
    dst = f"{kit}/train/images/{stem}.webp"
    if not os.path.exists(dst):
        im = Image.open(f"{data}/images/{stem}.png").convert("RGB")
        im.save(dst + ".tmp", "WEBP", lossless=True, quality=100, method=6)
        assert (np.asarray(Image.open(dst + ".tmp").convert("RGB")) == np.asarray(im)).all(), stem
        os.replace(dst + ".tmp", dst)
    shutil.copyfile(f"{data}/labels/{stem}.png", f"{kit}/train/labels/{stem}.png")
    total += os.path.getsize(dst) + os.path.getsize(f"{kit}/train/labels/{stem}.png")
print(f"{kit}: {len(split['train'])} train images, {total / 2**20:.1f} MiB")
EOF
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    kit=$(du -sb "$KIT" | cut -f1)
    echo "a device call carries $(( (tree + kit) / 1048576 )) MiB (tracked files + $KIT; limit 64)"
    ;;
  run)
    [ -d "$KIT/train/images" ] || { echo "error: $KIT not carried (bash bench/gpu_kit.sh prepare; carry .gpu)" >&2; exit 2; }
    : "${OUT:?OUT, the folder whose files the device tool sends back, is not set}"
    export PYTHONUNBUFFERED=1
    PY=${PY:-python3}  # the device's python3 holds PyTorch
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt" || true
    rm -rf /tmp/monuseg /tmp/demo  # a warm machine may hold an earlier call's
    "$PY" - "$KIT/train" /tmp/monuseg <<'EOF'
import os, shutil, sys
from PIL import Image
src, dst = sys.argv[1], sys.argv[2]
for kind in ("images", "labels"):
    os.makedirs(f"{dst}/{kind}", exist_ok=True)
for name in sorted(os.listdir(f"{src}/images")):
    stem = name.rsplit(".", 1)[0]
    Image.open(f"{src}/images/{name}").convert("RGB").save(f"{dst}/images/{stem}.png")
    shutil.copyfile(f"{src}/labels/{stem}.png", f"{dst}/labels/{stem}.png")
print(f"decoded {len(os.listdir(dst + '/images'))} images")
EOF
    set +e
    DATA=/tmp/monuseg PY="$PY" CALIBRATE=0 bash bench/train_demo.sh --gpu /tmp/demo 2>&1 | tee "$OUT/train.log"
    rc=${PIPESTATUS[0]}
    set -e
    for f in structure-demo.json structure-demo.safetensors image-demo.json image-demo.safetensors; do
      [ -f "/tmp/demo/$f" ] && cp "/tmp/demo/$f" "$OUT/$f"
    done
    tail -n 3 /tmp/demo/runs/structure/log.jsonl /tmp/demo/runs/image/log.jsonl > "$OUT/logs-tail.txt" 2>&1 || true
    exit "$rc"
    ;;
  finish)
    DIR=${2:?usage: bash bench/gpu_kit.sh finish DIR (the files the device run sent back)}
    PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
    OUT=${OUT:-$HOME/.cache/nudiff/demo-train}
    NAME=${NAME:-gpu}
    mkdir -p "$OUT/$NAME"
    cp "$DIR"/*-demo.json "$DIR"/*-demo.safetensors "$OUT/$NAME/"
    VAL=$("$PY" bench/monuseg.py link validation "$OUT/data")  # the split's validation images, as links
    "$PY" -m engine calibrate-w --checkpoint "$OUT/$NAME/image-demo.json" --real "$VAL" --n 16
    W=$("$PY" -c "import sys; from engine.checkpoint import read_record, recommended_w
print(recommended_w(read_record(sys.argv[1], kind='image')[1]))" "$OUT/$NAME/image-demo.json")
    "$PY" bench/realism.py --name "$NAME" --structure "$OUT/$NAME/structure-demo.json" \
        --image "$OUT/$NAME/image-demo.json" --w "$W" --role validation
    ;;
  *) echo "usage: bash bench/gpu_kit.sh prepare | run | finish DIR" >&2; exit 2 ;;
esac
