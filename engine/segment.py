"""Lightweight nuclei segmenter in the HoVer-Net spirit, for the downstream "does augmentation help?"
benchmark and for scoring synthetic sets.

A small U-Net maps an RGB image to its nuclei structure (see :mod:`engine.structure`): a semantic logit
and the horizontal / vertical distance maps (tanh, in [-1, 1]). Loss (HoVer-Net's, all weights 1 by
default): BCE + soft Dice on the semantic channel, MSE of the distance maps inside nuclei and the MSE of
their Sobel gradients inside nuclei (MSGE). Instances come from :func:`engine.structure.structure_to_instances`.

Training samples random ``size`` crops (area-weighted over pairs), random flips / rot90 applied
consistently to the image and to the structure (the distance maps are moved, swapped and negated so the
result equals the structure of the transformed instance map), and a mild colour jitter. ``augment="strong"``
adds HoVer-Net's photometric augmentations to the image only (hue, saturation, brightness, contrast, then
a Gaussian blur or additive noise), which leave the structure unchanged.
Inference on images of any size runs overlapping tiles blended with a tapered window.

A trained segmenter is saved as ``<stem>.safetensors`` (weights) + ``<stem>.json`` (config, training
record, SHA-256 of the weights), written atomically, never pickled.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import load_optimizer, optimizer_tensors
from engine.errors import CheckpointError, DataError, NuDiffError, TrainingError
from engine.fileio import (atomic_write_bytes, check_format, read_json_record, resolve_device, safetensors_bytes,
                           safetensors_paths)
from engine.structure import dihedral, instances_to_structure, structure_to_instances

__all__ = ["SegmenterConfig", "SegNet", "Segmenter", "train_segmenter", "snapshot_step", "as_image_label_pairs",
           "dihedral", "segmenter_paths", "FORMAT"]

FORMAT = 1
KIND = "segmenter"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture, inference and post-processing settings (stored with the weights).

    base_channels: channels of the first level; level i has ``base_channels * 2**i`` (i = 0..depth).
    depth: number of 2x downsamplings (input sides are padded to a multiple of ``2**depth``).
    groups: GroupNorm groups (must divide base_channels).
    tile / overlap: inference tile side and overlap in px (tile rounded up to a multiple of ``2**depth``).
    core, edge, min_size, min_marker, smooth: :func:`structure_to_instances` parameters. Predicted distance maps are
        smoother than exact ones (their drop between touching nuclei is spread over several pixels), so the
        defaults use lower core / edge thresholds than the engine's, and no smoothing.
    loss_weights: (bce, dice, mse, msge).
    """

    base_channels: int = 16
    depth: int = 3
    groups: int = 8
    tile: int = 256
    overlap: int = 64
    core: float = 0.2
    edge: float = 0.15
    min_size: int = 10
    min_marker: int = 2
    smooth: float = 0.0
    loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.base_channels < 1 or self.depth < 0 or self.groups < 1 or self.base_channels % self.groups:
            raise NuDiffError(f"invalid segmenter architecture: base_channels={self.base_channels}, "
                              f"depth={self.depth}, groups={self.groups} (groups must divide base_channels)")
        if self.tile < 2 ** self.depth or not 0 <= self.overlap < self.tile:
            raise NuDiffError(f"invalid inference tiling: tile={self.tile}, overlap={self.overlap}")

    @property
    def multiple(self) -> int:
        """Input sides must be a multiple of this."""
        return 2 ** self.depth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmenterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)


# ----------------------------------------------------------------------------- network


