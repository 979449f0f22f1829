"""Pictures of structures, instance maps and image grids (uint8 RGB), shared by previews, CLI and studio."""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["colorize_instances", "overlay_contours", "structure_to_rgb", "to_uint8_image", "grid", "contours"]


def _palette(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 distinct bright colours (golden-ratio hues), index 0 black."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hues]
    return (np.concatenate([np.zeros((1, 3)), np.array(rgb).reshape(-1, 3)]) * 255).astype(np.uint8)


def colorize_instances(inst: np.ndarray) -> np.ndarray:
    """(H, W) instance map -> (H, W, 3) uint8, one colour per id, background black."""
    inst = np.asarray(inst)
    n = int(inst.max()) if inst.size else 0
    return _palette(n)[inst]


def contours(inst: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of a nucleus whose 4-neighbour belongs to another id (incl. background)."""
    inst = np.asarray(inst)
    edge = np.zeros(inst.shape, bool)
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[:, :-1] |= inst[:, 1:] != inst[:, :-1]
    edge[1:, :] |= inst[1:, :] != inst[:-1, :]
    edge[:-1, :] |= inst[1:, :] != inst[:-1, :]
    return edge & (inst > 0)


def overlay_contours(image: np.ndarray, inst: np.ndarray, *, opacity: float = 1.0,
                     color: tuple[int, int, int] | None = None) -> np.ndarray:
    """Draw nucleus outlines of inst over an (H, W, 3) uint8 image; per-nucleus colours unless color."""
    img = np.asarray(image, np.float32).copy()
    edge = contours(inst)
    col = np.broadcast_to(np.array(color, np.float32), img.shape) if color is not None \
        else colorize_instances(inst).astype(np.float32)
    a = float(np.clip(opacity, 0.0, 1.0))
    img[edge] = (1 - a) * img[edge] + a * col[edge]
    return img.round().astype(np.uint8)


def structure_to_rgb(structure: np.ndarray) -> np.ndarray:
    """(H, W, 3) structure in [-1, 1] -> (H, W, 3) uint8 picture of its three channels side by side."""
    s = np.clip(np.asarray(structure, np.float32), -1, 1)
    chans = [((s[..., c] + 1) * 127.5).round().astype(np.uint8) for c in range(3)]
    strip = np.concatenate(chans, axis=1)
    return np.repeat(strip[..., None], 3, axis=2)


def to_uint8_image(x: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (3, H, W) float in [-1, 1] -> (H, W, 3) uint8."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)
    return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)


def grid(images: list[np.ndarray], cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images into one picture with white gutters."""
    if not images:
        return np.full((8, 8, 3), 255, np.uint8)
    h, w = images[0].shape[:2]
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out
