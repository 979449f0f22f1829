"""What the guidance scale w does to synthetic images: alignment with their labels and appearance
(nucleus contrast, fine texture) against real tiles, on the same layouts and seeds for every w.

    python bench/guidance.py --labels LAYOUTS_DIR --real REAL_DIR [--image-checkpoint CKPT]
                             [--w 0.5,1,1.5,2,3] [--n 32] [--steps 20] [--sampler ddim]

LAYOUTS_DIR: a labeled folder (images/ + labels/, e.g. a generated pair set) or a folder of instance maps;
its first n maps (square, of a size the image model takes) are the layouts. REAL_DIR: labeled real images,
cut into tiles of the layouts' size. Prints one row per w and the real reference; no pass/fail.
Without --labels, the demo structure model samples n layouts at the image model's size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import pipeline  # noqa: E402
from engine import quality as q  # noqa: E402


def layouts(labels: Path | None, n: int, image_model: pipeline.LoadedModel, seed: int) -> list[np.ndarray]:
    """n (H, W) int32 instance maps: from a folder, or sampled with the demo structure model."""
    if labels is None:
        from engine.demo import DEMO_STRUCTURE

        smodel = pipeline.load_model(DEMO_STRUCTURE, "structure")
        return [s.inst for s in pipeline.sample_structures(smodel, n, size=image_model.image_size, seed=seed)]
    from engine.data import label_files, read_label

    return [read_label(p) for p in label_files([labels])[:n]]


def row(name: str, images, insts, real_look=None) -> str:
    align = q.alignment_score(images, insts)
    look = q.appearance_stats(images, insts)
    cells = [f"{align['hematoxylin_dice']:.3f}", f"{align['darker_fraction']:.3f}"]
    dist = q.appearance_distance(real_look, look) if real_look is not None else None
    for key in q.APPEARANCE:
        mean = float(np.nanmean(look[key]))
        cells.append(f"{mean:.1f} ({dist[key]['normalised']:.2f})" if dist else f"{mean:.1f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=Path, default=None, help="layouts: labeled folder or folder of instance maps")
    ap.add_argument("--real", type=Path, required=True, help="real labeled folder (reference)")
    ap.add_argument("--image-checkpoint", type=Path, default=None, help="image model (default: the demo)")
    ap.add_argument("--w", default="0.5,1,1.5,2,3", help="guidance scales, comma-separated")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from engine.demo import DEMO_IMAGE

    imodel = pipeline.load_model(args.image_checkpoint or DEMO_IMAGE, "image", device=args.device)
    insts = layouts(args.labels, args.n, imodel, args.seed)
    size = insts[0].shape[0]
    real_pairs = q.real_tiles(q.load_pairs(args.real, "real pairs"), size, 500)
    real_images, real_insts = [im for im, _ in real_pairs], [inst for _, inst in real_pairs]
    real_look = q.appearance_stats(real_images, real_insts)

    print(f"image model: {imodel.name} (step {imodel.step}); {len(insts)} layouts of {size} px; "
          f"{args.sampler} {args.steps} steps; real: {len(real_pairs)} tiles of {args.real}")
    print("\n| w | hematoxylin Dice | darker fraction | " +
          " | ".join(f"{k.replace('_', ' ')} (W / std)" for k in q.APPEARANCE) + " | s / pair |")
    print("|---|" + "---|" * (len(q.APPEARANCE) + 3))
    for w in (float(v) for v in args.w.split(",")):
        t0 = time.perf_counter()
        images = pipeline.synthesize(imodel, insts, w=w, sampler=args.sampler, steps=args.steps, seed=args.seed,
                                     batch_size=args.batch_size)
        dt = (time.perf_counter() - t0) / len(insts)
        print(row(f"{w:g}", images, insts, real_look) + f" {dt:.1f} |", flush=True)
    print(row("real tiles", real_images, real_insts) + " |")


if __name__ == "__main__":
    main()
