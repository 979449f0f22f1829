"""A pre-flight report of a labeled-tile folder: images, tiles, nuclei, nucleus areas and problems."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import LabeledImage, Problem, load_folder, tile_positions

__all__ = ["Inspection", "inspect_folder", "inspect_items"]

@dataclass
class Inspection:
    """What a folder holds, for a pre-flight report."""

    folder: Path
    n_images: int
    n_tiles: int  # tiles the folder yields at (tile_size, stride)
    n_nuclei: int  # instances over whole images (tiles overlap, so not per tile)
    areas: np.ndarray  # (n_nuclei,) int64 nucleus areas in pixels
    image_sizes: list[tuple[int, int]]  # (H, W) per image
    problems: list[Problem]
    tile_size: int = 256
    stride: int = 128

    def summary(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"Folder: {self.folder}", f"Images: {self.n_images} ({self._sizes_text()})",
                 f"Tiles: {self.n_tiles} ({self.tile_size}x{self.tile_size} px, stride "
                 f"{self.stride})"]
        per_image = self.n_nuclei / self.n_images if self.n_images else 0.0
        lines.append(f"Nuclei: {self.n_nuclei} ({per_image:.1f} per image on average)")
        if len(self.areas):
            pct = np.percentile(self.areas, [0, 5, 25, 50, 75, 95, 100])
            lines.append("Nucleus area (px): min {:.0f}, p5 {:.0f}, p25 {:.0f}, median {:.0f}, "
                         "p75 {:.0f}, p95 {:.0f}, max {:.0f}".format(*pct))
        errors = sum(p.severity == "error" for p in self.problems)
        warns = len(self.problems) - errors
        lines.append(f"Problems: {errors} error(s), {warns} warning(s)")
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)

    def _sizes_text(self) -> str:
        counts: dict[tuple[int, int], int] = {}
        for hw in self.image_sizes:
            counts[hw] = counts.get(hw, 0) + 1
        return ", ".join(f"{n} x {h}x{w} px" for (h, w), n in sorted(counts.items()))


def inspect_folder(folder: str | Path, size: int = 256, stride: int = 128) -> Inspection:
    """Load a folder and summarise it (counts, nucleus areas, problems) without keeping tiles.

    Raises DataError as load_folder does.
    """
    items, problems = load_folder(folder)
    return inspect_items(folder, items, problems, size=size, stride=stride)


def inspect_items(folder: str | Path, items: Sequence[LabeledImage], problems: list[Problem],
                  size: int = 256, stride: int = 128) -> Inspection:
    """inspect_folder's report from what load_folder(folder) returned (to use the images for more than the
    report without reading the folder twice). Images smaller than a tile are added to ``problems``."""
    n_tiles = 0
    for item in items:
        height, width = item.inst.shape
        if size > height or size > width:
            problems.append(Problem(str(item.image_path), f"image {item.image_path} is "
                                    f"{height}x{width} px, smaller than the tile size of {size} px",
                                    "error"))
            continue
        n_tiles += len(tile_positions(height, size, stride)) * len(
            tile_positions(width, size, stride))
    areas = [np.bincount(item.inst.ravel())[1:] for item in items]
    all_areas = np.concatenate(areas).astype(np.int64) if areas else np.zeros(0, np.int64)
    return Inspection(folder=Path(folder), n_images=len(items), n_tiles=n_tiles,
                      n_nuclei=len(all_areas), areas=all_areas,
                      image_sizes=[tuple(item.inst.shape) for item in items], problems=problems,
                      tile_size=size, stride=stride)
