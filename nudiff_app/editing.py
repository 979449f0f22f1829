"""Label-map editing operations behind the Edit tab (pure numpy, no gradio).

The editor shows the instance map magnified by an integer factor; the user's brush layer comes back at
that display resolution as RGBA. Strokes painted with the *add* colour become nuclei, strokes painted
with the *erase* colour clear label pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine import render
from engine.structure import instances_to_structure, relabel

ADD_COLOR = (255, 255, 255)  # white brush: draw a nucleus (closed outlines are filled)
ERASE_COLOR = (255, 0, 255)  # magenta brush: erase label pixels
DISPLAY_SIZE = 512  # the editor canvas is about this many pixels wide
MIN_COVER = 0.25  # share of a label pixel's display block a stroke must cover to count


def display_scale(size: int) -> int:
    """Integer magnification for a tile of `size` px on the editor canvas."""
    return max(1, DISPLAY_SIZE // max(1, int(size)))


def zoom(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour magnification of an (H, W[, C]) array by an integer factor."""
    if factor <= 1:
        return np.asarray(img)
    return np.repeat(np.repeat(np.asarray(img), factor, axis=0), factor, axis=1)


def zoom_to(img: np.ndarray, target: int = 256) -> np.ndarray:
    """Magnify a small picture (nearest neighbour) so its larger side is about `target` px."""
    side = max(np.asarray(img).shape[:2])
    return zoom(img, max(1, target // max(1, side)))


def editor_background(inst: np.ndarray) -> np.ndarray:
    """(H*s, W*s, 3) uint8: coloured nuclei on dark grey, magnified for the editor canvas."""
    pic = render.colorize_instances(inst)
    pic[inst == 0] = (40, 40, 40)
    return zoom(pic, display_scale(max(inst.shape)))


def label_view(inst: np.ndarray) -> np.ndarray:
    """Coloured instance map with white outlines, magnified like the editor (click-to-delete view)."""
    pic = editor_background(inst)
    pic[render.contours(zoom(inst, display_scale(max(inst.shape))))] = (255, 255, 255)
    return pic


def structure_view(inst: np.ndarray) -> np.ndarray:
    """The derived 3-channel structure (semantic | horizontal | vertical), magnified, white gutters."""
    st = render.structure_to_rgb(instances_to_structure(inst))
    w = inst.shape[1]
    chans = [zoom(st[:, i * w:(i + 1) * w], max(1, 256 // max(1, inst.shape[0]))) for i in range(3)]
    return render.grid(chans, cols=3, pad=6)


def strokes_from_layer(layer: np.ndarray | None, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(add, erase) boolean masks at label resolution from an RGBA brush layer at display resolution.

    A label pixel is painted when strokes cover at least MIN_COVER of its display block; it is an
    erase pixel when most of its painted display pixels are nearer the erase colour.
    """
    h, w = shape
    add = np.zeros(shape, bool)
    erase = np.zeros(shape, bool)
    if layer is None:
        return add, erase
    arr = np.asarray(layer)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return add, erase
    if arr.shape[2] == 4:
        painted = arr[..., 3] >= 128
    else:
        painted = arr[..., :3].max(-1) > 0
    if not painted.any():
        return add, erase
    rgb = arr[..., :3].astype(np.float32)
    d_add = ((rgb - np.array(ADD_COLOR, np.float32)) ** 2).sum(-1)
    d_er = ((rgb - np.array(ERASE_COLOR, np.float32)) ** 2).sum(-1)
    is_erase = painted & (d_er < d_add)
    is_add = painted & ~is_erase
    sy, sx = arr.shape[0] / h, arr.shape[1] / w
    if sy < 1 or sx < 1:  # layer smaller than the label: nearest-neighbour lookup
        ys = np.minimum((np.arange(h) * sy).astype(int), arr.shape[0] - 1)
        xs = np.minimum((np.arange(w) * sx).astype(int), arr.shape[1] - 1)
        return is_add[np.ix_(ys, xs)], is_erase[np.ix_(ys, xs)]
    # block means over each label pixel's display footprint
    yb = np.minimum((np.arange(arr.shape[0]) / sy).astype(int), h - 1)
    xb = np.minimum((np.arange(arr.shape[1]) / sx).astype(int), w - 1)
    idx = yb[:, None] * w + xb[None, :]
    area = np.bincount(idx.ravel(), minlength=h * w).reshape(h, w).astype(np.float32)
    cov_add = np.bincount(idx.ravel(), weights=is_add.ravel(), minlength=h * w).reshape(h, w) / area
    cov_er = np.bincount(idx.ravel(), weights=is_erase.ravel(), minlength=h * w).reshape(h, w) / area
    erase = (cov_er >= MIN_COVER) & (cov_er >= cov_add)
    add = (cov_add >= MIN_COVER) & ~erase
    return add, erase


def apply_strokes(inst: np.ndarray, add: np.ndarray, erase: np.ndarray, *, merge_touching: bool,
                  min_px: int) -> tuple[np.ndarray, int]:
    """New instance map after erasing `erase` and drawing `add`; returns (map, nuclei added).

    Each connected component of `add` (closed outlines filled) becomes a nucleus. With
    merge_touching, a component that overlaps or touches existing nuclei joins them into one
    nucleus; otherwise it becomes a nucleus of its own, drawn over whatever was there.
    Fragments smaller than min_px are removed afterwards (see clean_fragments).
    """
    out = np.asarray(inst).astype(np.int32).copy()
    out[erase] = 0
    add = ndimage.binary_fill_holes(add)
    comps, n = ndimage.label(add, structure=np.ones((3, 3), bool))
    added = 0
    next_id = int(out.max()) + 1
    for c in range(1, n + 1):
        m = comps == c
        if merge_touching:
            touched = np.unique(out[ndimage.binary_dilation(m, structure=np.ones((3, 3), bool))])
            touched = touched[touched > 0]
            if touched.size:
                keep = int(touched.min())
                out[np.isin(out, touched)] = keep
                out[m] = keep
                continue
        out[m] = next_id
        next_id += 1
        added += 1
    before = len(np.unique(out)) - 1
    out = clean_fragments(out, min_px)
    added = max(0, added - (before - (len(np.unique(out)) - 1)))
    return out, added


def clean_fragments(inst: np.ndarray, min_px: int) -> np.ndarray:
    """Split each nucleus into its 8-connected pieces: pieces below min_px are removed, the largest
    piece keeps the nucleus, other large pieces become nuclei of their own. Ids renumbered 1..N."""
    inst = np.asarray(inst).astype(np.int32)
    out = np.zeros_like(inst)
    next_id = 1
    min_px = max(0, int(min_px))
    for k, sl in enumerate(ndimage.find_objects(inst), start=1):
        if sl is None:
            continue
        m = inst[sl] == k
        comps, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        sizes = np.bincount(comps.ravel())[1:]
        for c in np.argsort(-sizes, kind="stable") + 1:
            if sizes[c - 1] < max(1, min_px):
                continue
            view = out[sl]
            view[comps == c] = next_id
            next_id += 1
    return relabel(out)


def delete_at(inst: np.ndarray, y: int, x: int, radius: int = 2) -> tuple[np.ndarray, int]:
    """Remove the nucleus under (y, x), or the nearest one within `radius` px; returns (map, id or 0)."""
    inst = np.asarray(inst)
    h, w = inst.shape
    if not (0 <= y < h and 0 <= x < w):
        return inst, 0
    k = int(inst[y, x])
    if k == 0:
        y0, y1, x0, x1 = max(0, y - radius), min(h, y + radius + 1), max(0, x - radius), min(w, x + radius + 1)
        win = inst[y0:y1, x0:x1]
        if win.max() > 0:
            yy, xx = np.nonzero(win)
            d = (yy + y0 - y) ** 2 + (xx + x0 - x) ** 2
            k = int(win[yy[d.argmin()], xx[d.argmin()]])
    if k == 0:
        return inst, 0
    out = inst.copy()
    out[out == k] = 0
    return relabel(out), k
