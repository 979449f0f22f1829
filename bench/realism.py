"""Realism of a structure + image model pair against held-out real H&E tiles, measured.

For one pair of checkpoints and one or more guidance scales w, this samples ``--n`` structures of
``--size`` px (default 256), synthesizes an image for each, and reports against the real images of one
role of the split (``--role validation`` for choices, ``--role test`` once, for the figure; ``--role
train``: the model's own training images, i.e. how close it comes to what it learned from, with the
anti-copying check guarding against the trivial way there):

- the classifier two-sample test (engine.two_sample) at 256 px (whole tiles) and 128 px (quadrants),
  with its sanity rows measured in the same run: real vs real (two disjoint halves of the real tiles,
  must be near 0.5) and real vs blurred real (must be near 1.0);
- layout and morphology (nuclei per 128 px tile, foreground fraction, morphology distance) and alignment
  (hematoxylin Dice, darker fraction) from engine.quality.quality_report;
- the anti-copying check (engine.copying) against the tiles of the split's training images.

Synthetic tiles are cached under WORK/NAME (same models, size, seed, steps: no resampling), so a rerun
only rescores. Usage (the demo models today, held-out test images)::

    python bench/realism.py --name demo --w 2 --w 0.75 --role test
    python bench/realism.py --name r21 --structure S.json --image I.json --role validation --w 0.5 --w 1
    python bench/realism.py --name demo --w 2 --oversample 4      # layouts through the realism filter
    python bench/realism.py --name demo --w 0.75 --smooth-outlines 3   # outlines rounded after the watershed
    python bench/realism.py --name demo --w 0.75 --real-layouts   # images on real layouts: the image model alone
    python bench/realism.py --name demo --w 0.75 --real-layouts --colour-prior   # mean colours of train tiles

Prints one markdown table and writes WORK/NAME/realism-ROLE.json (realism-ROLE-kK.json with --oversample,
-oS with --smooth-outlines, -cp with --colour-prior).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.colour_prior import tile_mean_colours  # noqa: E402
from engine.copying import copy_check, training_tiles  # noqa: E402
from engine.data import read_image, read_label  # noqa: E402
from engine.quality import quality_report, real_tiles  # noqa: E402
from engine.two_sample import TwoSampleConfig, blur_tiles, two_sample_test  # noqa: E402


def grid_tiles(images, insts, size):
    """Non-overlapping size x size tiles of each image and instance map, as (images, insts): the tiles of
    engine.quality.real_tiles, none left out."""
    tiles = real_tiles(list(zip(images, insts)), size, sys.maxsize)
    return [im for im, _ in tiles], [lab for _, lab in tiles]


def filter_suffix(args) -> str:
    """File-name suffix of the layouts' setting: "-real-layouts" (--real-layouts), "-kK" (the realism filter:
    n kept of n * K sampled), "-oS" (outlines smoothed with sigma S), "" (sampled as they are)."""
    if args.real_layouts:
        return "-real-layouts"
    return (f"-k{args.oversample:g}" if args.oversample > 1 else "") + (
        f"-o{args.smooth_outlines:g}" if args.smooth_outlines > 0 else "")


def colour_suffix(args) -> str:
    """File-name suffix of the colour prior: "" (off), "-cp" (the split's train images), "-cpm" (the model's)."""
    return {None: "", "train": "-cp", "model": "-cpm"}[args.colour_prior]


def load_role(data: Path, stems):
    images = [read_image(data / "images" / f"{s}.png") for s in stems]
    labels = [read_label(data / "labels" / f"{s}.png") for s in stems]
    return images, labels


def synthetic_set(args, w: float, cache: Path, real_labels=None, colours=None):
    """(images, insts) of n synthetic tiles at w, cached. real_labels: with --real-layouts, the real tiles'
    instance maps to draw the n layouts from (seeded), instead of sampling them. colours: the
    --colour-prior's (K, 3|4) training tile colours (engine.colour_prior), or None."""
    import torch

    from engine.pipeline import load_model, sample_structures, synthesize

    torch.set_num_threads(args.threads)
    k = filter_suffix(args)
    f_struct = cache / f"structures-{args.size}-n{args.n}-s{args.seed}-{args.steps}{k}.npz"
    if args.real_layouts:
        pick = np.random.default_rng(args.seed).choice(len(real_labels), size=min(args.n, len(real_labels)),
                                                       replace=False)
        structures = insts = [real_labels[i] for i in sorted(pick)]  # synthesize rebuilds their structures
    elif f_struct.exists():
        z = np.load(f_struct)
        structures, insts = list(z["structures"]), list(z["insts"])
    else:
        sm = load_model(args.structure, kind="structure")
        t = time.time()
        samples = sample_structures(sm, args.n, steps=args.steps, seed=args.seed, size=args.size,
                                    oversample=args.oversample, outline_sigma=args.smooth_outlines)
        print(f"  structures: {args.n} x {args.size} px in {time.time() - t:.0f} s", file=sys.stderr)
        structures = [s.structure for s in samples]
        insts = [s.inst for s in samples]
        np.savez_compressed(f_struct, structures=np.stack(structures), insts=np.stack(insts))
    if args.smooth_outlines > 0:  # conditioned on the structure rebuilt from the smoothed map, as the pipeline does
        structures = insts
    f_img = cache / f"images-{args.size}-n{args.n}-s{args.seed}-{args.steps}{k}-w{w:g}{colour_suffix(args)}.npz"
    if f_img.exists():
        images = list(np.load(f_img)["images"])
    else:
        im = load_model(args.image, kind="image")
        t = time.time()
        images = synthesize(im, structures, w=w, steps=args.steps, seed=args.seed, colour_prior=colours)
        print(f"  images: {args.n} x {args.size} px at w={w:g} in {time.time() - t:.0f} s", file=sys.stderr)
        np.savez_compressed(f_img, images=np.stack(images))
    return images, insts


