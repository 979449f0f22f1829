"""Nuclei structure: the 3-channel surrogate of an instance map that the structure DDPM learns.

Convention (all channels float32 in [-1, 1], channel-last (H, W, 3)):

* channel 0, **semantic**: +1 inside a nucleus, -1 outside (the paper's binary map rescaled to the
  diffusion range).
* channel 1, **horizontal** and channel 2, **vertical**: HoVer-Net's distance maps. For each nucleus,
  every pixel gets its signed column (resp. row) offset from the nucleus centre of mass; negative offsets
  are divided by the largest negative magnitude and positive ones by the largest positive one, so each
  nucleus spans [-1, 1] left-to-right (resp. top-to-bottom) with 0 at its centre. 0 outside nuclei.

Inside a nucleus the horizontal map increases strictly from left to right and the vertical map from top
to bottom; between two touching nuclei they jump from about +1 back to about -1. The inverse transform
uses exactly these two facts: the *core* of a nucleus (|h| and |v| small) gives one marker per nucleus,
and a negative derivative marks the boundary between touching nuclei.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from engine.metrics import relabel  # (one relabelling for the engine: ids 1..N consecutive, order kept)
from engine.morphology import remove_small

__all__ = ["instances_to_structure", "structure_to_instances", "merge_fragments", "smooth_outlines", "relabel",
           "dihedral", "dihedral_batch"]


def instances_to_structure(inst: np.ndarray) -> np.ndarray:
    """Nuclei structure of an instance map.

    Args:
        inst: (H, W) integer instance map, 0 = background, any positive ids (need not be consecutive).
    Returns:
        (H, W, 3) float32 in [-1, 1]: (semantic, horizontal, vertical), see the module docstring.
    """
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be 2-D (H, W), got shape {inst.shape}")
    if inst.size and inst.min() < 0:
        raise ValueError("instance map has negative ids")
    h, w = inst.shape
    out = np.zeros((h, w, 3), np.float32)
    out[..., 0] = np.where(inst > 0, 1.0, -1.0)
    hor = out[..., 1]
    ver = out[..., 2]
    for sl, label in _object_slices(inst):
        crop = inst[sl] == label
        ys, xs = np.nonzero(crop)
        if ys.size == 0:
            continue
        cy, cx = ys.mean(), xs.mean()
        dx = xs - cx
        dy = ys - cy
        hor[sl][ys, xs] = _normalise_sides(dx)
        ver[sl][ys, xs] = _normalise_sides(dy)
    return out


def dihedral(image: np.ndarray, structure: np.ndarray, k: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Apply an optional left-right flip, then ``k`` counter-clockwise quarter turns (``np.rot90``) to an
    (H, W, C) image and its (H, W, 3) structure, fixing the distance maps so that the result equals
    ``instances_to_structure`` of the transformed instance map.

    A flip negates the horizontal map; each quarter turn makes (h, v) -> (v, -h).
    """
    k %= 4
    if flip:
        image, structure = image[:, ::-1], structure[:, ::-1]
    image, s = np.rot90(image, k), np.rot90(structure, k)  # views; one copy each below
    h, v = (-s[..., 1], s[..., 2]) if flip else (s[..., 1], s[..., 2])
    h, v = ((h, v), (v, -h), (-h, -v), (-v, h))[k]  # k quarter turns of (h, v) -> (v, -h)
    out = np.empty(s.shape, np.result_type(structure.dtype, np.float32))
    out[..., 0], out[..., 1], out[..., 2] = s[..., 0], h, v
    return np.ascontiguousarray(image), out


def _quarter_turns(structure: torch.Tensor, turns: int) -> torch.Tensor:
    """Rotate (B, 3, H, W) structures by `turns` (1 or 2) counter-clockwise quarter turns, maps fixed."""
    s = torch.rot90(structure, turns, dims=(-2, -1))
    h, v = s[:, 1], s[:, 2]
    h, v = (v, -h) if turns == 1 else (-h, -v)
    return torch.stack((s[:, 0], h, v), dim=1)


