"""Downstream benchmark on MoNuSeg (the paper's Table 1, with the built-in lightweight segmenter).

Real data: /work/shared/data/monuseg/train (13 of the 30 MoNuSeg training images). Three images are held
out as the test set (TCGA-AR-A1AS-01Z-00-DX1, TCGA-B0-5711-01Z-00-DX1, TCGA-G9-6362-01Z-00-DX1); the other
ten are the real training set, cut into 256 px tiles with stride 128 for the paper's subset selection.

    .venv/bin/python bench/evaluate_monuseg.py --synthetic 'runs/synth_{pct}' --out runs/evaluate_monuseg

``--synthetic`` takes one folder for all fractions, a template with {pct}, or PCT=DIR (repeatable); omit
it to run the labeled arms only. Finished runs in --out are reused, so an interrupted run can be resumed
with the same command. Models trained on MoNuSeg inherit its CC BY-NC-SA 4.0 licence.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/monuseg/train")
TEST_STEMS = ("TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1")
LICENCE = ("MoNuSeg data: CC BY-NC-SA 4.0 (Kumar et al., IEEE TMI 2017 / 2019). The segmenters in this folder "
           "were trained on it and inherit these terms (non-commercial, share-alike, attribution).\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="MoNuSeg folder (images/ + labels/)")
    ap.add_argument("--synthetic", action="append", default=None,
                    help="synthetic folder, template with {pct}, or PCT=DIR (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "evaluate_monuseg")
    ap.add_argument("--fractions", default="10,20,50,100")
    ap.add_argument("--steps", type=int, default=4000, help="segmenter training steps per run")
    ap.add_argument("--size", type=int, default=256, help="training crop size in px")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--channels", type=int, default=32, help="segmenter base channels")
    ap.add_argument("--depth", type=int, default=4, help="segmenter downsamplings")
    ap.add_argument("--synthetic-share", type=float, default=None,
                    help="share of augmented-arm crops drawn from synthetic pairs (default: pooled, as the paper)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument("--no-resume", action="store_true")
    return ap


def split(items, test_stems=TEST_STEMS):
    """(train, test) LabeledImages; SystemExit naming any held-out image that is missing."""
    by_stem = {it.stem: it for it in items}
    missing = [s for s in test_stems if s not in by_stem]
    if missing:
        raise SystemExit(f"held-out images not found in the data folder: {', '.join(missing)}")
    return ([it for it in items if it.stem not in test_stems], [by_stem[s] for s in test_stems])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.data / "images").is_dir():
        print(f"skipped: MoNuSeg data not found at {args.data}")
        return 0
    import torch

    from engine.fileio import atomic_write_bytes
    from engine.cli import _synthetic_spec
    from engine.data import load_folder
    from engine.errors import NuDiffError
    from engine.evaluate import ExperimentConfig, run_experiment
    from engine.segment import SegmenterConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        train, test = split(load_folder(args.data)[0])
        print(f"train: {len(train)} images; test (held out): {', '.join(t.stem for t in test)}")
        cfg = SegmenterConfig(base_channels=args.channels, depth=args.depth, groups=8)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out / "LICENCE-DATA.txt", LICENCE.encode())
        config = ExperimentConfig(fractions=args.fractions, repeats=args.repeats, seed=args.seed, steps=args.steps,
                                  size=args.size, batch_size=args.batch_size, lr=args.lr, tile_size=256, stride=128,
                                  device=args.device, segmenter=cfg, synthetic_share=args.synthetic_share,
                                  resume=not args.no_resume)
        result = run_experiment(train, _synthetic_spec(args.synthetic), test, args.out, config)
    except NuDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.files["md"].read_text())
    print(f"done in {time.time() - t0:.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
