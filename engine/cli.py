"""Command line: `python -m engine COMMAND --help`. Mirrors the studio's actions.

Commands: inspect, subset, train-structure, train-image, sample-structures, synthesize, generate, export-model,
calibrate-w (an image model's guidance scale against real images), evaluate (downstream segmentation
benchmark), quality (synthetic-set quality report).
Errors meant for the user (bad paths, wrong checkpoints, bad data) are printed without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import PAPER_W
from engine.errors import NuDiffError

if TYPE_CHECKING:
    import numpy as np

    from engine.config import TrainConfig

def _add_train_args(p: argparse.ArgumentParser, kind: str) -> None:
    # ranges are checked while parsing: a bad value is refused (usage line + message, exit 2) before any
    # work is done or any file is written
    def number(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        return v

    def unit_interval(text: str) -> float:  # [0, 1): EMA decay, condition drop rate
        v = number(text)
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
        return v

    def non_negative(text: str) -> float:
        v = number(text)
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return v

    def fraction(text: str) -> float:  # (0, 1], or a percentage written with '%' (10%)
        t = text.strip()
        v = number(t[:-1]) / 100 if t.endswith("%") else number(t)
        if not 0 < v <= 1:
            raise argparse.ArgumentTypeError(f"must be a fraction of nuclei in (0, 1] such as 0.1 (or a "
                                             f"percentage written 10%), got {text}")
        return v

    p.add_argument("--data", required=True, help="folder of labeled tiles (images/ + labels/ or masks/)")
    p.add_argument("--run-dir", required=True, help="run folder; running again on it resumes training")
    p.add_argument("--preset", default=None, choices=["test", "cpu", "paper"],
                   help="model size (default cpu, or that of the --init-from model)")
    p.add_argument("--image-size", type=_int_at_least(8), default=None,
                   help="training tile size in px (default: the preset's, or that of the --init-from model)")
    p.add_argument("--tile-stride", type=_int_at_least(1), default=None,
                   help="stride between training tiles (default size/2)")
    p.add_argument("--fraction", type=fraction, default=1.0,
                   help="use the paper's subset with this fraction of nuclei (0.1, 0.2, 0.5, 1; or 10%%)")
    p.add_argument("--steps", type=_int_at_least(0 if kind == "image" else 1), default=2000,
                   help="training steps" + (" of stage 1 (fully conditional; 0 = fine-tune only)"
                                            if kind == "image" else ""))
    if kind == "image":
        p.add_argument("--finetune-steps", type=_int_at_least(0), default=500,
                       help="stage-2 classifier-free fine-tuning steps (drop rate --drop-rate)")
        p.add_argument("--finetune-lr", type=_positive_float, default=2e-5,
                       help="stage-2 learning rate (paper 2e-5)")
        p.add_argument("--drop-rate", type=unit_interval, default=0.2,
                       help="stage-2 condition drop rate, in [0, 1) (paper 0.2)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="batch size per process")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate (paper 1e-4)")
    p.add_argument("--ema-decay", type=unit_interval, default=0.999,
                   help="EMA decay of the sampling weights, in [0, 1)")
    p.add_argument("--grad-clip", type=non_negative, default=1.0, help="gradient norm clip (0 = off)")
    p.add_argument("--save-every", type=_int_at_least(1), default=500, help="checkpoint every N steps")
    p.add_argument("--preview-every", type=_int_at_least(0), default=500,
                   help="preview samples every N steps (0 = off)")
    p.add_argument("--log-every", type=_int_at_least(1), default=10, help="loss log line every N steps")
    p.add_argument("--keep-last", type=_int_at_least(0), default=2, help="step snapshots to keep besides latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto = bf16 autocast on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--init-from", default=None,
                   help="fine-tune: start from this checkpoint's weights (fresh optimizer; its licence is kept)")
    p.add_argument("--warmup-steps", type=_int_at_least(0), default=None,
                   help="raise the learning rate linearly over the first N steps (default: 100 with "
                        "--init-from, where a fresh optimizer's first full-size steps would upset the "
                        "trained weights; else 0)")
    p.add_argument("--min-snr-gamma", type=_non_negative_float, default=0.0,
                   help="Min-SNR-gamma loss weighting, min(SNR, gamma)/SNR per sample (e.g. 5); 0 = plain MSE")
    p.add_argument("--sample-size", type=_int_at_least(8), default=None,
                   help="default tile size for sampling recorded in the exported model (default: image size)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (saved and exported; run again to resume)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though the data or a training setting (learning rate, batch size, seed, "
                        "fraction, ...) differs from the run's; the change is logged. Without it such a "
                        "resume is refused (raising --steps to extend a run needs no flag)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sampling_args(p: argparse.ArgumentParser, steps_default: int | None = None) -> None:
    from engine.precision import PRECISIONS
    from engine.samplers import SAMPLERS  # (the registry: names, descriptions and default steps)

    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                   help="sampler: " + ", ".join(f"{s.name} ({s.description})" for s in SAMPLERS.values()))
    p.add_argument("--steps", type=_int_at_least(1), default=steps_default,
                   help="denoising steps (default: " + ", ".join(f"{s.steps} for {s.name}" for s in SAMPLERS.values())
                        + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast where it is fast (a GPU, a CPU with native bf16; about 2x on such a "
                        "CPU), else fp32; fp32: always fp32 (default: %(default)s)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _non_negative_float(text: str) -> float:
    v = _number(text)
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _number(text)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _add_canvas_args(p: argparse.ArgumentParser) -> None:
    """Tiled sampling of canvases larger than the model's tile, and the memory budget (engine.tiling)."""
    g = p.add_argument_group("large canvases and memory")
    g.add_argument("--tile", type=_int_at_least(8), default=None,
                   help="window side in px for canvases larger than it (default: the model's sampling size)")
    g.add_argument("--overlap", type=_int_at_least(0), default=None,
                   help="px shared by neighbouring windows (default: a quarter of the tile; 0 = naive stitching)")
    g.add_argument("--window-batch", type=_int_at_least(1), default=8,
                   help="windows per forward pass at most (lowered to fit the memory budget)")
    g.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="memory budget of the job in GiB, checked before any work (default: 40%% of this "
                        "machine's RAM, or NUDIFF_MAX_MEMORY_GB)")