class _Block(nn.Module):
    """(Conv3x3 - GroupNorm - SiLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(groups, out_ch), nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.GroupNorm(groups, out_ch), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SegNet(nn.Module):
    """Plain U-Net: (B, 3, H, W) normalised image -> (B, 3, H, W): semantic logit, tanh h, tanh v.

    H and W must be multiples of ``2**depth``.
    """

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        chs = [cfg.base_channels * 2 ** i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([_Block(3, chs[0], cfg.groups)] +
                                  [_Block(chs[i - 1], chs[i], cfg.groups) for i in range(1, len(chs))])
        self.up = nn.ModuleList([nn.Conv2d(chs[i], chs[i - 1], 1) for i in range(len(chs) - 1, 0, -1)])
        self.dec = nn.ModuleList([_Block(2 * chs[i - 1], chs[i - 1], cfg.groups)
                                  for i in range(len(chs) - 1, 0, -1)])
        self.head = nn.Conv2d(chs[0], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x = dec(torch.cat([x, skip], dim=1))
        out = self.head(x)
        return torch.cat([out[:, :1], torch.tanh(out[:, 1:])], dim=1)


def _normalise(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 (or float in 0..255) -> float32 in about [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- data


def as_image_label_pairs(pairs: Sequence[Any], what: str = "training pairs") -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate pairs given as (image, inst[, meta]) tuples, dicts or objects with ``.image`` / ``.inst``
    (Tile, LabeledImage, Pair) -> [(image (H, W, 3) uint8, inst (H, W) int32)]. DataError if malformed."""
    out = []
    for k, item in enumerate(pairs):
        if hasattr(item, "image") and hasattr(item, "inst"):
            image, inst = item.image, item.inst
        elif isinstance(item, dict):
            image, inst = item.get("image"), item.get("inst")
        else:
            try:
                image, inst = item[0], item[1]
            except (TypeError, IndexError, KeyError):
                raise DataError(f"{what}: item {k} is not an (image, label) pair") from None
        image, inst = np.asarray(image), np.asarray(inst)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"{what}: item {k} image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if inst.shape != image.shape[:2] or not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
            raise DataError(f"{what}: item {k} label must be an (H, W) integer map matching its "
                            f"{image.shape[0]}x{image.shape[1]} image, got {inst.shape} {inst.dtype}")
        if inst.size and inst.min() < 0:
            raise DataError(f"{what}: item {k} label has negative ids")
        out.append((image, inst.astype(np.int32, copy=False)))
    if not out:
        raise DataError(f"no {what}")
    return out


@dataclass
class _Sampler:
    """Random training crops from pairs held in memory (structures quantised to int8 to save memory)."""

    images: list[np.ndarray]
    structures: list[np.ndarray]  # (H, W, 3) int8 = round(structure * 127)
    weights: np.ndarray  # (n,) sampling probabilities (area-weighted)
    size: int
    jitter: float
    augment: str = "light"

    @classmethod
    def build(cls, pairs: list[tuple[np.ndarray, np.ndarray]], size: int, jitter: float,
              pair_weights: Sequence[float] | None = None, augment: str = "light") -> "_Sampler":
        images, structures, areas = [], [], []
        for image, inst in pairs:
            image, inst = _pad_to(image, inst, size)
            s = instances_to_structure(inst)
            images.append(image)
            structures.append(np.round(s * 127.0).astype(np.int8))
            areas.append(float(inst.size))
        w = np.asarray(areas)
        if pair_weights is not None:
            w = w * np.asarray(pair_weights, np.float64)
        return cls(images, structures, w / w.sum(), size, jitter, augment)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, S, S) float32 normalised images and (n, 3, S, S) float32 structures."""
        xs, ys = [], []
        for i in rng.choice(len(self.images), size=n, p=self.weights):
            image, s = self.images[i], self.structures[i]
            y = int(rng.integers(0, image.shape[0] - self.size + 1))
            x = int(rng.integers(0, image.shape[1] - self.size + 1))
            crop = image[y : y + self.size, x : x + self.size]
            scrop = s[y : y + self.size, x : x + self.size].astype(np.float32) / 127.0
            crop, scrop = dihedral(crop, scrop, int(rng.integers(0, 4)), bool(rng.integers(0, 2)))
            if self.augment == "strong":
                crop = _photometric(crop, rng)
            xs.append(_jitter(_normalise(crop), rng, self.jitter))
            ys.append(scrop)
        return (np.stack(xs).transpose(0, 3, 1, 2).copy(), np.stack(ys).transpose(0, 3, 1, 2).copy())


def _pad_to(image: np.ndarray, inst: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a pair smaller than size x size: image with its median colour, label with background."""
    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not ph and not pw:
        return image, inst
    fill = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    out = np.empty((image.shape[0] + ph, image.shape[1] + pw, 3), np.uint8)
    out[:] = fill
    out[: image.shape[0], : image.shape[1]] = image
    return out, np.pad(inst, ((0, ph), (0, pw)))