def dihedral_batch(images: torch.Tensor, structures: torch.Tensor, k: torch.Tensor,
                   flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dihedral` for a batch of tensors on any device, each sample with its own transform.

    images (B, C, H, W) and structures (B, 3, H, W), any dtype; k (B,) integer quarter turns, flip (B,)
    bool. Sample b gets the left-right flip if flip[b], then k[b] counter-clockwise quarter turns, exactly
    as ``dihedral``. Branch-free (``torch.where`` over the whole batch), so on a GPU it needs no
    synchronisation with the host. Needs H == W.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral_batch needs square tiles, got {tuple(images.shape[-2:])}")
    sel = lambda m: m.reshape(-1, 1, 1, 1)  # noqa: E731
    flip, k = flip.to(images.device, torch.bool), k.to(images.device) % 4
    flipped = structures.flip(-1)
    flipped = torch.stack((flipped[:, 0], -flipped[:, 1], flipped[:, 2]), dim=1)
    images = torch.where(sel(flip), images.flip(-1), images)
    structures = torch.where(sel(flip), flipped, structures)
    for turns in (1, 2):  # k = 3 is one turn, then two
        on = sel((k & turns) > 0)
        images = torch.where(on, torch.rot90(images, turns, dims=(-2, -1)), images)
        structures = torch.where(on, _quarter_turns(structures, turns), structures)
    return images, structures


def _object_slices(inst: np.ndarray):
    """Yield (bounding-box slice, id) for each positive id of an integer map."""
    labels = inst.astype(np.int64, copy=False)
    slices = ndimage.find_objects(labels)
    for i, sl in enumerate(slices):
        if sl is not None:
            yield sl, i + 1


def _normalise_sides(d: np.ndarray) -> np.ndarray:
    """Scale negative values by their largest magnitude and positive values by their maximum."""
    out = np.zeros(d.shape, np.float32)
    neg = d < 0
    pos = d > 0
    if neg.any():
        out[neg] = d[neg] / -d[neg].min()
    if pos.any():
        out[pos] = d[pos] / d[pos].max()
    return out


def structure_to_instances(
    structure: np.ndarray,
    *,
    core: float = 0.5,
    edge: float = 0.6,
    min_size: int = 10,
    min_marker: int = 2,
    smooth: float = 0.0,
    merge_below: float = 0.0,
) -> np.ndarray:
    """Instance map of a nuclei structure by marker-controlled watershed (one pass, fixed channels).

    Args:
        structure: (H, W, 3) float (semantic, horizontal, vertical), nominally in [-1, 1]; noisy
            samples (values outside the range, speckle) are accepted. A (3, H, W) array is accepted too.
        core: a pixel belongs to a nucleus core (marker) when |h| < core and |v| < core.
        edge: a drop of the distance maps larger than this per pixel marks a boundary between nuclei.
        min_size: nuclei smaller than this many pixels are removed.
        min_marker: nucleus cores (markers) smaller than this are ignored; 2 keeps tiny nuclei of exact
            structures apart, ~5 resists the speckle of sampled ones.
        smooth: Gaussian sigma applied to the distance maps first (0 = off; ~1 for very noisy maps).
        merge_below: merge fragments, nuclei smaller than this fraction of the median nucleus area that
            touch another nucleus, into it (:func:`merge_fragments`; 0 = off, 0.2 cleans sampled structures).
    Returns:
        (H, W) int32 instance map, 0 = background, ids 1..N consecutive.
    """
    s = np.asarray(structure, dtype=np.float32)
    if s.ndim == 3 and s.shape[0] == 3 and s.shape[-1] != 3:
        s = np.moveaxis(s, 0, -1)
    if s.ndim != 3 or s.shape[-1] != 3:
        raise ValueError(f"structure must be (H, W, 3), got shape {s.shape}")
    s = np.nan_to_num(s, nan=0.0, posinf=1.0, neginf=-1.0)
    hmap = np.clip(s[..., 1], -1.0, 1.0)
    vmap = np.clip(s[..., 2], -1.0, 1.0)
    if smooth > 0:
        hmap = cv2.GaussianBlur(hmap, (0, 0), smooth)
        vmap = cv2.GaussianBlur(vmap, (0, 0), smooth)

    sem = s[..., 0]
    if smooth > 0:
        sem = cv2.GaussianBlur(sem, (0, 0), smooth)
    fg = remove_small(sem > 0, min_size)  # (8-connected components)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)

    # Boundary between touching nuclei. Inside a nucleus h rises along x and is constant along y (v
    # likewise along y / x). So a fall of h along x or of v along y (measured across two pixels, to
    # survive smoothing), or a step of h along y or of v along x, separates two nuclei.
    drop = np.zeros_like(hmap)
    drop[:, 1:-1] = hmap[:, :-2] - hmap[:, 2:]
    drop[1:-1, :] = np.maximum(drop[1:-1, :], vmap[:-2, :] - vmap[2:, :])
    step = np.zeros_like(hmap)
    dy = np.abs(hmap[1:, :] - hmap[:-1, :])
    dx = np.abs(vmap[:, 1:] - vmap[:, :-1])
    step[1:, :] = dy
    step[:-1, :] = np.maximum(step[:-1, :], dy)
    step[:, 1:] = np.maximum(step[:, 1:], dx)
    step[:, :-1] = np.maximum(step[:, :-1], dx)
    boundary = (drop > edge) | (step > edge)

    radial = np.maximum(np.abs(hmap), np.abs(vmap))
    cores = fg & (radial < core) & ~boundary
    _, markers = cv2.connectedComponents(cores.astype(np.uint8), connectivity=4)
    markers = remove_small(markers, max(1, min_marker))
    # landscape: centre 0 -> rim 1, boundaries raised so basins meet on them
    landscape = radial + boundary.astype(np.float32)
    inst = watershed(landscape, markers=markers, mask=fg, connectivity=1)

    # foreground components that received no marker become nuclei of their own
    missed = fg & (inst == 0)
    if missed.any():
        n_extra, extra = cv2.connectedComponents(missed.astype(np.uint8), connectivity=8)
        extra = extra.astype(np.int32)
        extra[extra > 0] += int(inst.max())
        inst = np.where(missed, extra, inst)
    inst = remove_small(inst, min_size)
    return merge_fragments(inst, merge_below) if merge_below > 0 else relabel(inst)


def merge_fragments(inst: np.ndarray, below: float = 0.2) -> np.ndarray:
    """Merge the fragments of an instance map into the nuclei they split off from.

    A fragment is a nucleus smaller than ``below`` times the median nucleus area that touches another
    nucleus (8-neighbourhood). Real annotations hardly have such pieces (in MoNuSeg, 0.1 per 128 px tile
    under 60 px, mostly nuclei cut by the tile edge); a watershed of a noisy sampled structure makes
    about 2 per tile, by giving one blob two markers (docs/benchmarks.md §6d). Smallest first, each
    fragment joins the neighbour it shares the most boundary pixels with; isolated small nuclei stay.

    inst: (H, W) integer map, 0 = background. Returns (H, W) int32 with ids 1..N consecutive.
    """
    inst = np.asarray(inst).astype(np.int32, copy=True)
    areas = np.bincount(inst.ravel())
    present = np.nonzero(areas[1:])[0] + 1
    if len(present) < 2 or below <= 0:
        return relabel(inst)
    limit = below * float(np.median(areas[present]))
    h, w = inst.shape
    boxes = {k: (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
             for k, sl in enumerate(ndimage.find_objects(inst), start=1) if sl is not None}
    for k in present[np.argsort(areas[present], kind="stable")]:
        if areas[k] >= limit or areas[k] == 0:
            continue
        y0, y1, x0, x1 = boxes[k]
        sub = inst[max(0, y0 - 1):min(h, y1 + 1), max(0, x0 - 1):min(w, x1 + 1)]
        mine = sub == k
        ring = ndimage.binary_dilation(mine, structure=np.ones((3, 3), bool)) & ~mine
        neighbours = sub[ring]
        neighbours = neighbours[(neighbours > 0) & (neighbours != k)]
        if neighbours.size == 0:
            continue
        ids, counts = np.unique(neighbours, return_counts=True)
        into = int(ids[np.argmax(counts)])
        sub[mine] = into
        areas[into] += areas[k]
        areas[k] = 0
        a = boxes[into]
        boxes[into] = (min(a[0], y0), max(a[1], y1), min(a[2], x0), max(a[3], x1))
    return relabel(inst)


def smooth_outlines(inst: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Round the outlines of an instance map's nuclei, which sampled structures draw ragged.

    Each nucleus's mask is blurred with a Gaussian of ``sigma`` px and kept where the blur exceeds 1/2 (its
    largest connected piece); a pixel that several blurs claim goes to the highest, and a nucleus that the
    blur would erase keeps its own pixels, so no nucleus is lost. The image border is mirrored, so a nucleus
    cut by it stays cut straight. Layouts of the demo structure model against the validation images' tiles:
    morphology distance 0.586 -> 0.483 at sigma 3, its solidity term 0.733 -> 0.088 (docs/benchmarks.md §13).

    inst: (H, W) integer map, 0 = background. Returns (H, W) int32, ids 1..N consecutive (order kept).
    """
    inst = np.asarray(inst).astype(np.int32, copy=False)
    if sigma <= 0 or not inst.any():
        return relabel(inst)
    h, w = inst.shape
    pad = int(np.ceil(3 * sigma)) + 1
    best = np.zeros((h, w), np.float32)
    out = np.zeros((h, w), np.int32)
    for sl, k in _object_slices(inst):
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        mine = inst[y0:y1, x0:x1] == k
        # (the mask stays `pad` px off the window's sides inside the image, so OpenCV's mirroring of the
        # window's border only acts where the window meets the image's border)
        blur = cv2.GaussianBlur(mine.astype(np.float32), (0, 0), sigma)
        win = (blur > 0.5) & (blur > best[y0:y1, x0:x1])
        n, parts, stats, _ = cv2.connectedComponentsWithStats(win.astype(np.uint8), connectivity=8)
        if n > 2:
            win = parts == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if not win.any():
            win, blur = mine, np.ones_like(blur)
        out[y0:y1, x0:x1][win] = k
        best[y0:y1, x0:x1][win] = blur[win]
    return relabel(out)

