"""Speed of the engine's per-tile work: metrics, structure transforms, procedural tiles.

    python bench/engine_speed.py [--repeat 5]

Metrics run on a 1000 x 1000 map of 400 instances against a prediction shifted by 3 px, and are
compared with a baseline measured in the same run: the per-instance mask loop that HoVer-Net's
``get_fast_aji`` uses (for each true instance, the masks of the predicted instances it overlaps).
Targets: each metric <= 100 ms per 1000 x 1000 map; make_tile(256) <= 50 ms; structure_to_instances
<= 10 ms per 256 px tile (one core). Prints figures; no pass/fail.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.metrics import aji, aji_plus, dice, pq  # noqa: E402
from engine.structure import instances_to_structure, structure_to_instances  # noqa: E402
from engine.synthetic import make_tile  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def grid_map(cell: int = 50, gap: int = 4, size: int = 1000) -> np.ndarray:
    idx = np.arange(size) // cell
    inst = (idx[:, None] * (size // cell) + idx[None, :] + 1).astype(np.int32)
    inside = np.arange(size) % cell >= gap
    return np.where(inside[:, None] & inside[None, :], inst, 0)


def loop_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Baseline: AJI with one boolean mask per instance, restricted to overlapping pairs."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    p_masks = {p: pred == p for p in p_ids}
    used: set[int] = set()
    inter_sum = union_sum = 0
    for t in t_ids:
        tm = true == t
        best, best_iou, best_iu = None, 0.0, (0, int(tm.sum()))
        for p in np.unique(pred[tm]):
            if p == 0:
                continue
            i = int(np.logical_and(tm, p_masks[p]).sum())
            u = int(np.logical_or(tm, p_masks[p]).sum())
            if i / u > best_iou:
                best, best_iou, best_iu = p, i / u, (i, u)
        inter_sum += best_iu[0]
        union_sum += best_iu[1]
        if best is not None:
            used.add(best)
    union_sum += sum(int(p_masks[p].sum()) for p in p_ids if p not in used)
    return inter_sum / union_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cv2.setNumThreads(1)

    true = grid_map()
    pred = np.zeros_like(true)
    pred[:, 3:] = true[:, :-3]
    print("## Metrics on a 1000x1000 map with 400 instances")
    base = best_of(lambda: loop_aji(true, pred), max(1, args.repeat // 2))
    assert abs(loop_aji(true, pred) - aji(true, pred)) < 1e-9, "baseline and engine disagree"
    print(f"baseline per-instance mask loop (AJI)   {1000 * base:8.1f} ms")
    for fn in (dice, aji, aji_plus, pq):
        t = best_of(lambda: fn(true, pred), args.repeat)
        print(f"engine.metrics.{fn.__name__:<10}               {1000 * t:8.1f} ms  ({base / t:6.1f}x faster than baseline)")

    print("\n## Procedural tiles and structure transforms (256 px, one core)")
    t_tile = best_of(lambda: make_tile(256, seed=1), args.repeat)
    _, inst = make_tile(256, seed=1)
    structure = instances_to_structure(inst)
    t_fwd = best_of(lambda: instances_to_structure(inst), args.repeat)
    t_inv = best_of(lambda: structure_to_instances(structure), args.repeat)
    print(f"make_tile(256)                {1000 * t_tile:7.1f} ms (target <= 50)")
    print(f"instances_to_structure        {1000 * t_fwd:7.1f} ms")
    print(f"structure_to_instances        {1000 * t_inv:7.1f} ms (target <= 10)")

    print("\n## Diffusion training batch (augmented 128 px tiles; the CPU work of every training step)")
    import torch

    from engine.structure import dihedral
    from engine.train import TrainingSet

    tiles = [make_tile(128, seed=i) for i in range(64)]
    data = TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])
    gen = torch.Generator().manual_seed(0)
    data.batch(list(range(64)), gen)  # structures are computed once, on first use

    def recompute(n: int) -> None:  # baseline: the structure of every augmented instance map, every step
        for i in range(n):
            k, flip = i % 4, bool(i % 2)
            img, inst = np.rot90(data.images[i], k), np.rot90(data.insts[i], k)
            if flip:
                img, inst = img[:, ::-1], inst[:, ::-1]
            np.ascontiguousarray(img)
            instances_to_structure(np.ascontiguousarray(inst))

    def per_tile(n: int) -> None:  # cached structure, numpy dihedral per tile, then one tensor per batch
        ims, sts = zip(*(dihedral(data.images[i], data.structure(i), i % 4, bool(i % 2)) for i in range(n)))
        torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1
        torch.from_numpy(np.stack(sts)).permute(0, 3, 1, 2).contiguous()

    for n in (16, 64):
        idx = list(range(n))
        t_base = best_of(lambda: recompute(n), args.repeat) if n == 16 else None
        t_tile = best_of(lambda: per_tile(n), args.repeat)
        t_batch = best_of(lambda: data.batch(idx, gen), args.repeat)
        t_noise = best_of(lambda: torch.randn((n, 3, 128, 128), generator=gen), args.repeat)
        if t_base is not None:
            print(f"batch {n:3d}: baseline, structures recomputed   {1000 * t_base:7.1f} ms")
        print(f"batch {n:3d}: cached, numpy dihedral per tile   {1000 * t_tile:7.1f} ms"
              + (f"  ({t_base / t_tile:5.1f}x faster than baseline)" if t_base else ""))
        print(f"batch {n:3d}: TrainingSet.batch (dihedral_batch) {1000 * t_batch:7.1f} ms"
              f"  ({t_tile / t_batch:5.1f}x faster than per tile)")
        print(f"batch {n:3d}: the step's noise drawn on the host  {1000 * t_noise:7.1f} ms"
              " (now drawn on the training device)")


if __name__ == "__main__":
    main()
