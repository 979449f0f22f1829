"""How close each synthetic image's brightness comes to the real tile whose layout it was drawn for.

The colour prior (engine.colour_prior) gives an image, while the model cannot see it, the mean colour of a
training tile: drawn among all stored tiles, or among those whose nucleus area is nearest the layout's. This
script takes crops of the images of one role of the split (default: validation), uses each crop's own label
as the layout, synthesizes it three ways with the same seed (no prior; a draw among all training tiles; a
layout-matched draw) and compares each image's mean L* (CIELAB, 0-100) with its real crop's:

    python bench/colour_match.py --image checkpoints/image-demo.json --role validation --n 24 --w 0.75

Colours come from the split's train images only (their 128 px tiles at stride 64, with their labels); no
image of the scored role is among them. Prints a Markdown table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.monuseg import DATA, SPLIT, read_split  # noqa: E402


def crops(items, size: int, stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, instance map) crops of size px on the project's tile grid."""
    from engine.data import tile_positions

    out = []
    for it in items:
        h, w = it.inst.shape
        for y in tile_positions(h, size, stride):
            for x in tile_positions(w, size, stride):
                out.append((it.image[y:y + size, x:x + size], it.inst[y:y + size, x:x + size]))
    return out


def mean_lightness(image: np.ndarray) -> float:
    from skimage.color import rgb2lab

    return float(rgb2lab(image)[..., 0].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="labeled folder holding the split's images")
    ap.add_argument("--split", type=Path, default=SPLIT)
    ap.add_argument("--role", default="validation", choices=("validation", "test"))
    ap.add_argument("--image", type=Path, default=ROOT / "checkpoints" / "image-demo.json", help="image model")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=24, help="crops scored (a seeded draw among the role's crops)")
    ap.add_argument("--w", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=100, help="first sampling seed; crop k uses seed + k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.data / "images").is_dir():
        print(f"skipped: data not found at {args.data}")
        return 0
    import torch

    from engine.colour_prior import tile_mean_colours
    from engine.data import load_folder
    from engine.pipeline import load_model, synthesize
    from engine.structure import instances_to_structure

    torch.set_num_threads(args.threads)
    split = read_split(args.split)
    items = {it.stem: it for it in load_folder(args.data)[0]}
    train = [items[s] for s in split["train"]]
    table = tile_mean_colours([it.image for it in train], args.size, args.size // 2,
                              labels=[it.inst for it in train])
    pool = crops([items[s] for s in split[args.role]], args.size, args.size)
    picked = np.random.default_rng(0).choice(len(pool), min(args.n, len(pool)), replace=False)
    layouts = [pool[i] for i in picked]
    real = np.array([mean_lightness(im) for im, _ in layouts])
    fg = np.array([float((lab > 0).mean()) for _, lab in layouts])
    model = load_model(args.image)
    arms = {"none": None, "all tiles": table[:, :3], "matched to the layout": table}
    rows = {}
    for name, colours in arms.items():
        t = time.time()
        light = np.array([mean_lightness(synthesize(model, [instances_to_structure(lab)], w=args.w,
                                                    steps=args.steps, seed=args.seed + k, colour_prior=colours)[0])
                          for k, (_, lab) in enumerate(layouts)])
        rows[name] = {"mean_L": float(light.mean()), "mae_L": float(np.abs(light - real).mean()),
                      "r_real": float(np.corrcoef(light, real)[0, 1]), "r_fg": float(np.corrcoef(light, fg)[0, 1]),
                      "seconds": round(time.time() - t, 1)}
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    print(f"| {len(layouts)} {args.role} layouts, {args.size} px, w = {args.w:g} | mean L* (real {real.mean():.1f}) "
          f"| mean abs. L* error against its own real crop | r (L*, real crop's L*) "
          f"| r (L*, foreground) (real {np.corrcoef(real, fg)[0, 1]:+.2f}) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| colour prior: {name} | {r['mean_L']:.1f} | {r['mae_L']:.1f} | {r['r_real']:+.2f} "
              f"| {r['r_fg']:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "colours": int(len(table)), "real_mean_L": float(real.mean()),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
