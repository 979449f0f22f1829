"""Time and peak memory of the anti-copying check (engine.copying.copy_check), the Export report's slowest part.

    python bench/copy_check.py [--data DIR] [--images 10] [--small 64] [--large 32] [--synthetic 16] [--threads 2]

Training tiles: tiles at stride S/2 of the first --images fields of DIR (default: ../shared/data/monuseg/train
when present, else 1000 px fields of the procedural generator). Each measurement runs in a fresh process, so
its peak resident memory (ru_maxrss) is its own:

- **whole matrix** (the baseline, measured in the same run): the check as first written, one N x N float64
  distance matrix of all training tiles, on --small px tiles (the largest size whose matrix fits);
- **blocked** (what the engine does): rows of 128 at a time, the threshold from at most 8,192 evenly spaced
  tiles; on the same tiles, then on --large px tiles (what the Export report meets for a basket of small pairs).

Prints figures and ratios; no pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"


def fields(data: Path | None, n: int) -> list[np.ndarray]:
    """n uint8 RGB fields: MoNuSeg images when present, else procedural 1000 px tiles."""
    if data is not None and (data / "images").is_dir():
        from engine.data import read_image

        return [read_image(p) for p in sorted((data / "images").glob("*.png"))[:n]]
    from engine.synthetic import make_tile

    return [make_tile(1000, seed=s)[0] for s in range(n)]


def whole_matrix(synthetic, tiles, boxes, size) -> tuple[float, np.ndarray]:
    """The first version of the check: every distance at once (float64), threshold over all tiles."""
    import torch

    from engine.copying import _dihedral, thumbnails

    ref = torch.from_numpy(thumbnails(tiles).reshape(len(tiles), -1)).double()
    d = (torch.cdist(ref, ref) / np.sqrt(ref.shape[1])).numpy()
    b = np.asarray(boxes)
    same = (b[:, None, 0] == b[None, :, 0]) & (np.abs(b[:, None, 1] - b[None, :, 1]) < size) & \
        (np.abs(b[:, None, 2] - b[None, :, 2]) < size)
    d[same] = np.inf
    threshold = float(np.quantile(d.min(1), 0.01))
    syn = [torch.from_numpy(v.reshape(len(v), -1)).double() for v in _dihedral(thumbnails(synthetic))]
    dist = np.min(np.stack([(torch.cdist(v, ref) / np.sqrt(ref.shape[1])).numpy() for v in syn]), axis=0).min(1)
    return threshold, dist


def child(args) -> None:
    import torch

    from engine.copying import copy_check, training_tiles

    torch.set_num_threads(args.threads)
    images = fields(args.data, args.images)
    tiles, boxes = training_tiles(images, args.size)
    rng = np.random.default_rng(0)
    synthetic = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.synthetic)]
    t = time.perf_counter()
    if args.child == "whole":
        threshold, dist = whole_matrix(synthetic, tiles, boxes, args.size)
    else:
        res = copy_check(synthetic, tiles, boxes, size=args.size)
        threshold, dist = res.threshold, np.asarray(res.distance)
    secs = time.perf_counter() - t
    print(json.dumps({"n": len(tiles), "seconds": secs, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 1024, "threshold": threshold, "median": float(np.median(dist))}))


def measure(args, mode: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(size), "--images", str(args.images),
           "--synthetic", str(args.synthetic), "--threads", str(args.threads)]
    if args.data is not None:
        cmd += ["--data", str(args.data)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA if DATA.is_dir() else None,
                    help="labeled folder (images/*.png); default: MoNuSeg when present, else procedural fields")
    ap.add_argument("--images", type=int, default=10, help="training fields (default 10, as the demo models)")
    ap.add_argument("--small", type=int, default=64, help="tile size for the whole-matrix baseline (default 64)")
    ap.add_argument("--large", type=int, default=32, help="tile size for the blocked check alone (default 32)")
    ap.add_argument("--synthetic", type=int, default=16, help="synthetic tiles (random pixels; default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["whole", "blocked"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    src = args.data or "procedural 1000 px fields"
    print(f"training fields: {args.images} of {src}; {args.synthetic} synthetic tiles; {args.threads} threads")
    base = measure(args, "whole", args.small)
    new = measure(args, "blocked", args.small)
    large = measure(args, "blocked", args.large)
    print("\n| check | tile px | training tiles | seconds | peak memory (MB) | threshold | median distance |")
    print("|---|---|---|---|---|---|---|")
    for name, size, r in (("whole matrix (baseline)", args.small, base), ("blocked", args.small, new),
                          ("blocked", args.large, large)):
        if "error" in r:
            print(f"| {name} | {size} | – | failed: {r['error']} | | | |")
        else:
            print(f"| {name} | {size} | {r['n']:,} | {r['seconds']:.2f} | {r['peak_mb']:,.0f} | {r['threshold']:.4f} | "
                  f"{r['median']:.4f} |")
    if "error" not in base and "error" not in new:
        print(f"\nblocked / whole matrix at {args.small} px: time x{new['seconds'] / base['seconds']:.2f}, "
              f"peak memory x{new['peak_mb'] / base['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
