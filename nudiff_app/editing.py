"""Label-map editing operations behind the Edit tab (pure numpy, no gradio).

A label map of any shape up to MAX_EDIT_SIDE px a side is edited one *region* at a time: the tab shows
the whole map as a small overview (the region's rectangle drawn on it) and the region magnified by an
integer factor in the editor. The user's brush layer comes back at the region's display resolution as
RGBA. Strokes painted with the *add* colour become nuclei, strokes painted with the *erase* colour clear
label pixels; they are embedded into full-size masks and applied to the whole map, so a nucleus that
crosses the region's border stays one nucleus. Edits work on bounding boxes, never per nucleus on the
whole map, so an 8192² map stays responsive.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from engine import render
from engine.errors import DataError
from engine.structure import instances_to_structure

ADD_COLOR = (255, 255, 255)  # white brush: draw a nucleus (closed outlines are filled)
ERASE_COLOR = (255, 0, 255)  # magenta brush: erase label pixels
DISPLAY_SIZE = 512  # the editor canvas is about this many pixels wide
MIN_COVER = 0.25  # share of a label pixel's display block a stroke must cover to count
MAX_EDIT_SIDE = 8192  # largest label map side the Edit tab takes
MAX_REGION_SIDE = 1024  # the editor shows at most this many label pixels a side ("whole map" is capped)
REGION_SIZES = (128, 256, 512)  # region sides offered besides the whole map (size 0)
DEFAULT_REGION = 256  # region side chosen for maps larger than DISPLAY_SIZE (zoom x2)
OVERVIEW_SIZE = 512  # a larger map's overview is area-downscaled to about this long side
OVERVIEW_MIN = 256  # a smaller map's overview is magnified to about this long side
BACKGROUND = (40, 40, 40)  # label background in the editor and overview pictures
REGION_COLOR = (255, 255, 255)  # the region's rectangle on the overview
_EIGHT = np.ones((3, 3), bool)


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
    pic[inst == 0] = BACKGROUND
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


Box = tuple[slice, slice]


def _bbox(mask: np.ndarray) -> Box | None:
    """Bounding box of a boolean mask's True pixels, None if there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _grow(box: Box, margin: int, shape: tuple[int, int]) -> Box:
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, shape))


def _union(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def _shift(box: Box, base: Box) -> Box:
    """A box inside the crop `base`, in the coordinates of the array `base` was cut from."""
    return tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(box, base))


def _within(box: Box, outer: Box) -> Box:
    """`box` (full coordinates, inside `outer`) in the coordinates of the crop `outer`."""
    return tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer))


class _Boxes:
    """Bounding boxes of an instance map's ids: found once (lazily, one pass over the map), then kept
    up to date by the caller as nuclei grow (union) or appear; a box may be larger than its nucleus."""

    def __init__(self, inst: np.ndarray):
        self._inst = inst
        self._objs: list | None = None
        self._extra: dict[int, Box | None] = {}

    def get(self, k: int) -> Box | None:
        if k in self._extra:
            return self._extra[k]
        if self._objs is None:
            self._objs = ndimage.find_objects(self._inst)
        return self._objs[k - 1] if 0 < k <= len(self._objs) else None

    def set(self, k: int, box: Box | None) -> None:
        self._extra[k] = box

    def known(self, k: int) -> Box | None:
        """The box of k if known without a pass over the map."""
        if k in self._extra or self._objs is not None:
            return self.get(k)
        return None

    def absent(self) -> list[int]:
        """Ids known to have no pixels (none if the map was never scanned)."""
        if self._objs is None:
            return [k for k, b in self._extra.items() if b is None]
        ids = [k for k, sl in enumerate(self._objs, start=1) if sl is None and self._extra.get(k) is None]
        return ids + [k for k, b in self._extra.items() if b is None]


def _pieces(mask: np.ndarray, min_px: int) -> tuple[np.ndarray, int, list[int]]:
    """The 8-connected pieces of a nucleus's mask: (piece labels, number of pieces, the labels of the
    pieces of at least min_px pixels (and 1), largest first, equal sizes in scan order)."""
    comps, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(comps.ravel())[1:]
    floor = max(1, int(min_px))
    return comps, n, [int(c) for c in np.argsort(-sizes, kind="stable") + 1 if sizes[c - 1] >= floor]


