"""Procedural H&E-like labeled tiles for tests, demos and smoke runs (no real data needed).

Nuclei are irregular ellipses (some touching, some overlapping: the later one wins) stained with a
hematoxylin-like purple with chromatin speckle, on an eosin-pink background with fibrous texture.
Colours come from a Beer-Lambert mix of H and E optical densities fitted to MoNuSeg colours, so
stain deconvolution (``skimage.color.rgb2hed``) separates nuclei from stroma as on real slides. Everything is driven by one seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from engine.metrics import relabel
from engine.morphology import remove_small

__all__ = ["make_tile", "write_folder", "LABEL_FORMATS"]

LABEL_FORMATS = ("png", "tif", "npy")

# Optical density (natural log) per unit of stain, fitted to MoNuSeg colours:
# nuclei ~(110, 70, 120), stroma ~(185, 135, 165) RGB. Each tile jitters them by up to +-15 %
# per channel (stain variation).
_H_OD = np.array([0.70, 0.85, 0.45], dtype=np.float32)
_E_OD = np.array([0.29, 0.64, 0.41], dtype=np.float32)
_MIN_AREA_256 = 12  # nuclei smaller than this (px, at 256) after overlaps are dropped


def _nucleus_mask(rng: np.random.Generator, a: float, b: float) -> tuple[np.ndarray, int]:
    """Irregular ellipse with semi-axes a >= b (px) at a random angle.

    Returns (bool mask of shape (2r+1, 2r+1) centred on the nucleus, r)."""
    r = int(np.ceil(a * 1.15)) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    theta = rng.uniform(0.0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    ang = np.arctan2(v / b, u / a)
    amp = rng.uniform(0.0, 0.08, size=2)
    phase = rng.uniform(0.0, 2 * np.pi, size=2)
    bound = 1.0 + amp[0] * np.cos(2 * ang + phase[0]) + amp[1] * np.cos(3 * ang + phase[1])
    return rho <= bound, r


def _paste(inst: np.ndarray, mask: np.ndarray, r: int, cy: int, cx: int, label: int) -> None:
    """Write ``label`` where ``mask`` (centred at cy, cx) is set, clipped to the tile."""
    size_y, size_x = inst.shape
    y0, x0 = cy - r, cx - r
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(size_y, y0 + mask.shape[0]), min(size_x, x0 + mask.shape[1])
    if ys >= ye or xs >= xe:
        return
    sub = mask[ys - y0 : ye - y0, xs - x0 : xe - x0]
    inst[ys:ye, xs:xe][sub] = label


def _centres(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 2) float centres: half uniform, half around a few cluster centres (tissue clumps)."""
    n_clusters = int(rng.integers(1, 4))
    hubs = rng.uniform(0.15 * size, 0.85 * size, size=(n_clusters, 2))
    which = rng.integers(0, n_clusters, size=n)
    clustered = hubs[which] + rng.normal(0.0, size / 6.0, size=(n, 2))
    uniform = rng.uniform(-0.02 * size, 1.02 * size, size=(n, 2))
    pick = rng.random(n) < 0.5
    return np.where(pick[:, None], clustered, uniform)


def _place_nuclei(rng: np.random.Generator, size: int, density: float) -> np.ndarray:
    """(size, size) int32 instance map, ids in drawing order (not yet cleaned)."""
    scale = size / 256.0
    mean_area = np.pi * (8.0 * scale) * (6.0 * scale)
    n = max(1, int(round(density * size * size / mean_area)))
    inst = np.zeros((size, size), np.int32)
    centres = _centres(rng, n, size)
    prev: tuple[float, float, float] | None = None
    for label in range(1, n + 1):
        a = rng.uniform(4.0, 12.0) * scale
        b = a * rng.uniform(0.55, 1.0)
        cy, cx = centres[label - 1]
        if prev is not None and rng.random() < 0.3:
            # next to the previous nucleus: touching (factor ~1) or overlapping (< 1)
            py, px, pa = prev
            angle = rng.uniform(0.0, 2 * np.pi)
            dist = (pa + b) * rng.uniform(0.7, 1.05)
            cy, cx = py + dist * np.sin(angle), px + dist * np.cos(angle)
        mask, r = _nucleus_mask(rng, a, b)
        _paste(inst, mask, r, int(round(cy)), int(round(cx)), label)
        prev = (cy, cx, b)
    return inst