def _jitter(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-channel gain / offset colour jitter of a normalised (H, W, 3) image."""
    if strength <= 0:
        return x
    gain = 1.0 + rng.uniform(-strength, strength, size=3).astype(np.float32)
    offset = rng.uniform(-strength, strength, size=3).astype(np.float32)
    return x * gain + offset


AUGMENTS = ("light", "strong")

# RGB <-> YIQ: hue is the angle and saturation the length of (I, Q)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def _photometric(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HoVer-Net's photometric training augmentations of one (S, S, 3) uint8 crop -> float32 in 0..255.

    Hue turned by up to +-8 degrees, saturation x 0.8..1.2, contrast x 0.75..1.25 about the mean, brightness
    +-26 (of 255); then, a third of the time each, a Gaussian blur (sigma 0.5..1.5 px), additive Gaussian
    noise (sd up to 0.05 x 255), or neither. Geometry is untouched, so the label stays valid.
    """
    from scipy.ndimage import gaussian_filter

    yiq = crop.astype(np.float32) @ _RGB2YIQ.T
    angle = np.deg2rad(rng.uniform(-8.0, 8.0))
    sat = rng.uniform(0.8, 1.2)
    c, s = np.cos(angle) * sat, np.sin(angle) * sat
    i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
    yiq[..., 1], yiq[..., 2] = c * i - s * q, s * i + c * q
    x = yiq @ _YIQ2RGB.T
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-26.0, 26.0)
    kind = rng.random()
    if kind < 1 / 3:
        x = gaussian_filter(x, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0,))
    elif kind < 2 / 3:
        x = x + rng.normal(0.0, rng.uniform(0.0, 0.05 * 255.0), size=x.shape).astype(np.float32)
    return np.clip(x, 0.0, 255.0).astype(np.float32)


# ----------------------------------------------------------------------------- loss


def _sobel(kind: str, device: torch.device) -> torch.Tensor:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device)
    return (k if kind == "x" else k.T).reshape(1, 1, 3, 3)


