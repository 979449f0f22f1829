"""Whole fields: wall time, peak memory, seams and alignment of pairs far larger than the model's tile.

    python bench/large_fields.py                          # 512, 1000, 2000 px with the demo models (CPU: long)
    python bench/large_fields.py --sizes 512 --steps 10   # a quick look
    python bench/large_fields.py --sizes 4000 --device cuda   # the GPU row

Each size runs in a fresh process, so its peak resident memory (VmHWM) is its own. Per size, in the same
run: one structure sampled as fused windows then one watershed; its image synthesized as fused windows
(MultiDiffusion) and, as the baseline, by naive non-overlapping stitching of the same structure with
the same seed; a single-window 256 px crop of the same structure for alignment. Prints a Markdown table;
no pass/fail. Targets (issue 20): peak memory <= 4 GiB on the CPU preset, seam score <= 1.1, alignment of
tiled images (and of their nuclei on window edges) as good as a single window's.

Seam score: mean |grey step| across window edges / the same everywhere else (1.0: invisible), measured for
each method at its own window edges (engine.tiling.seam_score).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _edge_nuclei_darker(image: np.ndarray, inst: np.ndarray, rows: list[int], cols: list[int]) -> float:
    """darker_fraction (engine.quality) of the nuclei that a window edge crosses only."""
    import warnings

    from skimage.color import rgb2hed

    on = np.zeros(inst.shape, bool)
    for r in rows:
        on[r - 1:r + 1, :] = True
    for c in cols:
        on[:, c - 1:c + 1] = True
    ids = np.unique(inst[on & (inst > 0)])
    if ids.size == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hema = rgb2hed(image)[..., 0]
    sel = np.isin(inst, ids)
    return float(np.mean(hema[sel] > np.median(hema[inst == 0])))


def one(size: int, steps: int, seed: int, device: str, crop: int, naive: bool = True) -> dict:
    from engine import pipeline
    from engine.demo import default_checkpoints
    from engine.memory import job_bytes
    from engine.quality import alignment_score
    from engine.memory import reuse_freed_memory
    from engine.tiling import TilingOptions, seam_score

    reuse_freed_memory()  # as the studio's worker and the CLI do
    s_ckpt, i_ckpt = default_checkpoints()
    smodel = pipeline.load_model(s_ckpt, device=device)
    imodel = pipeline.load_model(i_ckpt, device=device)
    tiling = TilingOptions()
    base = _hwm()
    t0 = time.perf_counter()
    st = pipeline.sample_structures(smodel, 1, steps=steps, seed=seed, size=size, tiling=tiling)[0]
    t_struct = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = pipeline.synthesize(imodel, [st.structure], w=2.0, steps=steps, seed=seed, tiling=tiling)[0]
    t_image = time.perf_counter() - t0
    peak = _hwm()
    plan = pipeline.plan_image_canvas(imodel, (size, size), 2.0, tiling)
    t0 = time.perf_counter()
    naive_tiling = TilingOptions(overlap=0)
    naive_plan = pipeline.plan_image_canvas(imodel, (size, size), 2.0, naive_tiling)
    naive_img = None
    if naive:
        naive_img = pipeline.synthesize(imodel, [st.structure], w=2.0, steps=steps, seed=seed, tiling=naive_tiling)[0]
    t_naive = time.perf_counter() - t0 if naive else float("nan")
    c = min(crop, size)
    y0 = x0 = (size - c) // 2
    single = pipeline.synthesize(imodel, [st.structure[y0:y0 + c, x0:x0 + c]], w=2.0, steps=steps, seed=seed,
                                 tiling=TilingOptions(tile=c))[0]
    rows, cols = plan.grid.edges() if plan.tiled else ([], [])
    nrows, ncols = naive_plan.grid.edges() if naive_plan.tiled and naive else ([], [])
    a_tiled = alignment_score([fused[y0:y0 + c, x0:x0 + c]], [st.inst[y0:y0 + c, x0:x0 + c]])  # same region
    a_single = alignment_score([single], [st.inst[y0:y0 + c, x0:x0 + c]])
    one_pass = job_bytes(imodel.config, (size, size), (size, size), 1, guided=True)
    return {
        "size": size, "steps": steps, "nuclei": st.n_nuclei, "windows": plan.windows,
        "window_batch": plan.memory.window_batch, "naive_windows": naive_plan.windows,
        "structure_s": t_struct, "image_s": t_image, "naive_image_s": t_naive,
        "peak_gib": peak / 2 ** 30, "start_gib": base / 2 ** 30, "estimate_gib": plan.memory.estimate / 2 ** 30,
        "one_pass_estimate_gib": one_pass / 2 ** 30,
        "seam_fused": seam_score(fused, rows, cols) if rows or cols else float("nan"),
        "seam_naive": seam_score(naive_img, nrows, ncols) if nrows or ncols else float("nan"),
        "hdice_tiled": a_tiled["hematoxylin_dice"], "hdice_single": a_single["hematoxylin_dice"],
        "darker_tiled": a_tiled["darker_fraction"], "darker_single": a_single["darker_fraction"],
        "darker_edge_nuclei": _edge_nuclei_darker(fused, st.inst, rows, cols),
        "crop": c, "device": device,
    }


_PASS = """
import sys, time, torch
sys.path.insert(0, {root!r})
from engine import pipeline
from engine.demo import default_checkpoints
from engine.diffusion import guided_eps
from engine.memory import reuse_freed_memory
if {tuned}:
    reuse_freed_memory()