def _tiling(args: argparse.Namespace):
    from engine.tiling import TilingOptions

    return TilingOptions(tile=args.tile, overlap=args.overlap, max_window_batch=args.window_batch,
                         max_memory_gb=args.max_memory_gb)


W_HELP = ("classifier-free guidance scale; default: the image model's calibrated w (calibrate-w: nuclei "
          "stand out as much as in real images) when it has one, else the paper's 2. 'paper' = 2; "
          "'recommended' = the calibrated w, an error when the model has none")


def _w_arg(text: str) -> float | str:
    """--w: a number in [0, 50], 'paper' (2) or 'recommended'."""
    if text.strip().lower() == "recommended":
        return "recommended"
    if text.strip().lower() == "paper":
        return PAPER_W
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'recommended', got {text!r}") from None
    if not 0 <= w <= 50:
        raise argparse.ArgumentTypeError(f"w must be between 0 and 50, got {text}")
    return w


def _grid_arg(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _model_w(args: argparse.Namespace, model) -> float:
    """args.w resolved for this image model: none given -> its calibrated w, else the paper's 2;
    'recommended' -> its calibrated w (said on stderr)."""
    from engine.guidance import resolve_w

    if args.w is None:
        if model.recommended_w is None:
            return PAPER_W
        print(f"w = {model.recommended_w:g}, the calibrated w of {model.path.name} (--w paper for the paper's "
              f"{PAPER_W:g})", file=sys.stderr)
        return float(model.recommended_w)
    w = resolve_w(args.w, model.recommended_w, model.path.name)
    if args.w == "recommended":
        print(f"w = {w:g} (calibrated for {model.path.name})", file=sys.stderr)
    return w


def _add_colour_prior_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--colour-prior", default=None, metavar="SOURCE",
                   help="give each image, while the model cannot see it, the mean colour of a training tile drawn "
                        "by its seed: 'model' (the colours stored with the image model by export-model "
                        "--reference) or a folder of real images (DIR or DIR/images); default: the model's own "
                        "guess (engine.colour_prior)")