def sanity_rows(real, train, cfg, have=None):
    """Rows of the same test on real tiles only, per size (real: {size: tiles}; train: size -> tiles, called
    only for a row still to measure); rows already in ``have`` are kept, not measured again:

    - real vs real: two disjoint halves of the role's tiles (must be near 0.5);
    - real vs blurred real: one half against the other half blurred (must be near 1.0);
    - train vs held-out: the training images' tiles against the role's. What a generator that reproduced
      its training images exactly would score: tiles of other patients differ in stain and tissue, so a
      figure above 0.5 here is a floor no generator trained on these images can be expected to beat
      (train None, for --role train: no such row)."""
    rows = dict(have or {})
    for size, tiles in real.items():
        if f"real_vs_real_{size}" not in rows or f"real_vs_blurred_{size}" not in rows:  # (one split: both)
            rng = np.random.default_rng(cfg.seed + 7)
            order = rng.permutation(len(tiles))
            a = [tiles[i] for i in order[: len(tiles) // 2]]
            b = [tiles[i] for i in order[len(tiles) // 2 :]]
            rows[f"real_vs_real_{size}"] = two_sample_test(a, b, cfg).to_dict()
            rows[f"real_vs_blurred_{size}"] = two_sample_test(a, blur_tiles(b), cfg).to_dict()
        if train is not None and f"train_vs_held_out_{size}" not in rows:
            rows[f"train_vs_held_out_{size}"] = two_sample_test(train(size), tiles, cfg).to_dict()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="label of this model pair (cache folder name)")
    ap.add_argument("--structure", default=str(ROOT / "checkpoints" / "structure-demo.json"))
    ap.add_argument("--image", default=str(ROOT / "checkpoints" / "image-demo.json"))
    ap.add_argument("--w", type=float, action="append", help="guidance scale(s) (default 2)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "monuseg" / "train")
    ap.add_argument("--split", type=Path, default=ROOT / "bench" / "splits" / "monuseg.json")
    ap.add_argument("--role", choices=("validation", "test", "train"), default="validation")
    ap.add_argument("--n", type=int, default=16, help="synthetic tiles of --size px")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of both models")
    ap.add_argument("--oversample", type=float, default=1.0,
                    help="realism filter: keep n of n * K sampled structures (engine.curate; 1 = off)")
    ap.add_argument("--smooth-outlines", type=float, default=0.0, metavar="SIGMA",
                    help="round the sampled maps' outlines (engine.structure.smooth_outlines; 0 = off); the images "
                         "are conditioned on the structures rebuilt from the smoothed maps")
    ap.add_argument("--real-layouts", action="store_true",
                    help="synthesize on n of the role's own real layouts (their label tiles) instead of sampled "
                         "ones: the image model's realism alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=TwoSampleConfig.epochs,
                    help="two-sample classifier epochs (its fixed recipe's; fewer only for quick checks: figures "
                         "made with other epochs are not comparable)")
    ap.add_argument("--colour-prior", nargs="?", const="train", choices=("train", "model"), default=None,
                    help="give each image, while the model cannot see it, the mean colour of a training tile "
                         "(engine.colour_prior): of the split's train images ('train', the default), or the "
                         "colours stored with the image model ('model': what the studio and synthesize "
                         "--colour-prior model use)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "nudiff" / "realism")
    args = ap.parse_args(argv)
    if args.real_layouts and args.size != 256:
        ap.error("--real-layouts takes the real images' 256 px tiles: --size must be 256")
    if args.real_layouts and args.smooth_outlines > 0:
        ap.error("--smooth-outlines rounds sampled layouts; --real-layouts uses the real ones as they are")
    from engine.errors import NuDiffError
    from engine.pipeline import check_layout_options

    try:  # the engine's bounds, checked before the sanity rows' minutes are spent
        check_layout_options(args.oversample, args.smooth_outlines)
    except NuDiffError as e:
        ap.error(f"--oversample / --smooth-outlines: {e}")
    ws = args.w or [2.0]
    split = json.loads(args.split.read_text())
    cfg = TwoSampleConfig(epochs=args.epochs)
    cache = args.work / args.name
    cache.mkdir(parents=True, exist_ok=True)

    r_img, r_lab = load_role(args.data, split[args.role])
    real256, real256_labels = grid_tiles(r_img, r_lab, 256)
    real128, _ = grid_tiles(r_img, r_lab, 128)
    t_img, t_lab = load_role(args.data, split["train"])
    f_sanity = args.work / f"sanity-{args.role}.json"
    have = json.loads(f_sanity.read_text()) if f_sanity.exists() else {}
    # rows of another classifier recipe are measured again (each row records its epochs and seed)
    have = {k: v for k, v in have.items() if (v.get("epochs"), v.get("seed")) == (cfg.epochs, cfg.seed)}
    t = time.time()
    held_out = args.role != "train"
    sanity = sanity_rows({256: real256, 128: real128},
                         (lambda size: grid_tiles(t_img, t_lab, size)[0]) if held_out else None, cfg, have)
    if sanity != have:
        print(f"  sanity rows in {time.time() - t:.0f} s", file=sys.stderr)
        f_sanity.write_text(json.dumps(sanity, indent=1))

    results = {"name": args.name, "structure": args.structure, "image": args.image, "role": args.role,
               "real_images": split[args.role], "n_real_tiles": {"256": len(real256), "128": len(real128)},
               "n_synthetic": args.n, "size": args.size, "steps": args.steps, "seed": args.seed,
               "oversample": args.oversample, "outline_sigma": args.smooth_outlines,
               "real_layouts": args.real_layouts,
               "classifier": cfg.__dict__, "sanity": sanity, "by_w": {}}
    train_cache = {}
    colours = None
    if args.colour_prior == "train":
        colours = tile_mean_colours(t_img, args.size, labels=t_lab)
    elif args.colour_prior == "model":
        from engine.pipeline import load_model

        colours = load_model(args.image, kind="image").stored_colours()
    results["colour_prior"] = args.colour_prior or ""
    for w in ws:
        s_img, s_lab = synthetic_set(args, w, cache, real256_labels, colours)
        q_img, q_lab = grid_tiles(s_img, s_lab, args.size // 2)  # the quadrants of each tile
        t = time.time()
        row = {"two_sample_256": two_sample_test(real256, s_img, cfg).to_dict(),
               "two_sample_128": two_sample_test(real128, q_img, cfg).to_dict()}
        q = quality_report(list(zip(q_img, q_lab)), list(zip(r_img, r_lab)))
        m = q["morphology"]
        row["nuclei_per_tile"] = {"synthetic": m["synthetic"]["nuclei_per_tile"]["mean"],
                                  "real": m["real"]["nuclei_per_tile"]["mean"]}
        row["foreground_fraction"] = {"synthetic": m["synthetic"]["fg_fraction"]["mean"],
                                      "real": m["real"]["fg_fraction"]["mean"]}
        row["morphology_distance"] = m["distance"]["mean_normalised"]
        row["alignment"] = {"synthetic": q["alignment"]["synthetic"], "real": q["alignment"]["real"]}
        for size, tiles in ((128, q_img), (256, s_img)):
            if size not in train_cache:
                train_cache[size] = training_tiles(t_img, size)
            tt, boxes = train_cache[size]
            row[f"copying_{size}"] = copy_check(tiles, tt, boxes, size=size).to_dict()
        print(f"  scored w={w:g} in {time.time() - t:.0f} s", file=sys.stderr)
        results["by_w"][f"{w:g}"] = row
    out = cache / f"realism-{args.role}{filter_suffix(args)}{colour_suffix(args)}.json"
    prev = json.loads(out.read_text()) if out.exists() else {}
    if prev.get("by_w") and prev.get("classifier") == results["classifier"]:  # rows of one recipe only
        results["by_w"] = {**prev["by_w"], **results["by_w"]}
    out.write_text(json.dumps(results, indent=1))

    def acc(d):
        return f"{d['accuracy']:.3f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"

    print(f"\n{args.name} against {args.role} images ({', '.join(split[args.role])})\n")
    print(f"sanity: real vs real {acc(sanity['real_vs_real_256'])} (256 px), {acc(sanity['real_vs_real_128'])} "
          f"(128 px); real vs blurred {acc(sanity['real_vs_blurred_256'])} (256 px), "
          f"{acc(sanity['real_vs_blurred_128'])} (128 px)" + (
              f"; train images vs these {acc(sanity['train_vs_held_out_256'])} (256 px), "
              f"{acc(sanity['train_vs_held_out_128'])} (128 px)" if held_out else "") + "\n")
    print("| w | two-sample 256 px | two-sample 128 px | nuclei / 128 px tile (real) | foreground (real) | "
          "morphology distance | H Dice syn (real) | darker fraction | near-copies 128 / 256 | "
          "nearest training tile, median (real-real median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, row in results["by_w"].items():
        al = row["alignment"]
        c1, c2 = row["copying_128"], row["copying_256"]
        print(f"| {w} | {acc(row['two_sample_256'])} | {acc(row['two_sample_128'])} | "
              f"{row['nuclei_per_tile']['synthetic']:.2f} ({row['nuclei_per_tile']['real']:.2f}) | "
              f"{row['foreground_fraction']['synthetic']:.3f} ({row['foreground_fraction']['real']:.3f}) | "
              f"{row['morphology_distance']:.3f} | {al['synthetic'].get('hematoxylin_dice', float('nan')):.3f} "
              f"({al['real'].get('hematoxylin_dice', float('nan')):.3f}) | "
              f"{al['synthetic'].get('darker_fraction', float('nan')):.3f} | {c1['n_flagged']} / {c2['n_flagged']} | "
              f"{c1['synthetic_nn']['median']:.3f} ({c1['real_nn']['median']:.3f}) |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