def _split_pieces(out: np.ndarray, k: int, box: Box | None, min_px: int, next_id: int,
                  boxes: _Boxes | None = None) -> tuple[int, int, int]:
    """Clean nucleus k in place: its 8-connected pieces below min_px are removed, the largest piece
    keeps k, other pieces get ids next_id, next_id + 1, ...
    Returns (pieces found, pieces kept, next free id)."""
    if box is None:
        return 0, 0, next_id
    view = out[box]
    m = view == k
    comps, n, kept = _pieces(m, min_px)
    if n == 0:
        return 0, 0, next_id
    if n == 1 and kept:
        return 1, 1, next_id
    keep = np.zeros(n + 1, bool)
    keep[kept] = True
    view[m & ~keep[comps]] = 0
    for c in kept[1:]:
        view[comps == c] = next_id
        if boxes is not None:
            boxes.set(next_id, box)
        next_id += 1
    return n, len(kept), next_id


def _fill_gaps(out: np.ndarray, missing, top: int, box_of=None, max_swaps: int = 64) -> np.ndarray:
    """Make ids consecutive in place when the ids `missing` (of 1..top, the highest id) are absent: the
    highest ids move into the gaps, so only a few nuclei change id (`box_of(id)`, a box around that
    nucleus or None, saves scanning the whole map); many gaps: one remapping pass by row strips."""
    missing = sorted({int(g) for g in missing if 0 < int(g) <= top})
    if not missing:
        return out
    gone = set(missing)
    if len(missing) > max_swaps:
        present = np.ones(top + 1, bool)
        present[missing] = False
        lut = (np.cumsum(present) - 1).astype(np.int32)
        step = max(1, (1 << 22) // max(1, out.shape[1]))
        for y in range(0, out.shape[0], step):
            out[y:y + step] = lut[out[y:y + step]]
        return out
    for g in missing:
        while top > g and top in gone:
            top -= 1
        if top <= g:
            break
        box = box_of(top) if box_of is not None else None
        v = out[box] if box is not None else out
        v[v == top] = g
        gone.add(top)
        top -= 1
    return out


def apply_strokes(inst: np.ndarray, add: np.ndarray, erase: np.ndarray, *, merge_touching: bool,
                  min_px: int) -> tuple[np.ndarray, int]:
    """New instance map after erasing `erase` and drawing `add`; returns (map, nuclei added).

    Each connected component of `add` (closed outlines filled) becomes a nucleus. With
    merge_touching, a component that overlaps or touches existing nuclei joins them into one
    nucleus; otherwise it becomes a nucleus of its own, drawn over whatever was there.
    The nuclei the strokes changed are then cleaned (see clean_fragments: pieces below min_px are
    removed, other pieces become nuclei of their own); nuclei the strokes did not touch are left as they
    are. Ids stay consecutive 1..N: a vanished nucleus's id is taken over by the highest id.

    Work is confined to the strokes' bounding box and the bounding boxes of the nuclei they touch.
    """
    out = np.array(inst, dtype=np.int32, copy=True)
    add = np.asarray(add, bool)
    erase = np.asarray(erase, bool)
    next_id = (int(out.max()) if out.size else 0) + 1
    boxes = _Boxes(out)
    affected: set[int] = set()
    merged_away = False
    eb = _bbox(erase)
    if eb is not None:
        view, e = out[eb], erase[eb]
        affected.update(int(k) for k in np.unique(view[e]) if k)
        view[e] = 0
    added = 0
    ab = _bbox(add)
    if ab is not None:
        ab = _grow(ab, 1, out.shape)  # a 1 px empty margin: holes are found exactly as on the whole map
        filled = ndimage.binary_fill_holes(add[ab])
        comps, _ = ndimage.label(filled, structure=_EIGHT)
        for c, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None:
                continue
            box = _shift(sl, ab)
            m = comps[sl] == c
            if merge_touching:
                near = _grow(box, 1, out.shape)
                ring = np.zeros((near[0].stop - near[0].start, near[1].stop - near[1].start), bool)
                ring[_within(box, near)] = m
                ring = ndimage.binary_dilation(ring, structure=_EIGHT)
                touched = np.unique(out[near][ring])
                touched = touched[touched > 0]
                if touched.size:
                    keep = int(touched.min())
                    kbox = boxes.get(keep)
                    for k in (int(t) for t in touched[1:]):
                        b = boxes.get(k)
                        if b is not None:
                            v = out[b]
                            v[v == k] = keep
                        kbox = _union(kbox, b)
                        boxes.set(k, None)
                        affected.discard(k)
                        merged_away = True
                    v = out[box]
                    v[m] = keep
                    boxes.set(keep, _union(kbox, box))
                    affected.add(keep)
                    continue
            v = out[box]
            affected.update(int(k) for k in np.unique(v[m]) if k)
            v[m] = next_id
            boxes.set(next_id, box)
            affected.add(next_id)
            next_id += 1
            added += 1
    n_before = n_after = 0
    gone: list[int] = []
    for k in sorted(affected):
        found, kept, next_id = _split_pieces(out, k, boxes.get(k), min_px, next_id, boxes)
        n_before += found > 0
        n_after += kept
        if not kept:
            gone.append(k)
    if gone or merged_away:
        _fill_gaps(out, gone + boxes.absent(), next_id - 1, boxes.known)
    added = max(0, added - (n_before - n_after))
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
        comps, _, kept = _pieces(inst[sl] == k, min_px)
        view = out[sl]
        for c in kept:
            view[comps == c] = next_id
            next_id += 1
    return out  # ids were given out as 1, 2, ...: already consecutive


def delete_at(inst: np.ndarray, y: int, x: int, radius: int = 2) -> tuple[np.ndarray, int]:
    """Remove the nucleus under (y, x) (full-map coordinates), or the nearest one within `radius` px;
    returns (map, id or 0). Ids stay consecutive: the highest id takes over the deleted one's."""
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
    out = np.array(inst, dtype=np.int32, copy=True)
    out[out == k] = 0
    return _fill_gaps(out, [k], int(inst.max())), k


# ----------------------------------------------------------------------------- regions of a large map


def check_edit_size(shape: tuple[int, ...], name: str = "label map") -> None:
    """DataError if a map is too large (or not 2-D) for the Edit tab."""
    if len(shape) != 2:
        raise DataError(f"{name} must be a 2-D label map, got shape {tuple(shape)}")
    h, w = (int(v) for v in shape)
    if max(h, w) > MAX_EDIT_SIDE:
        raise DataError(f"{name} is {w}×{h} px (width × height); the Edit tab takes at most "
                        f"{MAX_EDIT_SIDE} px a side: crop it first")


def size_text(shape: tuple[int, int]) -> str:
    """'256×256 px' for a square map, '1000 (x) × 700 (y) px' otherwise."""
    h, w = shape
    return f"{h}×{w} px" if h == w else f"{w} (x) × {h} (y) px"


@dataclass(frozen=True)
class Region:
    """The part of a map shown in the editor: columns x0..x0+w-1, rows y0..y0+h-1; `size` is the side
    that was asked for (0 = the whole map)."""

    x0: int
    y0: int
    w: int
    h: int
    size: int = 0

    @property
    def x1(self) -> int:
        return self.x0 + self.w

    @property
    def y1(self) -> int:
        return self.y0 + self.h

    @property
    def shape(self) -> tuple[int, int]:
        return self.h, self.w

    @property
    def slices(self) -> Box:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def scale(self) -> int:
        """The editor's magnification of this region."""
        return display_scale(max(self.w, self.h))

    def covers(self, shape: tuple[int, int]) -> bool:
        return (self.x0, self.y0, self.h, self.w) == (0, 0, int(shape[0]), int(shape[1]))

    def describe(self, shape: tuple[int, int]) -> str:
        if self.covers(shape):
            return f"whole map (zoom ×{self.scale})"
        return (f"region x {self.x0}–{self.x1 - 1}, y {self.y0}–{self.y1 - 1} of "
                f"{size_text(shape).removesuffix(' px')} (zoom ×{self.scale})")


def clamp_region(shape: tuple[int, int], x0, y0, size) -> Region:
    """The region of side `size` (0 or None = the whole map) with top-left (x0, y0), shrunk to the map
    and to MAX_REGION_SIDE, and moved inside the map."""
    h, w = int(shape[0]), int(shape[1])
    size = max(0, int(size or 0))
    rw, rh = (w, h) if size == 0 else (min(size, w), min(size, h))
    rw, rh = max(1, min(rw, MAX_REGION_SIDE)), max(1, min(rh, MAX_REGION_SIDE))
    x0 = int(np.clip(int(x0 or 0), 0, max(0, w - rw)))
    y0 = int(np.clip(int(y0 or 0), 0, max(0, h - rh)))
    return Region(x0, y0, rw, rh, size)


def region_at(shape: tuple[int, int], x, y, size) -> Region:
    """The region of side `size` centred on the full-map point (x, y), moved inside the map."""
    probe = clamp_region(shape, 0, 0, size)
    return clamp_region(shape, int(x) - probe.w // 2, int(y) - probe.h // 2, size)


def default_region(shape: tuple[int, int]) -> Region:
    """The whole map when it fits the canvas (DISPLAY_SIZE), else its top-left DEFAULT_REGION square."""
    if max(shape) <= DISPLAY_SIZE:
        return clamp_region(shape, 0, 0, 0)
    return clamp_region(shape, 0, 0, DEFAULT_REGION)


def region_to_full(region: Region, x: int, y: int) -> tuple[int, int]:
    """(x, y) on the region's magnified picture (editor / label view) -> (x, y) on the full map."""
    s = region.scale
    return (region.x0 + min(region.w - 1, max(0, int(x) // s)),
            region.y0 + min(region.h - 1, max(0, int(y) // s)))


def embed(mask: np.ndarray, region: Region, shape: tuple[int, int]) -> np.ndarray:
    """A region-sized boolean mask placed into a full-size one."""
    full = np.zeros(shape, bool)
    full[region.slices] = mask
    return full


def region_strokes(layers, shape: tuple[int, int], region: Region) -> tuple[np.ndarray, np.ndarray]:
    """(add, erase) full-map masks from the editor's brush layers drawn on `region`'s picture."""
    add = np.zeros(shape, bool)
    erase = np.zeros(shape, bool)
    ra, re_ = add[region.slices], erase[region.slices]
    for layer in layers or []:
        a, e = strokes_from_layer(layer, region.shape)
        ra |= a
        re_ |= e
    return add, erase


def overview_factor(shape: tuple[int, int]) -> tuple[int, int]:
    """(magnification, reduction) of the overview: one of them is 1."""
    side = max(1, int(max(shape)))
    if side > OVERVIEW_SIZE:
        return 1, -(-side // OVERVIEW_SIZE)
    return max(1, OVERVIEW_MIN // side), 1


def overview_to_full(shape: tuple[int, int], x: int, y: int) -> tuple[int, int]:
    """(x, y) on the overview picture -> (x, y) on the full map (the centre of the block clicked)."""
    up, down = overview_factor(shape)
    fx, fy = (int(x) // up, int(y) // up) if down == 1 else (int(x) * down + down // 2, int(y) * down + down // 2)
    return min(int(shape[1]) - 1, max(0, fx)), min(int(shape[0]) - 1, max(0, fy))


def _palette(n: int) -> np.ndarray:
    """render.colorize_instances' colours for ids 0..n, with the editor's background colour."""
    pal = render.colorize_instances(np.arange(n + 1, dtype=np.int64)[None])[0].copy()
    pal[0] = BACKGROUND
    return pal


def overview(inst: np.ndarray, region: Region | None = None) -> np.ndarray:
    """(H', W', 3) uint8 picture of the whole map in the editor's colours, magnified (small maps) or
    area-averaged down to about OVERVIEW_SIZE px on the long side (large ones, by row strips, from up to
    4×4 samples per output pixel), with the region's rectangle drawn on it."""
    inst = np.asarray(inst)
    h, w = inst.shape
    pal = _palette(int(inst.max()) if inst.size else 0)
    up, down = overview_factor(inst.shape)
    if down == 1:
        pic = zoom(pal[inst], up)
    else:  # block means over a grid of samples (at most 4×4 per output pixel) of each down×down block
        step = next(d for d in range(max(1, down // 4), 0, -1) if down % d == 0)
        k = down // step
        oh, ow = -(-h // down), -(-w // down)
        pic = np.empty((oh, ow, 3), np.uint8)
        band = max(1, (1 << 23) // (ow * k * k * 3))  # output rows per strip: ~8 MB of colour
        buf = np.empty((band * k, ow * k, 3), np.uint8)
        for r in range(0, oh, band):
            ob = min(band, oh - r)
            samples = inst[r * down:(r + ob) * down:step, ::step]
            sub = buf[:ob * k]
            sub[:] = BACKGROUND
            sub[:samples.shape[0], :samples.shape[1]] = pal[samples]
            pic[r:r + ob] = cv2.resize(sub, (ow, ob), interpolation=cv2.INTER_AREA)
    if region is not None:
        if down == 1:
            top, left, bottom, right = region.y0 * up, region.x0 * up, region.y1 * up - 1, region.x1 * up - 1
        else:
            top, left = region.y0 // down, region.x0 // down
            bottom, right = -(-region.y1 // down) - 1, -(-region.x1 // down) - 1
        _rectangle(pic, top, left, min(bottom, pic.shape[0] - 1), min(right, pic.shape[1] - 1))
    return pic


def _rectangle(pic: np.ndarray, top: int, left: int, bottom: int, right: int, t: int = 2) -> None:
    """Draw a `t` px outline (inclusive corners) in REGION_COLOR, inside the given box, in place."""
    t = max(1, min(t, (bottom - top + 1) // 2 or 1, (right - left + 1) // 2 or 1))
    pic[top:top + t, left:right + 1] = REGION_COLOR
    pic[bottom - t + 1:bottom + 1, left:right + 1] = REGION_COLOR
    pic[top:bottom + 1, left:left + t] = REGION_COLOR
    pic[top:bottom + 1, right - t + 1:right + 1] = REGION_COLOR
