"""Pictures for a pathologist: a side-by-side contact sheet and a blind sheet with its key apart.

Uses the 256 px synthetic tiles cached by bench/realism.py (same models, w, seed and steps) and
non-overlapping 256 px tiles of the split's real images of one role:

    python bench/realism.py --name demo --w 2 --role test          # makes the cache
    python bench/blind_sheet.py --name demo --w 2 --role test --out docs

writes OUT/contact_sheet.jpg (left: real tiles with their nuclei outlined; right: synthetic pairs, same
layout), OUT/blind_sheet.jpg (8 real and 8 synthetic images, no outlines, shuffled, numbered 1-16) and
OUT/blind_sheet_key.md (which number is which; keep it from the scorer), with a scoring line per tile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine import render  # noqa: E402
from realism import grid_tiles, load_role  # noqa: E402


def _label(img: np.ndarray, text: str) -> np.ndarray:
    pic = Image.fromarray(img)
    d = ImageDraw.Draw(pic)
    d.rectangle([0, 0, 8 + 8 * len(text), 18], fill=(255, 255, 255))
    d.text((4, 3), text, fill=(0, 0, 0))
    return np.asarray(pic)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--w", type=float, required=True)
    ap.add_argument("--role", choices=("validation", "test"), default="test")
    ap.add_argument("--n", type=int, default=16, help="--n of the realism run (cache key)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-side", type=int, default=8, help="real and synthetic tiles on each sheet")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "monuseg" / "train")
    ap.add_argument("--split", type=Path, default=ROOT / "bench" / "splits" / "monuseg.json")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "nudiff" / "realism")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    k = args.per_side
    cache = args.work / args.name
    tag = f"256-n{args.n}-s{args.seed}-{args.steps}"
    s_img = np.load(cache / f"images-{tag}-w{args.w:g}.npz")["images"][:k]
    s_lab = np.load(cache / f"structures-{tag}.npz")["insts"][:k]
    split = json.loads(args.split.read_text())
    r_img, r_lab = load_role(args.data, split[args.role])
    real_i, real_l = grid_tiles(r_img, r_lab, 256)
    pick = np.linspace(0, len(real_i) - 1, k).round().astype(int)  # evenly over the images
    real_i, real_l = [real_i[i] for i in pick], [real_l[i] for i in pick]
    args.out.mkdir(parents=True, exist_ok=True)

    def block(images, insts):
        return render.grid([render.overlay_contours(im, lab, opacity=0.7, color=(0, 255, 0))
                            for im, lab in zip(images, insts)], cols=2, pad=4)

    left, right = block(real_i, real_l), block(list(s_img), list(s_lab))
    gap = np.full((left.shape[0], 24, 3), 255, np.uint8)
    sheet = np.concatenate([left, gap, right], axis=1)
    head = np.full((28, sheet.shape[1], 3), 255, np.uint8)
    pic = Image.fromarray(np.concatenate([head, sheet], axis=0))
    d = ImageDraw.Draw(pic)
    d.text((6, 8), f"real ({args.role} images, held out)", fill=(0, 0, 0))
    d.text((left.shape[1] + 30, 8), f"synthetic ({args.name}, w = {args.w:g}, DDIM {args.steps})", fill=(0, 0, 0))
    pic.save(args.out / "contact_sheet.jpg", quality=90)  # real and synthetic alike

    rng = np.random.default_rng(args.seed + 2026)
    items = [("real", f"{args.role} tile {i}") for i in range(k)] + [("synthetic", f"seed {args.seed + i}")
                                                                      for i in range(k)]
    tiles = real_i + list(s_img)
    order = rng.permutation(len(tiles))
    cells = [_label(np.ascontiguousarray(tiles[j]), str(n + 1)) for n, j in enumerate(order)]
    Image.fromarray(render.grid(cells, cols=4, pad=6)).save(args.out / "blind_sheet.jpg", quality=90)
    lines = [f"# Key to blind_sheet.jpg ({args.name}, w = {args.w:g})", "",
             "Keep this file from the person scoring the sheet. Scoring: for each number, real or synthetic,",
             "and how sure (1-5).", "", "| tile | truth | source |", "|---|---|---|"]
    lines += [f"| {n + 1} | {items[j][0]} | {items[j][1]} |" for n, j in enumerate(order)]
    (args.out / "blind_sheet_key.md").write_text("\n".join(lines) + "\n")
    print(f"written {args.out}/contact_sheet.jpg, blind_sheet.jpg, blind_sheet_key.md")


if __name__ == "__main__":
    main()
