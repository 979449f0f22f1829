"""Round trip instance map -> nuclei structure -> instance map: AJI and speed.

Compares engine.structure.structure_to_instances with HoVer-Net's stock post-processing (Sobel kernel
21 on the distance maps, marker threshold 0.4, 5x5 opening, min size 10; re-implemented here from its
published description) on 256x256 tiles: the 72 non-overlapping tiles of the first 8 MoNuSeg images
when ../shared/data is present, and procedural tiles always. Prints figures; no pass/fail.

    python bench/structure_roundtrip.py [--data DIR] [--procedural 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.metrics import aji  # noqa: E402
from engine.morphology import remove_small  # noqa: E402
from engine.structure import instances_to_structure, relabel, structure_to_instances  # noqa: E402
from engine.synthetic import make_tile  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg" / "train" / "labels"


def hovernet_stock(structure: np.ndarray, ksize: int = 21, marker_thr: float = 0.4, min_size: int = 10) -> np.ndarray:
    """HoVer-Net's process_np_hv as published: Sobel energy on min-max normalised h/v maps."""
    blb = (structure[..., 0] > 0).astype(np.int32)
    blb = ndimage.label(blb)[0]
    blb = (remove_small(blb, min_size) > 0).astype(np.float32)
    h = cv2.normalize(structure[..., 1], None, 0, 1, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v = cv2.normalize(structure[..., 2], None, 0, 1, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sh = cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=ksize)
    sv = cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=ksize)
    sh = 1 - cv2.normalize(sh, None, 0, 1, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sv = 1 - cv2.normalize(sv, None, 0, 1, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sh, sv) - (1 - blb)
    overall[overall < 0] = 0
    dist = -cv2.GaussianBlur((1.0 - overall) * blb, (3, 3), 0)
    overall = (overall >= marker_thr).astype(np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    marker = remove_small(ndimage.label(marker)[0], min_size)
    return relabel(watershed(dist, markers=marker, mask=blb > 0))


def evaluate(tiles: list[np.ndarray], name: str) -> None:
    structures = [instances_to_structure(t) for t in tiles]
    for label, fn in (("engine.structure_to_instances", structure_to_instances), ("hovernet stock", hovernet_stock)):
        scores, times = [], []
        for t, s in zip(tiles, structures):
            t0 = time.perf_counter()
            pred = fn(s)
            times.append(time.perf_counter() - t0)
            scores.append(aji(t, pred))
        scores = np.array(scores)
        worst = np.argsort(scores)[:3]
        print(f"{name:<22} {label:<32} tiles {len(tiles):3d}  mean AJI {scores.mean():.4f}  "
              f"worst {scores.min():.3f} (tiles {', '.join(map(str, worst))})  "
              f"median {1000 * np.median(times):.1f} ms/tile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of instance-map PNGs")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--procedural", type=int, default=24)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    if args.data.is_dir():
        from PIL import Image

        tiles = []
        for p in sorted(args.data.glob("*.png"))[: args.images]:
            lab = np.array(Image.open(p))
            for y in range(0, lab.shape[0] - 255, 256):
                for x in range(0, lab.shape[1] - 255, 256):
                    tiles.append(lab[y:y + 256, x:x + 256])
        evaluate(tiles, "MoNuSeg 256px")
    else:
        print(f"real data not found at {args.data}: skipping the MoNuSeg figures")
    if args.procedural > 0:
        evaluate([make_tile(256, seed=i)[1] for i in range(args.procedural)], "procedural 256px")


if __name__ == "__main__":
    main()