def _add_curation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oversample", type=float, default=1.0,
                   help="layout realism filter: sample this many times more structures and keep those whose "
                        "layouts best follow the real ones (1 = off; 2-4 typical)")
    p.add_argument("--filter-mode", default="sample", choices=["sample", "top"],
                   help="how the realism filter keeps layouts: 'sample' (rejection sampling, keeps a training set "
                        "diverse) or 'top' (the most realistic ones, deterministic; the studio's choice)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="real labeled images for the filter (default: the reference stored in the structure model)")
    p.add_argument("--merge-fragments", type=float, default=0.0, metavar="FRAC",
                   help="merge label pieces under FRAC x the median nucleus area that touch another nucleus into it "
                        "(watershed fragments of sampled structures; 0 = off, the paper's watershed; 0.2 removes most)")
    p.add_argument("--smooth-outlines", type=_non_negative_float, default=0.0, metavar="SIGMA",
                   help="round each nucleus's outline after the watershed (Gaussian sigma in px; 0 = off, the "
                        "paper's maps; 3 gives the demo model's nuclei the solidity of real ones); images are then "
                        "conditioned on the structure rebuilt from the smoothed map, so they stay aligned with it")


def _folder_colours(folder: str, size: int) -> "np.ndarray":
    """Mean colours of the size px tiles of the images in folder (or folder/images): engine.colour_prior;
    with each tile's foreground fraction when the folder is a labeled one (images/ and labels/), so that a
    layout is given the colour of tiles with as many nuclei. One image (and label) in memory at a time."""
    from engine.colour_prior import tile_mean_colours
    from engine.data import IMAGE_EXTENSIONS, find_pairs, raster_size, read_image, read_label
    from engine.errors import DataError

    root = Path(folder)
    if not root.is_dir():
        raise NuDiffError(f"colour prior: folder not found: {folder}")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        try:
            pairs = [(image, labels[0]) for _, image, labels in find_pairs(root)[0]]
        except DataError:
            pairs = []  # no label pairs after all: colours alone
        if pairs:
            return tile_mean_colours((read_image(image) for image, _ in pairs), size,
                                     labels=(read_label(label, raster_size(image)) for image, label in pairs))
    if (root / "images").is_dir():
        root = root / "images"
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
    if not files:
        raise NuDiffError(f"colour prior: no images in {root}")
    return tile_mean_colours((read_image(f) for f in files), size)  # one image in memory at a time


def _colour_prior(source: str | None, model) -> "np.ndarray | None":
    """--colour-prior: None (off), 'model' (the image model's stored colours) or a folder of real images."""
    if not source:
        return None
    if source == "model":
        return model.stored_colours()
    return _folder_colours(source, model.image_size)


def _reference(args: argparse.Namespace, model) -> "np.ndarray | None":
    """Layout reference from --reference DIR at the sampling size, or None (use the model's)."""
    if not getattr(args, "reference", None):
        return None
    from engine.curate import reference_from_folder

    return reference_from_folder(args.reference, args.size or model.image_size)


def build_parser() -> argparse.ArgumentParser:
    from engine.guidance import DEFAULT_GRID, DEFAULT_TILES

    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="summarise a folder of labeled tiles and report problems")
    p.add_argument("folder")
    p.add_argument("--tile-size", type=_int_at_least(1), default=256)
    p.add_argument("--stride", type=_int_at_least(1), default=128)

    p = sub.add_parser("subset", help="write the paper's labeled subset (a fraction of nuclei) as a tile folder")
    p.add_argument("data", help="folder of labeled images (images/ + labels/)")
    p.add_argument("--fraction", required=True, help="fraction of nuclei: 10 (percent) or 0.1")
    p.add_argument("--out", required=True, help="new output folder: images/ + labels/ + manifest.csv")
    p.add_argument("--tile-size", type=_int_at_least(1), default=256, help="tile size (paper 256)")
    p.add_argument("--stride", type=_int_at_least(1), default=128, help="tile stride (paper 128)")
    p.add_argument("--seed", type=int, default=0, help="KMeans seed (the evaluate command's --seed)")

    p = sub.add_parser("train-structure", help="train (or resume) the unconditional nuclei-structure model")
    _add_train_args(p, "structure")
    p = sub.add_parser("train-image", help="train (or resume) the structure-conditioned image model, 2 stages")
    _add_train_args(p, "image")

    p = sub.add_parser("sample-structures", help="sample nuclei structures and their instance maps")
    p.add_argument("--checkpoint", default=None, help="structure checkpoint (default: the embedded demo)")
    p.add_argument("--n", type=_int_at_least(1), default=4, help="number of structures")
    p.add_argument("--size", type=_int_at_least(8), default=None,
                   help="side in px (default: the model's); larger than the model's tile: sampled as fused "
                        "overlapping windows, then one watershed over the whole map")
    p.add_argument("--out", required=True, help="output folder: labels/*.tif, structures/*.npy, previews/*.png")
    _add_sampling_args(p)
    _add_curation_args(p)
    _add_canvas_args(p)

    p = sub.add_parser("synthesize", help="synthesize images for given label maps with guidance scale w")
    p.add_argument("--checkpoint", default=None, help="image checkpoint (default: the embedded demo)")
    p.add_argument("--labels", nargs="+", required=True, help="instance-map files (png/tif/npy/mat) or folders")
    p.add_argument("--w", type=_w_arg, default=None, help=W_HELP)
    p.add_argument("--variants", type=_int_at_least(1), default=1, help="images per label map")
    p.add_argument("--out", required=True, help="output folder: images/ + labels/ + manifest.csv")
    _add_colour_prior_arg(p)
    _add_sampling_args(p)
    _add_canvas_args(p)

    p = sub.add_parser("generate", help="sample structures, then images: synthetic labeled pairs")
    p.add_argument("--structure-checkpoint", default=None, help="default: the embedded demo")
    p.add_argument("--image-checkpoint", default=None, help="default: the embedded demo")
    p.add_argument("--n", type=_int_at_least(1), default=8, help="number of pairs")
    p.add_argument("--w", type=_w_arg, default=None, help=W_HELP)
    p.add_argument("--size", type=_int_at_least(8), default=None,
                   help="side in px (default: the image model's); larger than the tile: fused overlapping windows")
    p.add_argument("--out", required=True, help="output folder (images/ + labels/ + manifest.csv), or a .zip")
    _add_colour_prior_arg(p)
    _add_sampling_args(p)
    _add_curation_args(p)
    _add_canvas_args(p)

    p = sub.add_parser("export-model", help="write the EMA weights of a training run as a small checkpoint")
    p.add_argument("src", help="training checkpoint (e.g. RUN/latest.json), or an inference one to re-export")
    p.add_argument("dst", help="output stem, e.g. checkpoints/structure")
    p.add_argument("--fp32", action="store_true", help="keep fp32 (default fp16 storage)")
    p.add_argument("--sample-size", type=int, default=None, help="default sampling tile size to record")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="extra record field, e.g. --meta license='CC BY-NC-SA 4.0' (repeatable)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="real labeled images (the training data). Structure model: store their layout reference "
                        "for the realism filter (generate --oversample). Image model: store their tiles' mean "
                        "colours (synthesize --colour-prior model) and calibrate its guidance w against them (as "
                        "calibrate-w with its defaults)")
    p.add_argument("--keep-w", action="store_true",
                   help="image model with --reference: keep the calibrated w the source's record holds (re-exporting "
                        "a calibrated model to add its colours) instead of calibrating again")

    p = sub.add_parser("calibrate-w", help="measure the guidance scale w at which an image model's nuclei stand out "
                                           "as much as real ones, and store it in the model's record")
    p.add_argument("--checkpoint", default=None, help="image checkpoint (default: the embedded demo)")
    p.add_argument("--real", required=True, metavar="DIR",
                   help="real labeled images (images/ + labels/), e.g. the model's training data")
    p.add_argument("--grid", type=_grid_arg, default=list(DEFAULT_GRID), metavar="W,W,...",
                   help="guidance scales to synthesize at; the answer is interpolated between them")
    p.add_argument("--n", type=_int_at_least(1), default=DEFAULT_TILES,
                   help="real tiles (with nuclei) whose layouts are synthesized")
    p.add_argument("--size", type=int, default=None, help="tile size (default: the model's sampling size)")
    p.add_argument("--no-save", action="store_true", help="print the result only; leave the checkpoint as it is")
    _add_sampling_args(p)
    _add_benchmark_commands(sub)
    return ap


