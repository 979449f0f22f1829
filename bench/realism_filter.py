"""Layout realism filter (engine.curate): morphology distance to held-out real tiles, with and without it.

Samples N * max(k) structures once (seeds 0, 1, ...), then for each oversampling factor k keeps N of the
first N * k candidates with the structure model's stored reference (its training tiles) and reports the
mean normalised morphology distance (engine.quality) to real tiles of images the model never saw (by
default the validation images of bench/splits/monuseg.json: a filter setting is a choice). k = 1 is
the unfiltered baseline (the first N samples), so the ratio column compares with it in the same run.
Cost: k times the structure sampling per kept layout (image synthesis runs on kept layouts only).

    .venv/bin/python bench/realism_filter.py                       # demo structure model, MoNuSeg validation
    .venv/bin/python bench/realism_filter.py --checkpoint RUN/model.json --real DIR --n 64 --k 1,2,4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.monuseg import DATA, ROLES, SPLIT, read_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "structure-demo.json"))
    ap.add_argument("--real", type=Path, default=DATA,
                    help="real labeled images to compare with (with the default, only those of --role)")
    ap.add_argument("--split", type=Path, default=SPLIT, help="split file (roles of the images of DATA)")
    ap.add_argument("--role", choices=ROLES, default="validation",
                    help="which images of the split to compare with, when --real is the default")
    ap.add_argument("--n", type=int, default=32, help="layouts kept per setting")
    ap.add_argument("--k", default="1,2,3", help="oversampling factors (1 = no filter)")
    ap.add_argument("--size", type=int, default=None, help="tile size (default: the model's sampling size)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from engine.curate import curate, layout_features
    from engine.data import load_folder, tile_image
    from engine.pipeline import load_model, sample_structures
    from engine.quality import morphology_distance

    ks = sorted({float(k) for k in args.k.split(",")} | {1.0})
    model = load_model(args.checkpoint, kind="structure", device=args.device)
    if model.layout_reference is None:
        raise SystemExit(f"{args.checkpoint} stores no layout reference (re-export it with --reference)")
    size = args.size or model.image_size
    items = load_folder(args.real)[0]
    if args.real == DATA:
        stems = set(read_split(args.split)[args.role])
        items = [it for it in items if it.stem in stems]
    real = [t.inst for it in items for t in tile_image(it, size, size // 2)]
    total = int(np.ceil(args.n * max(ks)))
    print(f"model {Path(args.checkpoint).name} ({model.step} steps), {size} px, {total} samples; real: "
          f"{len(real)} tiles of {len(items)} images ({', '.join(it.stem for it in items)}); "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.time()
    samples = sample_structures(model, total, steps=args.steps, size=size, batch_size=8)
    per_sample = (time.time() - t0) / total
    feats = layout_features([s.inst for s in samples])
    base = None
    print("| k | candidates | kept | nuclei/tile | fg fraction | solidity | morphology distance | ratio vs k=1 |"
          " sampling s per kept layout |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        m = int(np.ceil(args.n * k))
        t1 = time.time()
        idx = np.arange(args.n) if k == 1 else curate(model.layout_reference, feats[:m], args.n, seed=0)
        filt = time.time() - t1
        d = morphology_distance(real, [samples[i].inst for i in idx])
        base = d["mean_normalised"] if base is None else base
        print(f"| {k:g} | {m} | {len(idx)} | {d['nuclei_per_tile']['synthetic_mean']:.2f} "
              f"(real {d['nuclei_per_tile']['real_mean']:.2f}) | {d['fg_fraction']['synthetic_mean']:.3f} "
              f"(real {d['fg_fraction']['real_mean']:.3f}) | {d['solidity']['synthetic_mean']:.3f} "
              f"(real {d['solidity']['real_mean']:.3f}) | {d['mean_normalised']:.3f} | "
              f"{d['mean_normalised'] / base:.2f} | {per_sample * k + filt / args.n:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
