"""How far apart real MoNuSeg images are: nuclei per 128 px tile and foreground fraction of each train and
validation image of the split (labels only, no model), and how far the mean of a few images drawn from the
train images strays from the train mean (the spread a held-out figure carries).

    python bench/density_spread.py [--data DIR] [--split FILE] [--size 128] [--draw 3]

Prints a table per image and the spread of --draw-image means; the test images are never read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.monuseg import DATA, SPLIT, read_split  # noqa: E402
from engine.data import read_label  # noqa: E402


def per_tile(label: np.ndarray, size: int) -> tuple[float, float]:
    """Mean nuclei per tile and foreground fraction over the size x size grid (stride size) of a label."""
    counts, fg = [], []
    for y in range(0, label.shape[0] - size + 1, size):
        for x in range(0, label.shape[1] - size + 1, size):
            t = label[y : y + size, x : x + size]
            counts.append(len(np.unique(t[t > 0])))
            fg.append(float((t > 0).mean()))
    return float(np.mean(counts)), float(np.mean(fg))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", type=Path, default=SPLIT)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--draw", type=int, default=3, help="images per drawn held-out-sized set")
    args = ap.parse_args(argv)
    if not (args.data / "labels").is_dir():
        print(f"skipped: no labels in {args.data}")
        return 0
    split = read_split(args.split)
    rows = [(role, stem, *per_tile(read_label(args.data / "labels" / f"{stem}.png"), args.size))
            for role in ("train", "validation") for stem in split[role]]
    print(f"| role | image | nuclei per {args.size} px tile | foreground |\n|---|---|---|---|")
    for role, stem, n, f in sorted(rows, key=lambda r: r[2]):
        print(f"| {role} | {stem} | {n:.2f} | {f:.3f} |")
    train = np.array([r[2] for r in rows if r[0] == "train"])
    val = np.array([r[2] for r in rows if r[0] == "validation"])
    rng = np.random.default_rng(0)
    means = np.array([rng.choice(train, args.draw, replace=False).mean() for _ in range(10000)])
    print(f"\ntrain: {len(train)} images, mean {train.mean():.2f} (sd {train.std(ddof=1):.2f}, median "
          f"{np.median(train):.2f}); validation: {len(val)} images, mean {val.mean():.2f}")
    print(f"mean of {args.draw} train images (10,000 draws): 5-95 % {np.percentile(means, 5):.2f}-"
          f"{np.percentile(means, 95):.2f}; within 10 % of the train mean in {(abs(means / train.mean() - 1) < 0.1).mean():.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