def _add_benchmark_commands(sub) -> None:
    """`evaluate` and `quality` subcommands (engine.evaluate, engine.quality)."""
    p = sub.add_parser("evaluate", help="train/test segmenters on labeled subsets with and without synthetic pairs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", default=None, help="folder of real labeled training images (required unless --collect)")
    p.add_argument("--synthetic", action="append", default=None,
                   help="synthetic folder for all fractions, a template such as synth_{pct}, or PCT=DIR "
                        "(repeatable); omit for the labeled arms only")
    p.add_argument("--test", default=None,
                   help="folder of held-out real labeled images, tested at full size (required unless --collect)")
    p.add_argument("--fractions", default="10,20,50,100", help="labeled fractions of nuclei, in percent")
    p.add_argument("--out", required=True, help="output folder: results.csv/.md/.png/.json, runs/")
    p.add_argument("--steps", type=_int_at_least(1), default=2000, help="segmenter training steps per run")
    p.add_argument("--size", type=int, default=128, help="training crop size in px")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=1, help="trainings per fraction and arm (seeds seed+r)")
    p.add_argument("--only-repeat", type=_int_at_least(0), default=None, metavar="R",
                   help="run only repeat R (0-based) of --repeats, e.g. to split an arm's repeats over processes "
                        "into one --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=_int_at_least(1), default=256, help="tile size for subset selection (paper 256)")
    p.add_argument("--stride", type=_int_at_least(1), default=128, help="tile stride for subset selection (paper 128)")
    p.add_argument("--channels", type=int, default=16, help="segmenter base channels")
    p.add_argument("--depth", type=int, default=3, help="segmenter downsamplings")
    p.add_argument("--arms", default="labeled,augmented",
                   help="arms to run; split arms over processes into one --out, then --collect")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: build the table from the finished runs in --out")
    p.add_argument("--synthetic-share", type=float, default=None,
                   help="share of augmented-arm training crops drawn from synthetic pairs (default: pooled)")
    p.add_argument("--pairs-per-repeat", type=int, default=None, metavar="N",
                   help="augmented arm: repeat r trains on the r-th block of N synthetic pairs, so the spread "
                        "over repeats includes the draw of the pairs (needs repeats x N pairs; default: all "
                        "pairs every repeat)")
    p.add_argument("--augment", choices=("light", "strong"), default="light",
                   help="segmenter training augmentation, both arms: light = flips, quarter turns, colour jitter; "
                        "strong = also HoVer-Net's hue, saturation, brightness, contrast, blur and noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")
    p.add_argument("--no-resume", action="store_true", help="retrain runs already finished in --out")

    p = sub.add_parser("quality", help="alignment and morphology report of a synthetic labeled set")
    p.add_argument("--synthetic", required=True, help="folder of synthetic pairs (images/ + labels/)")
    p.add_argument("--real", default=None, help="folder of real labeled images to compare with")
    p.add_argument("--segmenter", default=None, help="segmenter trained on real data (.json/.safetensors)")
    p.add_argument("--max-real-tiles", type=int, default=500)
    p.add_argument("--two-sample", action="store_true",
                   help="also run the classifier two-sample test against --real (a small CNN trained to tell real "
                        "from synthetic tiles; held-out accuracy 0.5 = indistinguishable; ~1 min per 100 tiles)")
    p.add_argument("--training", default=None,
                   help="the generator's training images (labeled folder): flag synthetic tiles that are "
                        "near-copies of a training tile")
    p.add_argument("--json", default=None, help="also write the full report as JSON here")
    p.add_argument("--device", default="auto")


def _synthetic_spec(values: list[str] | None):
    """--synthetic values -> a folder, a template or a {pct: folder} mapping (engine.evaluate)."""
    if not values:
        return None
    if all("=" in v for v in values):
        return dict(v.split("=", 1) for v in values)
    if len(values) > 1:
        raise NuDiffError("give one --synthetic folder or template, or several PCT=DIR")
    return values[0]


def _run_benchmark_command(args: argparse.Namespace) -> int:
    if args.command == "evaluate":
        import torch

        from engine.evaluate import ExperimentConfig, run_experiment
        from engine.segment import SegmenterConfig

        if args.collect:
            from engine.evaluate import collect_results

            print(collect_results(args.out).files["md"].read_text())
            return 0
        if not args.real or not args.test:
            raise NuDiffError("evaluate needs --real and --test (or --collect to tabulate finished runs)")
        if args.threads:
            torch.set_num_threads(args.threads)
        config = ExperimentConfig(fractions=args.fractions, repeats=args.repeats, only_repeat=args.only_repeat,
                                  seed=args.seed, steps=args.steps,
                                  size=args.size, batch_size=args.batch_size, lr=args.lr, tile_size=args.tile_size,
                                  stride=args.stride, device=args.device, synthetic_share=args.synthetic_share,
                                  pairs_per_repeat=args.pairs_per_repeat, augment=args.augment,
                                  segmenter=SegmenterConfig(base_channels=args.channels, depth=args.depth),
                                  arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                                  resume=not args.no_resume)
        result = run_experiment(args.real, _synthetic_spec(args.synthetic), args.test, args.out, config)
        print(result.files["md"].read_text())
        return 0
    import json

    from engine.quality import format_quality_markdown, quality_report
    from engine.segment import Segmenter

    seg = Segmenter.load(args.segmenter, args.device) if args.segmenter else None
    if args.two_sample and not args.real:
        raise NuDiffError("--two-sample needs --real (the real tiles to tell the synthetic ones from)")
    report = quality_report(args.synthetic, args.real, seg, max_real_tiles=args.max_real_tiles,
                            realism=args.two_sample, training=args.training)
    print(format_quality_markdown(report))
    if args.json:
        from engine.fileio import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(report, indent=2, default=float).encode())
    return 0


