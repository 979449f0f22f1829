"""Tile descriptors for clustering-based subset selection.

Two kinds:

* ``"resnet50"``: globally pooled ImageNet ResNet50 features (2048-d), as in the NuDiff paper. Used
  only when torchvision is importable AND the weights file is already in the local torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/resnet50-*.pth``). Nothing is ever downloaded.
* ``"handcrafted"``: a built-in colour / texture / density descriptor (no extra dependencies).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from skimage.color import rgb2hed
from skimage.feature import local_binary_pattern

__all__ = [
    "FEATURE_KINDS",
    "resnet50_weights_path",
    "available_feature_kind",
    "handcrafted_features",
    "resnet50_features",
    "tile_features",
]

FEATURE_KINDS = ("resnet50", "handcrafted")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_GRAD_EDGES = np.array([0, 4, 8, 16, 32, 64, 128, 256, np.inf], dtype=np.float64)
_LBP_POINTS = 8


def resnet50_weights_path() -> Path | None:
    """Cached torchvision ResNet50 ImageNet weights file, or None if torchvision or the file is
    missing. Never downloads."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    files = sorted(folder.glob("resnet50-*.pth")) if folder.is_dir() else []
    return files[0] if files else None


def available_feature_kind() -> str:
    """``"resnet50"`` when its weights are available locally, else ``"handcrafted"``."""
    return "resnet50" if resnet50_weights_path() is not None else "handcrafted"


def _one_handcrafted(image: np.ndarray, inst: np.ndarray | None) -> np.ndarray:
    """(31,) float64 descriptor of one (H, W, 3) uint8 tile and its optional (H, W) label."""
    rgb = image.astype(np.float32)
    colour = np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1))]) / 255.0
    hed = rgb2hed(image)[..., :2]  # hematoxylin, eosin optical densities
    stain = np.concatenate([hed.mean(axis=(0, 1)), hed.std(axis=(0, 1))])
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.histogram(np.hypot(gx, gy), bins=_GRAD_EDGES)[0] / gray.size
    half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    lbp = local_binary_pattern(half, _LBP_POINTS, 1, method="uniform")  # at half resolution
    texture = np.bincount(lbp.astype(np.int64).ravel(), minlength=_LBP_POINTS + 2) / half.size
    density = np.zeros(3)
    if inst is not None:
        areas = np.bincount(inst.ravel())[1:]
        areas = areas[areas > 0]
        density = np.array([
            len(areas) * 1.0e4 / inst.size,  # nuclei per 100x100 px
            areas.sum() / inst.size,  # foreground fraction
            np.log1p(areas.mean()) if len(areas) else 0.0,  # typical nucleus size
        ])
    return np.concatenate([colour, stain, grad, texture, density]).astype(np.float64)


def handcrafted_features(images: Sequence[np.ndarray],
                         insts: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(N, 31) float64 z-scored descriptors: RGB mean/std, H&E (rgb2hed) mean/std, gradient
    magnitude histogram, uniform-LBP histogram (at half resolution), and nuclei density / cover /
    size from labels.

    Each column is standardised over the N tiles (constant columns become 0).
    """
    if len(images) == 0:
        return np.zeros((0, 31))
    rows = [_one_handcrafted(im, None if insts is None else insts[i])
            for i, im in enumerate(images)]
    feats = np.stack(rows)
    std = feats.std(axis=0)
    return (feats - feats.mean(axis=0)) / np.where(std > 0, std, 1.0)


def resnet50_features(images: Sequence[np.ndarray], weights: Path,
                      batch_size: int = 16) -> np.ndarray:
    """(N, 2048) float64 globally pooled ImageNet ResNet50 features of (H, W, 3) uint8 tiles.

    ``weights`` is a torchvision ResNet50 state dict file (requires torchvision; runs on CPU).
    """
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = np.stack(images[start : start + batch_size]).astype(np.float32) / 255.0
            batch = (batch - _IMAGENET_MEAN) / _IMAGENET_STD
            tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
            out.append(model(tensor).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


def tile_features(images: Sequence[np.ndarray], insts: Sequence[np.ndarray] | None = None,
                  kind: str | None = None) -> tuple[np.ndarray, str]:
    """Descriptors of N tiles -> ((N, D) float64, kind used).

    ``kind`` None picks ``available_feature_kind()``; "resnet50" without local weights raises
    RuntimeError.
    """
    kind = kind or available_feature_kind()
    if kind == "resnet50":
        weights = resnet50_weights_path()
        if weights is None:
            raise RuntimeError("ResNet50 features need torchvision and cached ImageNet weights")
        return resnet50_features(images, weights), kind
    if kind == "handcrafted":
        return handcrafted_features(images, insts), kind
    raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