def segmentation_loss(out: torch.Tensor, target: torch.Tensor,
                      weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net style loss of a (B, 3, H, W) prediction against a (B, 3, H, W) structure target.

    Returns (scalar loss, parts): BCE + soft Dice on the semantic logit; MSE of the h / v maps and of
    their Sobel gradients (d/dx of h, d/dy of v), both averaged over nucleus pixels only.
    """
    fg = (target[:, :1] > 0).float()
    bce = F.binary_cross_entropy_with_logits(out[:, :1], fg)
    prob = torch.sigmoid(out[:, :1])
    dice = 1.0 - (2.0 * (prob * fg).sum() + 1.0) / (prob.sum() + fg.sum() + 1.0)
    n_fg = fg.sum().clamp_min(1.0)
    mse = (((out[:, 1:] - target[:, 1:]) ** 2) * fg).sum() / (2.0 * n_fg)
    sx, sy = _sobel("x", out.device), _sobel("y", out.device)
    grad_pred = torch.cat([F.conv2d(out[:, 1:2], sx, padding=1), F.conv2d(out[:, 2:3], sy, padding=1)], 1)
    grad_true = torch.cat([F.conv2d(target[:, 1:2], sx, padding=1), F.conv2d(target[:, 2:3], sy, padding=1)], 1)
    msge = (((grad_pred - grad_true) ** 2) * fg).sum() / (2.0 * n_fg)
    parts = {"bce": bce, "dice": dice, "mse": mse, "msge": msge}
    loss = sum(w * p for w, p in zip(weights, parts.values()))
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------- segmenter


#: (weights .safetensors, record .json) of a segmenter given its stem or either file
segmenter_paths = safetensors_paths


@dataclass
class Segmenter:
    """A trained segmenter: network (eval mode) on ``device``, its config and training record."""

    net: SegNet
    config: SegmenterConfig
    device: torch.device
    record: dict[str, Any] = field(default_factory=dict)  # training settings, loss history, ...

    def predict_structure(self, image: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
        """(H, W, 3) uint8 RGB image of any size -> (H, W, 3) float32 structure in [-1, 1]
        (semantic = 2 * probability - 1, then h, v), by overlapping tiles blended with a tapered window."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
        h, w = image.shape[:2]
        m = self.config.multiple
        tile = int(math.ceil(self.config.tile / m) * m)
        tile = min(tile, int(math.ceil(max(h, w) / m) * m))
        ph, pw = max(tile, _ceil_to(h, m)), max(tile, _ceil_to(w, m))
        x = np.pad(_normalise(image), ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric")
        overlap = min(self.config.overlap, tile // 2)
        ys, xs = _positions(ph, tile, tile - overlap), _positions(pw, tile, tile - overlap)
        window = _window(tile, overlap)
        acc = np.zeros((3, ph, pw), np.float32)
        wsum = np.zeros((ph, pw), np.float32)
        boxes = [(y, x0) for y in ys for x0 in xs]
        self.net.eval()
        with torch.inference_mode():
            for start in range(0, len(boxes), batch_size):
                chunk = boxes[start : start + batch_size]
                batch = np.stack([x[y : y + tile, x0 : x0 + tile] for y, x0 in chunk]).transpose(0, 3, 1, 2)
                out = self.net(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)).float()
                out[:, 0] = torch.sigmoid(out[:, 0]) * 2.0 - 1.0
                out = out.cpu().numpy()
                for (y, x0), o in zip(chunk, out):
                    acc[:, y : y + tile, x0 : x0 + tile] += o * window
                    wsum[y : y + tile, x0 : x0 + tile] += window
        maps = acc / wsum[None]
        return np.ascontiguousarray(maps[:, :h, :w].transpose(1, 2, 0))

    def instances(self, structure: np.ndarray) -> np.ndarray:
        """Post-process a predicted structure -> (H, W) int32 instance map."""
        c = self.config
        return structure_to_instances(structure, core=c.core, edge=c.edge, min_size=c.min_size,
                                      min_marker=c.min_marker, smooth=c.smooth)

    def predict(self, image: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 instance map (0 = background, ids 1..N)."""
        return self.instances(self.predict_structure(image, batch_size=batch_size))

    def to(self, device: str | torch.device) -> "Segmenter":
        self.device = resolve_device(device)
        self.net.to(self.device)
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``<stem>.safetensors`` + ``<stem>.json`` atomically (JSON last); returns the JSON path."""
        import engine

        weights, record_path = segmenter_paths(path)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.net.state_dict().items()}
        blob = safetensors_bytes(tensors, {"format": str(FORMAT), "kind": KIND})
        atomic_write_bytes(weights, blob)
        record = {"format": FORMAT, "kind": KIND, "engine_version": engine.__version__,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "config": self.config.to_dict(), "weights_file": weights.name,
                  "weights_sha256": hashlib.sha256(blob).hexdigest(), "train": self.record}
        atomic_write_bytes(record_path, json.dumps(record, indent=2, default=_json_default).encode())
        return record_path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> "Segmenter":
        """Read a segmenter written by :meth:`save`; CheckpointError naming the file on any problem."""
        from safetensors.torch import load as st_load

        weights, record_path = segmenter_paths(path)
        for p in (record_path, weights):
            if not p.is_file():
                raise CheckpointError(f"segmenter file not found: {p} (a segmenter is .safetensors + .json)")
        record = read_json_record(record_path, "segmenter record")
        if not isinstance(record, dict) or record.get("kind") != KIND:
            kind = record.get("kind") if isinstance(record, dict) else None
            raise CheckpointError(f"{record_path} is not a segmenter (kind {kind!r})")
        check_format(record, FORMAT, record_path)
        blob = weights.read_bytes()
        if record.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != record["weights_sha256"]:
            raise CheckpointError(f"{weights} does not match its record (corrupt or replaced file)")
        try:
            cfg = SegmenterConfig.from_dict(record.get("config", {}))
            net = SegNet(cfg)
            net.load_state_dict(st_load(blob))
        except (NuDiffError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load segmenter {weights}: {str(e).splitlines()[0]}") from None
        dev = resolve_device(device)
        net.to(dev).eval()
        return cls(net, cfg, dev, dict(record.get("train", {})))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _ceil_to(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _positions(length: int, size: int, stride: int) -> list[int]:
    """Tile origins covering [0, length): a regular grid plus one flush with the far end."""
    pos = list(range(0, length - size + 1, max(1, stride)))
    if pos[-1] != length - size:
        pos.append(length - size)
    return pos


def _window(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32 blending weights: 1 in the centre, linear ramp over ``overlap`` px to the edge
    (never 0, so every pixel covered by any tile gets a defined value)."""
    d = np.minimum(np.arange(tile), np.arange(tile)[::-1]).astype(np.float32)
    ramp = np.clip((d + 1.0) / (overlap + 1.0), 1.0 / (overlap + 1.0), 1.0) if overlap else np.ones(tile, np.float32)
    return np.outer(ramp, ramp).astype(np.float32)


# ----------------------------------------------------------------------------- training


def train_segmenter(
    train_pairs: Sequence[Any],
    *,
    size: int = 128,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    config: SegmenterConfig | None = None,
    jitter: float = 0.08,
    weight_decay: float = 1e-4,
    pair_weights: Sequence[float] | None = None,
    augment: str = "light",
    snapshot: str | Path | None = None,
    snapshot_every: int = 200,
) -> Segmenter:
    """Train a segmenter from scratch on labeled pairs.

    Args:
        train_pairs: (image (H, W, 3) uint8, inst (H, W) int) pairs, or Tile / LabeledImage / Pair objects;
            any sizes (pairs smaller than ``size`` are padded with background).
        size: training crop side in px (rounded up to a multiple of ``2**config.depth``).
        steps, batch_size, lr: AdamW steps (cosine decay to lr/20 after a short warm-up), crops per step.
        seed: seeds the weights, crop and augmentation draws (same seed + data -> same model on CPU).
        device: "auto", "cpu", "cuda", ...
        progress: called as progress(step, steps) after each step.
        jitter: strength of the per-channel colour gain / offset jitter (0 = off).
        pair_weights: optional relative sampling weight of each pair (multiplies its area; default: crops
            are drawn area-weighted over all pairs).
        augment: "light" (flips, quarter turns, colour jitter) or "strong" (also HoVer-Net's hue, saturation,
            brightness, contrast, blur and noise augmentations, see :func:`_photometric`).
        snapshot: optional file (safetensors: weights, optimizer, schedule, random states, loss history) written
            atomically every ``snapshot_every`` steps and at the end. A call that finds one made with the same
            settings and pairs continues from it, and ends with the very model an uninterrupted call makes;
            one made otherwise, or unreadable, is ignored and overwritten. The file is left in place: delete
            it once the model is saved.
    Returns:
        Segmenter in eval mode; ``record["loss"]`` holds the loss of every step.
    Raises:
        DataError for malformed pairs; TrainingError if the loss becomes NaN.
    """
    cfg = config or SegmenterConfig()
    pairs = as_image_label_pairs(train_pairs)
    if pair_weights is not None:
        pw = np.asarray(pair_weights, np.float64)
        if pw.shape != (len(pairs),) or not np.isfinite(pw).all() or pw.min() < 0 or pw.sum() <= 0:
            raise NuDiffError(f"pair_weights must be {len(pairs)} non-negative numbers, not all 0")
    if augment not in AUGMENTS:
        raise NuDiffError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if steps < 1 or batch_size < 1 or lr <= 0 or snapshot_every < 1:
        raise NuDiffError(f"steps, batch_size and snapshot_every must be >= 1 and lr > 0 "
                          f"(got {steps}, {batch_size}, {snapshot_every}, {lr})")
    size = _ceil_to(max(int(size), cfg.multiple), cfg.multiple)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = _Sampler.build(pairs, size, jitter, pair_weights, augment)
    net = SegNet(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, steps, warm))
    losses: list[float] = []
    start, spent = 1, 0.0
    if snapshot is not None:
        snapshot = Path(snapshot)
        key = _snapshot_key(pairs, cfg, size=size, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            jitter=jitter, weight_decay=weight_decay, pair_weights=pair_weights, augment=augment)
        state = _load_snapshot(snapshot, key, net, opt, sched, rng)
        if state is not None:
            start, spent, losses = state["step"] + 1, state["seconds"], state["loss"]
    t0 = time.time()
    net.train()
    for step in range(start, steps + 1):
        xb, yb = sampler.batch(rng, batch_size)
        out = net(torch.from_numpy(xb).to(dev))
        loss, _ = segmentation_loss(out, torch.from_numpy(yb).to(dev), cfg.loss_weights)
        if not torch.isfinite(loss):
            raise TrainingError(f"segmenter loss became {float(loss)} at step {step}; try a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if snapshot is not None and (step % snapshot_every == 0 or step == steps):
            _save_snapshot(snapshot, key, step, spent + time.time() - t0, losses, net, opt, sched, rng)
        if progress is not None:
            progress(step, steps)
    net.eval()
    record = {"size": size, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "jitter": jitter,
              "augment": augment,
              "n_pairs": len(pairs), "seconds": round(spent + time.time() - t0, 2), "device": str(dev),
              "loss": [round(v, 5) for v in losses]}
    return Segmenter(net, cfg, dev, record)


def _lr_factor(i: int, steps: int, warm: int) -> float:
    """Linear warm-up over ``warm`` steps, then cosine decay from 1 to 0.05."""
    if i < warm:
        return (i + 1) / warm
    t = (i - warm) / max(1, steps - warm)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------- resumable training


def _snapshot_key(pairs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: SegmenterConfig,
                  **settings: Any) -> str:
    """Digest of everything a training's result depends on: its settings, the network config and the
    pairs' pixels, in order."""
    h = hashlib.sha256(json.dumps({**settings, "config": cfg.to_dict()}, sort_keys=True,
                                  default=_json_default).encode())
    for image, inst in pairs:
        for a in (image, inst):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _save_snapshot(path: Path, key: str, step: int, seconds: float, losses: list[float], net: nn.Module,
                   opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   rng: np.random.Generator) -> None:
    """One file (atomic): tensors = weights, optimizer moments, torch's random state; metadata "state" =
    JSON of the step, seconds so far, loss history, optimizer groups, schedule and numpy generator state."""
    tensors = {f"net.{k}": v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    optim, groups = optimizer_tensors(opt)
    tensors.update(optim)
    tensors["rng.torch"] = torch.get_rng_state()
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    state = {"key": key, "step": step, "seconds": seconds, "loss": losses, "param_groups": groups,
             "schedule": sched_state, "numpy": rng.bit_generator.state}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, {"kind": "segmenter-training", "state": json.dumps(state)}))


def _snapshot_state(f: Any) -> Any:
    """The JSON "state" of an open snapshot (safetensors ``safe_open`` handle); None when it has none."""
    return json.loads((f.metadata() or {}).get("state", "null"))


def snapshot_step(path: str | Path) -> int | None:
    """The step a training snapshot (``train_segmenter(snapshot=...)``) was written at; None if unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(_snapshot_state(f)["step"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError):
        return None


def _load_snapshot(path: Path, key: str, net: nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator) -> dict | None:
    """Restore a snapshot of this very training into net / opt / sched / rng and return its state (step,
    seconds, loss); None (nothing changed) when there is none, it is unreadable or it is another training's."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            state = _snapshot_state(f)
            if not isinstance(state, dict) or state.get("key") != key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError):  # (JSONDecodeError is a ValueError)
        return None
    before = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()),
              torch.get_rng_state(), rng.bit_generator.state)
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
        load_optimizer(opt, tensors, groups)
        sched.load_state_dict({**state["schedule"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
        torch.set_rng_state(tensors["rng.torch"])
        rng.bit_generator.state = state["numpy"]
        return {"step": int(state["step"]), "seconds": float(state["seconds"]),
                "loss": [float(v) for v in state["loss"]]}
    except (ValueError, KeyError, TypeError, RuntimeError):  # a damaged snapshot: start afresh, as before it
        net.load_state_dict(before[0])
        opt.load_state_dict(before[1])
        sched.load_state_dict(before[2])
        torch.set_rng_state(before[3])
        rng.bit_generator.state = before[4]
        return None