DEFAULT_WARMUP = 100  # learning-rate warm-up steps when fine-tuning (--init-from)


def _model_shape(args: argparse.Namespace, kind: str) -> tuple[str, int | None]:
    """(preset, image size) of a training run: as given, else those of the --init-from model, else cpu's."""
    if not args.init_from or (args.preset and args.image_size):
        return args.preset or "cpu", args.image_size
    from engine.checkpoint import read_record
    from engine.config import UNetConfig, preset_of

    config = UNetConfig.from_dict(read_record(args.init_from, kind=kind)[1]["model"])  # weights read later
    name = preset_of(config)
    if name is None and not args.preset:
        raise NuDiffError(f"{args.init_from} is not one of the presets; give --preset and --image-size")
    return args.preset or name, args.image_size or config.image_size


def train_config(args: argparse.Namespace, kind: str) -> TrainConfig:
    """The TrainConfig a parsed ``train-structure`` / ``train-image`` command line asks for (preset "cpu" and
    the preset's image size when not given; a fine-tuned run's shape is read from --init-from later)."""
    from engine.config import TrainConfig

    warmup = args.warmup_steps if args.warmup_steps is not None else (DEFAULT_WARMUP if args.init_from else 0)
    return TrainConfig(
        kind=kind, preset=args.preset or "cpu", image_size=args.image_size, data=str(args.data),
        warmup_steps=warmup, tile_stride=args.tile_stride, fraction=args.fraction, steps=args.steps,
        finetune_steps=getattr(args, "finetune_steps", 0), batch_size=args.batch_size, lr=args.lr,
        finetune_lr=getattr(args, "finetune_lr", 2e-5), finetune_drop_rate=getattr(args, "drop_rate", 0.2),
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, save_every=args.save_every,
        preview_every=args.preview_every, log_every=args.log_every, keep_last=args.keep_last, seed=args.seed,
        mixed_precision=args.mixed_precision, init_from=args.init_from, min_snr_gamma=args.min_snr_gamma,
        extra={"sample_size": args.sample_size} if args.sample_size else {})