m = pipeline.load_model(default_checkpoints()[1], device="cpu").model
x, c, t = torch.randn(8, 3, 128, 128), torch.randn(8, 3, 128, 128), torch.full((8,), 500)
guided_eps(m, x, t, c, 2.0)
t0 = time.perf_counter()
for _ in range(4):
    guided_eps(m, x, t, c, 2.0)
print((time.perf_counter() - t0) / 32)
"""


def allocator_ab() -> tuple[float, float]:
    """Seconds per guided 128 px window (batches of 8) with glibc's defaults and with reuse_freed_memory()."""
    out = []
    for tuned in (False, True):
        r = subprocess.run([sys.executable, "-c", _PASS.format(root=str(ROOT), tuned=tuned)], capture_output=True,
                           text=True)
        out.append(float(r.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,1000,2000")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of both models (the studio's default: 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crop", type=int, default=256, help="single-window crop for the alignment baseline")
    ap.add_argument("--naive-max", type=int, default=1000,
                    help="naive-stitching baseline for canvases up to this size only (it doubles the image time)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print("ROW " + json.dumps(one(args.one, args.steps, args.seed, args.device, args.crop,
                                      naive=args.one <= args.naive_max)))
        return 0
    if args.device == "cpu":
        plain, tuned = allocator_ab()
        print(f"\nGuided 128 px window pass, demo image model: {plain:.3f} s/window with glibc's defaults, "
              f"{tuned:.3f} s with engine.memory.reuse_freed_memory() ({plain / tuned:.2f}x)")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(size), "--steps", str(args.steps), "--seed",
                            str(args.seed), "--device", args.device, "--crop", str(args.crop), "--naive-max",
                            str(args.naive_max)],
                           capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            print(f"size {size}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[4:]))
        print(f"done {size}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n## Large fields, demo models, DDIM {args.steps} steps, w = 2, {args.device}\n")
    print("| canvas | windows (batch) | nuclei | structure s | image s | naive image s | peak RSS GiB "
          "(estimate) | one-pass estimate GiB | seam fused | seam naive | H-Dice tiled / one window | "
          "darker tiled / one window / edge nuclei |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} px | {r['windows']} ({r['window_batch']}) | {r['nuclei']} | {r['structure_s']:.0f} | "
              f"{r['image_s']:.0f} | {r['naive_image_s']:.0f} | {r['peak_gib']:.2f} ({r['estimate_gib']:.2f}) | "
              f"{r['one_pass_estimate_gib']:.1f} | {r['seam_fused']:.3f} | {r['seam_naive']:.3f} | "
              f"{r['hdice_tiled']:.3f} / {r['hdice_single']:.3f} | {r['darker_tiled']:.3f} / "
              f"{r['darker_single']:.3f} / {r['darker_edge_nuclei']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
