"""Quality of a synthetic labeled set, without training a segmenter from scratch each time.

Four views, all comparable with the same numbers computed on real data:

* **alignment** (do the images show the labeled nuclei?): with no model, Dice between the label's
  foreground and an Otsu threshold of the hematoxylin channel (``skimage.color.rgb2hed``), and the
  fraction of nucleus pixels stained darker (more hematoxylin) than the median background pixel; with a
  segmenter trained on real data (:mod:`engine.segment`), its Dice / AJI / PQ on the synthetic images
  against their labels.
* **morphology** of the instance maps: nuclei per tile, density, foreground fraction (per tile); area,
  eccentricity, solidity (per nucleus, ``skimage.measure.regionprops``).
* **appearance** of the images, per tile: how much darker nuclei are than the background (contrast),
  fine texture (variance of the Laplacian) and the grey-level spread inside nuclei and inside the
  background. Synthetic images that are starker and smoother than real ones make pairs that are easier
  than real tiles.
* **distance** between synthetic and real morphology or appearance: 1-D Wasserstein distance per
  statistic (``scipy.stats.wasserstein_distance``), also divided by the real statistic's standard
  deviation so the statistics can be averaged.

The studio's Export tab calls :func:`quality_report` on the basket (a list of (image, inst) pairs) and
shows :func:`format_quality_markdown`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import DataError
from engine.metrics import aji, dice, pq
from engine.morphology import nuclei, solidities, tile_measures

__all__ = ["PER_TILE", "PER_NUCLEUS", "APPEARANCE", "morphology_stats", "morphology_distance", "appearance_stats",
           "appearance_distance", "hematoxylin_alignment", "alignment_score", "quality_report",
           "format_quality_markdown", "load_pairs", "real_tiles"]

PER_TILE = ("nuclei_per_tile", "density", "fg_fraction")
PER_NUCLEUS = ("area", "eccentricity", "solidity")
APPEARANCE = ("contrast", "sharpness", "nucleus_texture", "background_texture")
_SEG_METRICS = ("segmenter_dice", "segmenter_aji", "segmenter_pq")


# ----------------------------------------------------------------------------- morphology


def morphology_stats(insts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Statistics of (H, W) integer instance maps (0 = background).

    Returns float64 arrays: per map ``nuclei_per_tile`` (count), ``density`` (nuclei per 100 x 100 px),
    ``fg_fraction`` (nucleus pixels / all pixels), each of shape (n_maps,); per nucleus ``area`` (px),
    ``eccentricity`` in [0, 1), ``solidity`` in (0, 1], each of shape (n_nuclei_total,).
    """
    out: dict[str, list[float]] = {k: [] for k in (*PER_TILE, *PER_NUCLEUS)}
    for inst in insts:
        inst, regions = nuclei(inst, DataError)
        n, density, fg = tile_measures(inst, regions)
        out["nuclei_per_tile"].append(float(n))
        out["density"].append(density)
        out["fg_fraction"].append(fg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in regions:
                out["area"].append(float(r.area))
                out["eccentricity"].append(float(r.eccentricity))
        out["solidity"].extend(solidities(regions).tolist())
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def morphology_distance(real: Sequence[np.ndarray] | Mapping[str, np.ndarray],
                        synthetic: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Distances between the morphology of real and synthetic instance maps (or their
    :func:`morphology_stats`).

    Returns {stat: {"wasserstein", "normalised" (wasserstein / std of the real statistic),
    "real_mean", "synthetic_mean"}} for every statistic, plus "mean_normalised": the mean of the
    normalised distances (0 for identical sets; nan where a side has no values).
    """
    a = real if isinstance(real, Mapping) else morphology_stats(real)
    b = synthetic if isinstance(synthetic, Mapping) else morphology_stats(synthetic)
    return _distances(a, b, (*PER_TILE, *PER_NUCLEUS))


def _distances(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, Any]:
    """Per-key 1-D Wasserstein distance of b from a (nan values dropped), raw and over a's std."""
    from scipy.stats import wasserstein_distance

    out: dict[str, Any] = {}
    normalised = []
    for key in keys:
        x, y = _finite(a[key]), _finite(b[key])
        if x.size == 0 or y.size == 0:
            w = norm = float("nan")
        else:
            w = float(wasserstein_distance(x, y))
            spread = float(x.std())
            norm = w / spread if spread > 0 else (0.0 if w == 0 else float("inf"))
            normalised.append(norm)
        out[key] = {"wasserstein": w, "normalised": norm, "real_mean": _mean(x), "synthetic_mean": _mean(y)}
    finite = [v for v in normalised if np.isfinite(v)]
    out["mean_normalised"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _finite(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v[np.isfinite(v)]


# ----------------------------------------------------------------------------- appearance


def appearance_stats(images: Sequence[np.ndarray], insts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image appearance of (H, W, 3) uint8 RGB images with their (H, W) instance maps.

    On the grey level (ITU-R 601 luma, 0..255), returns float64 arrays of shape (n_images,):
    ``contrast``: median background grey minus median nucleus grey (positive: nuclei darker);
    ``sharpness``: variance of the 4-neighbour Laplacian (fine texture and focus);
    ``nucleus_texture`` / ``background_texture``: grey standard deviation inside nuclei / background.
    A value is nan where the image has no nucleus (or no background) pixels.
    """
    import cv2

    if len(images) != len(insts):
        raise DataError(f"{len(images)} images but {len(insts)} labels")
    out: dict[str, list[float]] = {k: [] for k in APPEARANCE}
    nan = float("nan")
    for image, inst in zip(images, insts):
        image, inst = _image_and_label(image, inst)
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        fg = inst > 0
        nuc, bg = grey[fg], grey[~fg]
        out["contrast"].append(float(np.median(bg) - np.median(nuc)) if nuc.size and bg.size else nan)
        out["sharpness"].append(float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1).var()))
        out["nucleus_texture"].append(float(nuc.std()) if nuc.size else nan)
        out["background_texture"].append(float(bg.std()) if bg.size else nan)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _image_and_label(image: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as arrays; DataError unless image is (H, W, 3) and inst (H, W)."""
    image, inst = np.asarray(image), np.asarray(inst)
    if image.ndim != 3 or image.shape[2] != 3 or inst.shape != image.shape[:2]:
        raise DataError(f"image (H, W, 3) and label (H, W) do not match: {image.shape} vs {inst.shape}")
    return image, inst


def appearance_distance(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Distances between two :func:`appearance_stats` results, as :func:`morphology_distance`."""
    return _distances(real, synthetic, APPEARANCE)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


# ----------------------------------------------------------------------------- alignment


def hematoxylin_alignment(image: np.ndarray, inst: np.ndarray) -> dict[str, float]:
    """Non-learned alignment of one (H, W, 3) uint8 RGB image with its (H, W) instance map.

    Returns ``hematoxylin_dice``: Dice between the label foreground and (hematoxylin > Otsu threshold),
    hematoxylin from ``rgb2hed`` smoothed with a Gaussian of sigma 1; ``darker_fraction``: fraction of
    nucleus pixels with more hematoxylin than the median background pixel (0.5 = no relation; nan
    without nuclei or without background).
    """
    import cv2
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    image, inst = _image_and_label(image, inst)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hema = rgb2hed(image.astype(np.uint8))[..., 0].astype(np.float32)
    hema = cv2.GaussianBlur(hema, (0, 0), 1.0)
    fg = inst > 0
    if float(hema.max()) > float(hema.min()):
        mask = hema > threshold_otsu(hema)
    else:
        mask = np.zeros_like(fg)
    darker = float("nan")
    if fg.any() and (~fg).any():
        darker = float(np.mean(hema[fg] > np.median(hema[~fg])))
    return {"hematoxylin_dice": dice(fg, mask), "darker_fraction": darker}


def alignment_score(images: Sequence[np.ndarray], insts: Sequence[np.ndarray],
                    segmenter: Any | None = None) -> dict[str, Any]:
    """Alignment of images with their labels, averaged over pairs (nan-aware).

    Args:
        images: (H, W, 3) uint8 RGB; insts: matching (H, W) integer instance maps.
        segmenter: optional :class:`engine.segment.Segmenter` (or a path to one) trained on real data.
    Returns:
        {"n", "hematoxylin_dice", "darker_fraction"[, "segmenter_dice", "segmenter_aji", "segmenter_pq"],
        "per_image": [dict of the same keys per pair]}; values in [0, 1].
    """
    if len(images) != len(insts):
        raise DataError(f"{len(images)} images but {len(insts)} labels")
    seg = _as_segmenter(segmenter)
    per_image = []
    for image, inst in zip(images, insts):
        row = hematoxylin_alignment(image, inst)
        if seg is not None:
            pred = seg.predict(np.asarray(image))
            row.update({"segmenter_dice": dice(inst, pred), "segmenter_aji": aji(inst, pred),
                        "segmenter_pq": pq(inst, pred)[2]})
        per_image.append(row)
    keys = ["hematoxylin_dice", "darker_fraction", *(_SEG_METRICS if seg is not None else ())]
    out: dict[str, Any] = {"n": len(per_image)}
    for k in keys:
        vals = np.array([r[k] for r in per_image], np.float64)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    out["per_image"] = per_image
    return out


def _as_segmenter(segmenter: Any | None) -> Any | None:
    if segmenter is None or hasattr(segmenter, "predict"):
        return segmenter
    from engine.segment import Segmenter

    return Segmenter.load(segmenter)


# ----------------------------------------------------------------------------- report


def load_pairs(source: Any, what: str = "pairs") -> list[tuple[np.ndarray, np.ndarray]]:
    """A labeled folder (images/ + labels/) or a sequence of (image, inst[, meta]) / Pair / Tile objects
    -> [(image uint8 (H, W, 3), inst int32 (H, W))]. DataError if unreadable or empty."""
    from engine.segment import as_image_label_pairs

    if isinstance(source, (str, Path)):
        from engine.data import load_folder

        items, _ = load_folder(source)
        return [(it.image, it.inst) for it in items]
    return as_image_label_pairs(list(source), what)


def real_tiles(pairs: list[tuple[np.ndarray, np.ndarray]], size: int,
               max_tiles: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut real images larger than the synthetic tiles into non-overlapping size x size tiles (so per-tile
    statistics compare like with like); at most ``max_tiles``, evenly spaced."""
    from engine.data import tile_positions
    from engine.structure import relabel

    tiles = []
    for image, inst in pairs:
        h, w = inst.shape
        if h < size or w < size or (h == size and w == size):
            tiles.append((image, inst))
            continue
        for y in tile_positions(h, size, size):
            for x in tile_positions(w, size, size):
                tiles.append((image[y : y + size, x : x + size], relabel(inst[y : y + size, x : x + size])))
    if len(tiles) > max_tiles:
        keep = np.linspace(0, len(tiles) - 1, max_tiles).round().astype(int)
        tiles = [tiles[i] for i in keep]
    return tiles


def _summary(stats: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{stat: {mean, median, std, n}} over the finite values of each statistic."""
    out = {}
    for k, v in stats.items():
        v = _finite(v)
        out[k] = {"mean": _mean(v), "median": float(np.median(v)) if v.size else float("nan"),
                  "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}
    return out


def quality_report(synthetic: Any, real: Any | None = None, segmenter: Any | None = None, *,
                   max_real_tiles: int = 500, realism: bool = False, training: Any | None = None) -> dict[str, Any]:
    """Quality of a synthetic set against real data.

    Args:
        synthetic: labeled folder, or list of (image, inst[, meta]) pairs / Pair objects (the basket).
        real: labeled folder or pairs of real data (None: no morphology comparison, no real reference).
            Real images larger than the synthetic tiles are cut into tiles of the synthetic size.
        segmenter: optional Segmenter (or path) trained on real data, for the learned alignment score.
            Its score on the real tiles is optimistic when it was trained on those same images.
        max_real_tiles: cap on real tiles used (evenly spaced), for speed.
        realism: also run the classifier two-sample test (engine.two_sample) between the synthetic tiles
            of the median size and the real tiles (needs ``real``; about a minute on a CPU per 100 tiles).
        training: the generator's training images (labeled folder or pairs): report each synthetic
            tile's nearest training tile and flag near-copies (engine.copying).
    Returns:
        JSON-serialisable dict: n_synthetic, n_real_tiles, tile_size, alignment {synthetic, real},
        morphology {synthetic, real (summaries: mean/median/std/n per statistic), distance}, appearance
        (the same three parts), per_pair (alignment and nucleus count of every synthetic pair, in input
        order), notes (readable warnings).
    """
    synth = load_pairs(synthetic, "synthetic pairs")
    seg = _as_segmenter(segmenter)
    size = int(np.median([min(inst.shape) for _, inst in synth]))
    s_stats = morphology_stats([inst for _, inst in synth])
    s_look = appearance_stats([im for im, _ in synth], [inst for _, inst in synth])
    s_align = alignment_score([im for im, _ in synth], [inst for _, inst in synth], seg)
    report: dict[str, Any] = {"n_synthetic": len(synth), "tile_size": size, "n_real_tiles": 0,
                              "segmenter": bool(seg is not None),
                              "alignment": {"synthetic": _drop(s_align, "per_image")},
                              "morphology": {"synthetic": _summary(s_stats)},
                              "appearance": {"synthetic": _summary(s_look)}}
    report["per_pair"] = [{"index": i, "n_nuclei": int(s_stats["nuclei_per_tile"][i]), **row}
                          for i, row in enumerate(s_align["per_image"])]
    if real is not None:
        tiles = real_tiles(load_pairs(real, "real pairs"), size, max_real_tiles)
        r_stats = morphology_stats([inst for _, inst in tiles])
        r_look = appearance_stats([im for im, _ in tiles], [inst for _, inst in tiles])
        r_align = alignment_score([im for im, _ in tiles], [inst for _, inst in tiles], seg)
        report["n_real_tiles"] = len(tiles)
        report["alignment"]["real"] = _drop(r_align, "per_image")
        report["morphology"]["real"] = _summary(r_stats)
        report["morphology"]["distance"] = morphology_distance(r_stats, s_stats)
        report["appearance"]["real"] = _summary(r_look)
        report["appearance"]["distance"] = appearance_distance(r_look, s_look)
        if realism:
            report["two_sample"] = _two_sample([im for im, _ in synth], [im for im, _ in tiles], size)
    if training is not None:
        report["copying"] = _copying([im for im, _ in synth], load_pairs(training, "training pairs"), size)
    report["notes"] = _notes(report)
    return report


def _two_sample(synthetic: list[np.ndarray], real: list[np.ndarray], size: int) -> dict[str, Any]:
    """Classifier two-sample test on the square tiles of ``size`` px of both sets (or why it was skipped)."""
    from engine.two_sample import two_sample_test

    s = [im for im in synthetic if im.shape[:2] == (size, size)]
    r = [im for im in real if im.shape[:2] == (size, size)]
    if min(len(s), len(r)) < 4 or size < 32:
        return {"skipped": f"needs at least 4 square tiles of {size} px (>= 32 px) in each set; "
                           f"has {len(s)} synthetic and {len(r)} real"}
    return two_sample_test(r, s).to_dict()


def _copying(synthetic: list[np.ndarray], training: list[tuple[np.ndarray, np.ndarray]], size: int) -> dict[str, Any]:
    """Anti-copying check of the synthetic tiles against size-px tiles of the training images."""
    from engine.copying import copy_check, training_tiles

    tiles, boxes = training_tiles([im for im, _ in training], size)
    if len(tiles) < 2:
        return {"skipped": f"the training images give fewer than two tiles of {size} px"}
    return copy_check(synthetic, tiles, boxes, size=size).to_dict()


def _drop(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _notes(report: Mapping[str, Any]) -> list[str]:
    """Readable warnings about a report."""
    notes = []
    empty = sum(1 for p in report["per_pair"] if p["n_nuclei"] == 0)
    if empty:
        notes.append(f"{empty} of {report['n_synthetic']} synthetic pairs have no nuclei")
    ts = report.get("two_sample") or {}
    if ts.get("ci_low", 0.0) > 0.6:
        notes.append(f"a classifier tells these synthetic tiles from real ones {ts['accuracy']:.0%} of the time: "
                     f"they do not look scanned yet")
    cp = report.get("copying") or {}
    if cp.get("n_flagged"):
        notes.append(f"{cp['n_flagged']} synthetic tiles are near-copies of training tiles "
                     f"({', '.join(f'#{i}' for i in cp['flagged'][:10])}): do not export them")
    real = report["alignment"].get("real")
    synth = report["alignment"]["synthetic"]
    for key in ("hematoxylin_dice", "segmenter_dice"):
        if real and key in real and np.isfinite(real[key]) and np.isfinite(synth[key]) and \
                synth[key] < real[key] - 0.1:
            notes.append(f"{key.replace('_', ' ')} of synthetic pairs ({synth[key]:.3f}) is well below that of "
                         f"real tiles ({real[key]:.3f}): images may not match their labels")
    dist = report["morphology"].get("distance")
    if dist:
        far = [k for k in (*PER_TILE, *PER_NUCLEUS) if np.isfinite(dist[k]["normalised"]) and
               dist[k]["normalised"] > 0.5]
        if far:
            notes.append("morphology differs from real data in: " + ", ".join(far) +
                         " (Wasserstein distance > 0.5 std)")
    adist = report.get("appearance", {}).get("distance")
    if adist:
        for key, more, less in (("contrast", "nuclei stand out more than in real images",
                                 "nuclei stand out less than in real images"),
                                ("sharpness", "images have more fine texture than real ones",
                                 "images are smoother than real ones")):
            d = adist[key]
            if np.isfinite(d["normalised"]) and d["normalised"] > 0.5:
                higher = d["synthetic_mean"] > d["real_mean"]
                hint = "" if key != "contrast" else (
                    "; the guidance scale w sets it: an image model's calibrated w (Synthesize tab, `calibrate-w`) "
                    "matches it on real layouts; the layouts themselves also move it")
                notes.append(f"synthetic {more if higher else less} ({_APPEARANCE_NAMES[key].split(' (')[0].lower()} "
                             f"{d['synthetic_mean']:.1f} vs {d['real_mean']:.1f}){hint}")
    return notes


def _f(v: Any, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if not np.isfinite(v) else f"{v:.{digits}f}"


_APPEARANCE_NAMES = {"contrast": "Nucleus contrast (background - nucleus)",
                     "sharpness": "Fine texture (Laplacian variance)",
                     "nucleus_texture": "Spread inside nuclei (sd)", "background_texture": "Spread in background (sd)"}


def format_quality_markdown(report: Mapping[str, Any]) -> str:
    """Markdown rendering of :func:`quality_report`: alignment table, morphology table, notes."""
    al = report["alignment"]
    has_real = "real" in al
    lines = [f"**Synthetic pairs:** {report['n_synthetic']} (tile {report['tile_size']} px)"
             + (f"; **real tiles:** {report['n_real_tiles']}" if has_real else ""), "",
             "| Alignment | Synthetic |" + (" Real |" if has_real else ""),
             "|---|---|" + ("---|" if has_real else "")]
    names = {"hematoxylin_dice": "Hematoxylin Dice (no model)", "darker_fraction": "Nuclei darker than background",
             "segmenter_dice": "Segmenter Dice", "segmenter_aji": "Segmenter AJI", "segmenter_pq": "Segmenter PQ"}
    for key, name in names.items():
        if key in al["synthetic"]:
            lines.append(f"| {name} | {_f(al['synthetic'][key])} |" +
                         (f" {_f(al['real'].get(key))} |" if has_real else ""))
    morph = report["morphology"]
    dist = morph.get("distance")
    lines += ["", "| Morphology (mean) | Synthetic |" + (" Real | Wasserstein | W / std |" if dist else ""),
              "|---|---|" + ("---|---|---|" if dist else "")]
    for key in (*PER_TILE, *PER_NUCLEUS):
        row = f"| {key.replace('_', ' ')} | {_f(morph['synthetic'][key]['mean'], 2)} |"
        if dist:
            row += (f" {_f(morph['real'][key]['mean'], 2)} | {_f(dist[key]['wasserstein'], 3)} |"
                    f" {_f(dist[key]['normalised'], 3)} |")
        lines.append(row)
    if dist:
        lines += ["", f"Mean normalised morphology distance: {_f(dist['mean_normalised'])} (0 = same as real)"]
    look = report["appearance"]
    adist = look.get("distance")
    lines += ["", "| Appearance (mean, grey levels) | Synthetic |" + (" Real | W / std |" if adist else ""),
              "|---|---|" + ("---|---|" if adist else "")]
    for key, name in _APPEARANCE_NAMES.items():
        row = f"| {name} | {_f(look['synthetic'][key]['mean'], 1)} |"
        if adist:
            row += f" {_f(look['real'][key]['mean'], 1)} | {_f(adist[key]['normalised'], 3)} |"
        lines.append(row)
    ts = report.get("two_sample")
    if ts:
        lines += [""]
        if "skipped" in ts:
            lines.append(f"**Classifier two-sample test:** skipped: {ts['skipped']}")
        else:
            lines.append(f"**Classifier two-sample test:** a small CNN trained on half of each set tells the other "
                         f"half apart with accuracy **{ts['accuracy']:.3f}** (95 % CI {ts['ci_low']:.3f}-"
                         f"{ts['ci_high']:.3f}; {ts['n_per_set']} + {ts['n_per_set']} tiles of {ts['tile_size']} px). "
                         f"0.5 = indistinguishable, 1 = always told apart.")
    cp = report.get("copying")
    if cp:
        lines += [""]
        if "skipped" in cp:
            lines.append(f"**Copy check:** skipped: {cp['skipped']}")
        else:
            sn, rn = cp["synthetic_nn"], cp["real_nn"]
            flagged = ", ".join(f"#{i}" for i in cp["flagged"][:20]) or "none"
            lines.append(f"**Copy check:** {cp['n_flagged']} of {len(cp['distance'])} synthetic tiles are near-copies "
                         f"of a training tile ({flagged}). Distance to the nearest of {cp['n_training_tiles']} "
                         f"training tiles: median {sn['median']:.3f}, min {sn['min']:.3f}; real tiles to their "
                         f"nearest other real tile: median {rn['median']:.3f}, 1st percentile {cp['threshold']:.3f} "
                         f"(the flag threshold).")
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"