def _train(args: argparse.Namespace, kind: str) -> int:
    import signal
    import threading

    import torch

    from engine.runlock import RunFolderBusy, busy_message, lock_holder
    from engine.train import Trainer

    if kind == "image" and args.steps + args.finetune_steps < 1:  # refused before anything is written
        raise NuDiffError("--steps and --finetune-steps are both 0: nothing to train")
    if args.threads:
        torch.set_num_threads(args.threads)

    def terminated(signum, frame):  # SIGTERM before training starts: exit, releasing the run folder
        raise SystemExit(128 + signum)  # (while training, the trainer saves and stops instead)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        cfg = train_config(args, kind)
        existed = Path(args.run_dir).is_dir()  # made by a watching studio, or a run to resume
        try:
            if args.time_limit is not None and not args.time_limit > 0:
                raise NuDiffError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
            preset, size = _model_shape(args, kind)
            cfg = dataclasses.replace(cfg, preset=preset, image_size=size)
            owner = lock_holder(args.run_dir)  # refused at once, before reading the data
            if owner:
                raise RunFolderBusy(busy_message(args.run_dir, owner))
            data = _training_set(cfg)
            trainer = Trainer(cfg, args.run_dir, data=data, show_progress=not args.quiet,
                              allow_changes=args.allow_changes,
                              time_limit=None if args.time_limit is None else args.time_limit * 60.0)
        except RunFolderBusy:  # the folder is another process's: touch nothing there
            raise
        except NuDiffError as e:  # refused before training: no run folder is made for it, and one that
            if existed:           # exists (a watching studio's, a run to resume) is told why in its status
                _failed_status(args.run_dir, kind, cfg, e)
            raise
        out = trainer.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"model: {out}")
    return 0


class RefusedBeforeRun(NuDiffError):
    """A training run refused before its run folder is touched: a tile size the preset cannot take, or data
    whose label maps hold no nucleus at all. (A run folder that exists, e.g. made by a watching studio or a
    run to resume, is told why in its status.json.)"""


MAX_PROBLEM_LINES = 20  # problems of the training data printed before "... and N more"


def _failed_status(run_dir: str, kind: str, cfg, error: BaseException) -> None:
    from engine.run_status import read_status, write_status

    step = read_status(run_dir).get("step", 0)  # (a refused resume keeps the step reached)
    write_status(run_dir, {"state": "failed", "kind": kind, "step": step, "total": cfg.total_steps,
                           "message": str(error)})


def _print_problems(problems, data: str) -> None:
    """The data's problems on stderr, one line each (skipped files and caveats; `inspect` lists them all)."""
    import os

    if not problems or os.environ.get("RANK", "0") != "0":  # once under accelerate launch / torchrun
        return
    for p in problems[:MAX_PROBLEM_LINES]:
        print(" ".join(str(p).split()), file=sys.stderr)
    if len(problems) > MAX_PROBLEM_LINES:
        print(f"... and {len(problems) - MAX_PROBLEM_LINES} more problems (python -m engine inspect {data} "
              "lists them all)", file=sys.stderr)