def _clean(inst: np.ndarray, min_area: int) -> np.ndarray:
    """Keep the largest 8-connected piece of each instance, drop tiny ones, relabel 1..N (order kept)."""
    out = np.zeros_like(inst)
    eight = np.ones((3, 3), dtype=bool)
    for label, box in enumerate(ndimage.find_objects(inst), start=1):
        if box is None:
            continue
        own = inst[box] == label
        pieces, n_pieces = ndimage.label(own, structure=eight)
        if n_pieces > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            own = pieces == (int(np.argmax(sizes)) + 1)
        out[box][own] = label
    return relabel(remove_small(out, min_area))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 low-frequency noise in about [-1, 1] from a cells x cells grid."""
    grid = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) / 1.5


def _fibres(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """(size, size) float32 fibrous texture in about [-1, 1]: noise smeared along 2 directions."""
    length = max(5, int(round(15 * scale)) | 1)
    total = np.zeros((size, size), np.float32)
    base_angle = rng.uniform(0.0, np.pi)
    for k in range(2):
        angle = base_angle + k * rng.uniform(0.3, 0.8)
        kernel = np.zeros((length, length), np.float32)
        c = length // 2
        dx, dy = np.cos(angle) * c, np.sin(angle) * c
        cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))),
                 (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
        kernel /= kernel.sum()
        noise = rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32)
        total += cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return np.clip(total / (3.0 * total.std() + 1e-6), -1.0, 1.0)


def _render(rng: np.random.Generator, inst: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8 RGB H&E-like image for the instance map ``inst``."""
    size = inst.shape[0]
    scale = size / 256.0
    fg = (inst > 0).astype(np.float32)

    # eosin: pink stroma with fibres, paler gaps from low-frequency variation
    low = _smooth_noise(rng, size, 6)
    eosin = rng.uniform(0.7, 1.2) * (1.0 + 0.25 * _fibres(rng, size, scale) + 0.45 * low)
    eosin = np.clip(eosin, 0.08, None)

    # hematoxylin: per-nucleus darkness x chromatin speckle, softened at the edges
    levels = np.concatenate([[0.0], rng.uniform(0.7, 1.4, size=int(inst.max()))])
    speckle = cv2.GaussianBlur(rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32),
                               (0, 0), 0.8 * max(scale, 0.5))
    speckle = 0.85 + 0.45 * np.clip(speckle / (speckle.std() + 1e-6), -1.5, 2.5) / 2.5
    hema = levels.astype(np.float32)[inst] * speckle * fg
    alpha = cv2.GaussianBlur(fg, (0, 0), 0.7)
    hema = cv2.GaussianBlur(hema, (0, 0), 0.6) + 0.05 * (1.0 + 0.5 * low)
    eosin = eosin * (1.0 - 0.5 * alpha)

    h_od = _H_OD * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    e_od = _E_OD * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    od = hema[..., None] * h_od + eosin[..., None] * e_od + 0.02
    rgb = 255.0 * np.exp(-od)
    rgb += rng.normal(0.0, 3.0, size=rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_tile(size: int = 256, seed: int = 0,
              density: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Procedural labeled H&E-like tile.

    Args:
        size: side in pixels (nuclei radii ~4-12 px at 256, scaled with size).
        seed: same seed -> identical output.
        density: target fraction of the tile covered by nuclei, in (0, 0.9]; None -> random in
            [0.12, 0.35] drawn from the seed.
    Returns:
        image (size, size, 3) uint8 RGB; inst (size, size) int32, 0 = background, ids 1..N.
    """
    if size < 16:
        raise ValueError(f"tile size must be >= 16 px, got {size}")
    if density is not None and not 0.0 < density <= 0.9:
        raise ValueError(f"density must be in (0, 0.9], got {density}")
    rng = np.random.default_rng(seed)
    if density is None:
        density = float(rng.uniform(0.12, 0.35))
    raw = _place_nuclei(rng, size, density)
    min_area = max(4, int(round(_MIN_AREA_256 * (size / 256.0) ** 2)))
    inst = _clean(raw, min_area)
    image = _render(rng, inst)
    return image, inst


def _write_label(path: Path, inst: np.ndarray, label_format: str) -> Path:
    """Write ``inst`` as ``path`` + extension; returns the file written."""
    if label_format == "png":
        if inst.max() > np.iinfo(np.uint16).max:
            raise ValueError("more than 65535 instances cannot be stored in a 16-bit PNG")
        out = path.with_suffix(".png")
        if not cv2.imwrite(str(out), inst.astype(np.uint16)):
            raise OSError(f"could not write {out}")
    elif label_format == "tif":
        import tifffile

        out = path.with_suffix(".tif")
        tifffile.imwrite(out, inst.astype(np.int32))
    elif label_format == "npy":
        out = path.with_suffix(".npy")
        np.save(out, inst.astype(np.int32))
    else:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    return out


def write_folder(folder: str | Path, n_images: int = 4, size: int = 256, seed: int = 0,
                 label_format: str = "png") -> Path:
    """Write ``images/<stem>.png`` and ``labels/<stem>.<fmt>`` for ``n_images`` synthetic tiles.

    Stems are ``synth_000``, ``synth_001``, ...; tile i uses seed ``seed + i``. Labels are uint16
    PNG, int32 TIFF or int32 ``.npy`` (``label_format`` "png" / "tif" / "npy"). Returns the folder.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, inst = make_tile(size=size, seed=seed + i)
        stem = f"synth_{i:03d}"
        image_path = folder / "images" / f"{stem}.png"
        if not cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {image_path}")
        _write_label(folder / "labels" / stem, inst, label_format)
    return folder
