"""Is the watershed a lever for sampled layouts? Sample structures once, cut them into instance maps with
other watershed settings, and compare each with real labels' tiles (200 tiles of the train role of the
split; ``--outline-sigmas`` also against the validation role's tiles, where choices are made; the test
images are never read).

    python bench/watershed_sweep.py [--structure CKPT] [--n 16] [--size 256] [--tile 128] [--seed 2000]
    python bench/watershed_sweep.py --outline-sigmas 0,1,1.5,2,2.5,3   # engine.structure.smooth_outlines

Prints, per setting, nuclei per tile, foreground fraction and the morphology distance (engine.quality),
with its solidity term; no pass/fail.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.monuseg import DATA, SPLIT, read_split  # noqa: E402
from engine.data import read_label  # noqa: E402


def tiles(inst: np.ndarray, size: int) -> list[np.ndarray]:
    """The size x size grid (stride size) of a label map."""
    return [inst[y:y + size, x:x + size] for y in range(0, inst.shape[0] - size + 1, size)
            for x in range(0, inst.shape[1] - size + 1, size)]


def layout(insts: list[np.ndarray]) -> tuple[float, float]:
    """(mean nuclei per tile, mean foreground fraction)."""
    return (float(np.mean([len(np.unique(t)) - 1 for t in insts])), float(np.mean([(t > 0).mean() for t in insts])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--structure", default=str(ROOT / "checkpoints" / "structure-demo.json"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--split", type=Path, default=SPLIT)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="layout size sampled")
    ap.add_argument("--tile", type=int, default=128, help="tile size compared")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--outline-sigmas", default=None, metavar="S,S,...",
                    help="sweep the outline smoothing (default watershed) instead of the watershed's settings")
    args = ap.parse_args()
    if not (args.data / "labels").is_dir():
        print(f"skipped: training data not found at {args.data}")
        return 0
    from engine.pipeline import load_model, sample_structures
    from engine.quality import morphology_distance
    from engine.structure import structure_to_instances

    def role_tiles(role: str) -> list[np.ndarray]:
        """The label tiles of one role of the split, with their layout figures printed."""
        out = [t for stem in read_split(args.split)[role]
               for t in tiles(read_label(args.data / "labels" / f"{stem}.png"), args.tile)]
        print("%s labels: %.2f nuclei per tile, foreground %.3f (%d tiles)" % (role, *layout(out), len(out)))
        return out

    real = role_tiles("train")
    rng = np.random.default_rng(0)
    ref = [real[i] for i in rng.choice(len(real), min(200, len(real)), replace=False)]
    model = load_model(args.structure, kind="structure")
    sampled = sample_structures(model, args.n, seed=args.seed, size=args.size, batch_size=args.n)
    if args.outline_sigmas:
        return sweep_outlines(sampled, [float(x) for x in args.outline_sigmas.split(",")], args.tile,
                              {"train": ref, "validation": role_tiles("validation")})
    print("| min_marker | merge | smoothing | nuclei / tile | foreground | morphology distance |")
    print("|---|---|---|---|---|---|")
    for marker, merge, smooth in itertools.product((2, 5, 10), (0.0, 0.2, 0.4), (0.0, 1.0)):
        insts = [t for s in sampled for t in tiles(structure_to_instances(
            s.structure, min_marker=marker, merge_below=merge, smooth=smooth), args.tile)]
        d = morphology_distance(ref, insts)["mean_normalised"]
        print("| %d | %.1f | %.0f | %.2f | %.3f | %.3f |" % (marker, merge, smooth, *layout(insts), d), flush=True)
    return 0


def sweep_outlines(sampled: list, sigmas: list[float], tile: int, refs: dict[str, list[np.ndarray]]) -> int:
    """One row per sigma: layout figures and morphology distance (mean, solidity term) against each ref."""
    from engine.quality import morphology_distance
    from engine.structure import smooth_outlines, structure_to_instances

    maps = [structure_to_instances(s.structure) for s in sampled]
    heads = " | ".join(f"morphology vs {k} (solidity term)" for k in refs)
    print(f"| outline sigma | nuclei / tile | foreground | {heads} |")
    print("|---|---|---|" + "---|" * len(refs))
    for sigma in sigmas:
        insts = [t for m in maps for t in tiles(smooth_outlines(m, sigma), tile)]
        cells = []
        for ref in refs.values():
            d = morphology_distance(ref, insts)
            cells.append("%.3f (%.3f)" % (d["mean_normalised"], d["solidity"]["normalised"]))
        print("| %g | %.2f | %.3f | %s |" % (sigma, *layout(insts), " | ".join(cells)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