def _training_set(cfg):
    """The run's training tiles (engine.train.TrainingSet.from_folder's), read here so that the data's
    problems are printed, and a folder whose label maps hold no nucleus at all is refused
    (RefusedBeforeRun) before the run folder is touched."""
    from engine.config import preset
    from engine.data import load_tiles
    from engine.subset import select_subset
    from engine.train import TrainingSet

    if not cfg.data:
        raise NuDiffError("no training data folder given")
    try:
        size = preset(cfg.preset, cfg.kind, cfg.image_size).image_size
    except ValueError as e:  # e.g. "image_size 33 must be divisible by 2"
        raise RefusedBeforeRun(f"--image-size {cfg.image_size} does not suit preset {cfg.preset!r}: {e}") \
            from None
    tiles, problems = load_tiles(cfg.data, size=size, stride=cfg.tile_stride or size // 2)
    if not any(t.inst.any() for t in tiles):
        # the files skipped may be why; the "no nuclei" warnings of the others would only repeat the refusal
        _print_problems([p for p in problems if p.severity == "error"], cfg.data)
        n = len({t.stem for t in tiles})
        raise RefusedBeforeRun(f"no nuclei to train on in {cfg.data}: every label map is background only "
                               f"(0 everywhere; {n} usable image{'s' if n != 1 else ''}); labels must be "
                               "instance maps (0 = background, one id per nucleus)")
    _print_problems(problems, cfg.data)
    if cfg.fraction < 1.0:
        keep = select_subset(tiles, cfg.fraction, seed=cfg.seed)
        tiles = [tiles[i] for i in keep]
    return TrainingSet.from_arrays([t.image for t in tiles], [t.inst for t in tiles])


def _subset(args: argparse.Namespace) -> int:
    """The tiles `evaluate` selects for a fraction, as a folder to train the diffusion models on (the
    paper trains the models that augment an X% subset on that subset only)."""
    from engine import export
    from engine.evaluate import labeled_subset

    chosen, sel = labeled_subset(args.data, args.fraction, tile_size=args.tile_size, stride=args.stride,
                                 seed=args.seed)
    pairs = [(t.image, t.inst, {"id": f"{t.stem}_y{t.y}_x{t.x}", "source": t.stem}) for t in chosen]
    path = export.write_folder(pairs, Path(args.out))
    print(f"wrote {len(chosen)} of {len(sel.clusters)} tiles ({sel.fraction_reached:.1%} of nuclei, "
          f"{sel.feature_kind} features) to {path}")
    return 0


def _check_out(out: str) -> None:
    """Refuse an --out that the pairs could not be written to, before any sampling: an existing file that is
    not a .zip, or a folder that is not empty (export.write_folder's rule)."""
    path = Path(out)
    if out.lower().endswith(".zip"):
        if path.is_dir():
            raise NuDiffError(f"--out {path} is a folder, not a .zip file")
        return
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise NuDiffError(f"output folder {path} already exists and is not empty: choose a new --out")


def _save_pairs(pairs, out: str) -> None:
    from engine import export

    if out.lower().endswith(".zip"):
        path = export.write_zip(pairs, Path(out))
    else:
        path = export.write_folder(pairs, Path(out))
    print(f"wrote {len(pairs)} pairs to {path}")


def _checkpoint(path: str | None, kind: str) -> Path:
    if path:
        return Path(path)
    from engine.demo import default_checkpoints

    s, i = default_checkpoints()
    return s if kind == "structure" else i


def _generate(args: argparse.Namespace) -> int:
    """Sample pairs; under `accelerate launch` / torchrun the work is split across the processes (candidate
    i always uses seed + i and the realism filter of --oversample runs once over all candidates, so the
    result equals a single-process run) and the main process writes."""
    from accelerate import PartialState

    from engine import pipeline

    import torch

    _check_out(args.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device) if args.device == "auto" and state.num_processes > 1 else args.device
    smodel = pipeline.load_model(_checkpoint(args.structure_checkpoint, "structure"), kind="structure", device=device,
                                 precision=args.precision)
    imodel = pipeline.load_model(_checkpoint(args.image_checkpoint, "image"), kind="image", device=device,
                                 precision=args.precision)
    size = args.size or imodel.image_size  # size and memory refused before any work
    pipeline.plan_structure_canvas(smodel, size, _tiling(args))
    pipeline.plan_image_canvas(imodel, (size, size), _model_w(args, imodel), _tiling(args))
    all_gather = _all_gather(state) if state.num_processes > 1 else None
    bar, cb = _progress_bar(f"pairs [{state.process_index}]" if state.num_processes > 1 else "pairs")
    settings = pipeline.PairSettings(w=_model_w(args, imodel), sampler=args.sampler, steps=args.steps, seed=args.seed,
                                     batch_size=args.batch_size, size=args.size, oversample=args.oversample,
                                     filter_mode=args.filter_mode, merge_below=args.merge_fragments,
                                     outline_sigma=args.smooth_outlines)
    colours = _colour_prior(args.colour_prior, imodel)
    pairs = pipeline.generate_pairs(smodel, imodel, args.n, settings, reference=_reference(args, imodel),
                                    colour_prior=colours, colour_source=args.colour_prior or "",
                                    shard=(state.process_index, state.num_processes), all_gather=all_gather,
                                    progress=cb, tiling=_tiling(args))
    bar.close()
    if all_gather is not None:
        pairs = [p for part in all_gather(pairs) for p in part]
    if state.is_main_process:
        _save_pairs(pairs, args.out)
    state.wait_for_everyone()
    return 0


def _all_gather(state):
    """object -> every process's object, in process order (torch.distributed.all_gather_object over the
    in-memory arrays of our own processes)."""
    import torch.distributed as dist

    def gather(obj):
        gathered: list = [None] * state.num_processes
        dist.all_gather_object(gathered, obj)
        return gathered
    return gather


def _calibrate(checkpoint, real, *, device: str = "auto", precision: str = "auto", save: bool = True,
               **options) -> None:
    """calibrate-w: measure (options: engine.guidance.calibrate_guidance's, defaults there), print, and store
    in the checkpoint's record unless save is False."""
    from engine import pipeline
    from engine.guidance import calibrate_guidance, store_calibration

    model = pipeline.load_model(checkpoint, kind="image", device=device, precision=precision)
    bar, cb = _progress_bar("calibrating w")
    cal = calibrate_guidance(model, real, progress=cb, **options)
    bar.close()
    print(f"{model.path.name}: {cal.summary()}")
    if save:
        print(f"stored in {store_calibration(checkpoint, cal)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.memory import reuse_freed_memory

    reuse_freed_memory()  # ~1.8x faster sampling and training on the CPU (engine.memory)
    try:
        return _run(args)
    except NuDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an allocation that failed part-way is the user's size, not a bug
        from engine.memory import is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory ({type(e).__name__}); choose a smaller size or batch size, or lower "
              f"--max-memory-gb. Saved checkpoints and finished files are intact.", file=sys.stderr)
        return 2


def _progress_bar(desc: str):
    from tqdm.auto import tqdm

    # callbacks count denoising steps (or permille of a pipeline), not items: show a percentage
    bar = tqdm(total=1, desc=desc, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def cb(i: int, n: int) -> None:
        bar.total = n
        bar.n = i
        bar.refresh()
    return bar, cb


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "inspect":
        from engine.inspection import inspect_folder

        print(inspect_folder(args.folder, size=args.tile_size, stride=args.stride).summary())
        return 0
    if cmd == "subset":
        return _subset(args)
    if cmd in ("train-structure", "train-image"):
        return _train(args, cmd.split("-")[1])
    if cmd in ("evaluate", "quality"):
        return _run_benchmark_command(args)
    if cmd == "export-model":
        from engine.checkpoint import export_inference

        extra: dict = {"sample_size": args.sample_size} if args.sample_size else {}
        for item in args.meta:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise NuDiffError(f"--meta expects KEY=VALUE, got {item!r}")
            extra[key] = value
        from engine.checkpoint import read_record, sample_size
        from engine.curate import reference_from_folder

        record = read_record(args.src)[1] if args.reference else {}
        image = args.reference and record["kind"] == "image"
        reference = colours = None
        if args.reference and not image:  # a structure model's layout reference: real tiles of its sampling size
            reference = reference_from_folder(args.reference, args.sample_size or sample_size(record))
        if image:  # an image model's colour prior: the mean colours of real tiles of its sampling size
            colours = _folder_colours(args.reference, args.sample_size or sample_size(record))
        path = export_inference(args.src, args.dst, half=not args.fp32, extra=extra, reference=reference,
                                colours=colours)
        print(path)
        if image and not args.keep_w:
            _calibrate(path, args.reference)
        return 0
    if cmd == "calibrate-w":
        _calibrate(_checkpoint(args.checkpoint, "image"), args.real, device=args.device, precision=args.precision,
                   save=not args.no_save, grid=args.grid, n=args.n, size=args.size, sampler=args.sampler,
                   steps=args.steps, seed=args.seed, batch_size=args.batch_size)
        return 0

    import numpy as np

    from engine import pipeline
    from engine.conditioning import Provenance, load_condition, save_condition

    if cmd == "sample-structures":
        from PIL import Image
        import tifffile

        from engine import render

        model = pipeline.load_model(_checkpoint(args.checkpoint, "structure"), kind="structure", device=args.device,
                                     precision=args.precision)
        pipeline.plan_structure_canvas(model, args.size, _tiling(args))  # size and memory refused before any work
        steps = pipeline.sampler_steps(args.sampler, args.steps)
        bar, cb = _progress_bar("structures")
        samples = pipeline.sample_structures(model, args.n, sampler=args.sampler, steps=steps, seed=args.seed,
                                             size=args.size, batch_size=args.batch_size, oversample=args.oversample,
                                             reference=_reference(args, model), filter_mode=args.filter_mode,
                                             merge_below=args.merge_fragments, outline_sigma=args.smooth_outlines,
                                             progress=cb, tiling=_tiling(args))
        bar.close()
        out = Path(args.out)
        for sub in ("labels", "previews"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for s in samples:
            stem = f"structure_{s.seed:05d}"
            cond = s.condition(model, structure_sampler=args.sampler, structure_steps=steps)
            tifffile.imwrite(out / "labels" / f"{stem}.tif", s.inst.astype(np.uint16))
            save_condition(cond, out, stem)
            Image.fromarray(render.colorize_instances(s.inst)).save(out / "previews" / f"{stem}.png")
            print(f"{stem}: {s.n_nuclei} nuclei")
        return 0
    if cmd == "synthesize":
        from engine.data import label_files, read_label

        _check_out(args.out)
        model = pipeline.load_model(_checkpoint(args.checkpoint, "image"), kind="image", device=args.device,
                                     precision=args.precision)
        files = label_files(args.labels)
        insts = [read_label(f) for f in files]
        w = _model_w(args, model)
        plans = [pipeline.plan_image_canvas(model, i.shape, w, _tiling(args)) for i in insts]  # refused early
        conds = [load_condition(f, i) for f, i in zip(files, insts)]  # the sampled structure where there is one
        steps = pipeline.sampler_steps(args.sampler, args.steps)
        bar, cb = _progress_bar("images")
        colours = _colour_prior(args.colour_prior, model)
        images = pipeline.synthesize(model, conds, w=w, sampler=args.sampler, steps=steps, seed=args.seed,
                                     variants=args.variants, batch_size=args.batch_size, progress=cb,
                                     tiling=_tiling(args), colour_prior=colours)
        bar.close()
        pairs = []
        for k, img in enumerate(images):
            j, v = divmod(k, args.variants)
            prov = Provenance.of(conds[j], image_checkpoint=model.path.name, image_sha256=model.sha256,
                                 seed=args.seed + k, w=w, sampler=args.sampler, steps=steps, variant=v,
                                 precision=model.precision, colour_prior=args.colour_prior or "",
                                 **plans[j].meta())
            pairs.append(pipeline.Pair(img, conds[j].inst, prov.to_dict()))
        _save_pairs(pairs, args.out)
        return 0
    if cmd == "generate":
        return _generate(args)
    raise AssertionError(cmd)
