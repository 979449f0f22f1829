"""Writing curated synthetic pairs for downstream segmentation training.

A *pair* is ``(image, inst, meta)``: image (H, W, 3) uint8 RGB, inst (H, W) integer instance map
(0 = background), meta a dict of provenance (seed, w, sampler, steps, checkpoint names and sha256,
edited, ...). :class:`engine.pipeline.Pair` objects are accepted too.

Instance ids are made consecutive (1..N, keeping the order of the original ids) before anything is
written, so nucleus ``k`` is the same object in every format of a pair:

=========================  ==================================================================
``images/<id>.png``        the RGB image
``labels/<id>.tif``        uint16 instance map (tifffile), 0 = background, nuclei 1..N
``hovernet/<id>.npy``      (H, W, 4) **int32**: channels 0-2 the RGB image (0..255), channel 3
                           the instance map -- the layout HoVer-Net's patch loader expects
                           (``img = x[..., :3]``, ``ann = x[..., 3:]``), without a type channel
``coco.json``              COCO instance segmentation; one category ``nucleus`` (id 1); an
                           annotation per nucleus with polygon ``segmentation`` (x, y pixel
                           centres, i.e. ``col + 0.5, row + 0.5``), ``bbox`` [x, y, w, h] of its
                           pixels, ``area`` = pixel count, ``iscrowd`` 0 and ``instance_id`` = k
``geojson/<id>.geojson``   FeatureCollection for QuPath: one Polygon (MultiPolygon if the nucleus
                           is fragmented) per nucleus, ``objectType`` "annotation",
                           ``classification`` {"name": "Nucleus"}, ``instance_id`` = k
``manifest.csv``           one row per pair: file names, size, n_nuclei, provenance, edited; tile,
                           overlap, windows of an image synthesized as fused windows (else empty)
=========================  ==================================================================

All writers are atomic (engine.fileio.atomic_output): the archive (or folder) is built under a temporary
name next to the target (``.<name>.<random>.tmp``) and renamed into place only when complete; on any
error nothing is left behind. A writer holds a ``flock`` on its temporary while it works (engine.fileio.held_temp);
one that was killed leaves its temporary unlocked, and the next write to the same target removes it first.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from engine.errors import DataError
from engine.fileio import atomic_output, held_temp
from engine.structure import relabel

__all__ = ["ExportPair", "as_pairs", "write_zip", "write_folder", "nucleus_polygons", "MANIFEST_FIELDS"]

#: Columns of manifest.csv, in order.
MANIFEST_FIELDS = ("id", "image", "label", "hovernet", "geojson", "height", "width", "n_nuclei", "sampler",
                   "steps", "w", "seed", "structure_checkpoint", "structure_sha256", "image_checkpoint",
                   "image_sha256", "edited", "source", "tile", "overlap", "windows", "structure_seed",
                   "structure_rebuilt", "label_file", "precision", "colour_prior", "outline_sigma")
#: The columns copied from each pair's provenance (engine.conditioning.Provenance; "" where it has none).
_FROM_META = tuple(k for k in MANIFEST_FIELDS if k not in ("id", "image", "label", "hovernet", "geojson", "height",
                                                          "width", "n_nuclei", "edited"))


@dataclass
class ExportPair:
    """A validated pair ready to write: ids consecutive 1..N."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8
    inst: np.ndarray  # (H, W) int32, 0..N consecutive
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nuclei(self) -> int:
        return int(self.inst.max()) if self.inst.size else 0


def _unpack(item: Any) -> tuple[Any, Any, dict]:
    if hasattr(item, "image") and hasattr(item, "inst"):
        return item.image, item.inst, dict(getattr(item, "meta", {}) or {})
    if isinstance(item, dict):
        return item.get("image"), item.get("inst"), dict(item.get("meta") or {})
    try:
        image, inst, *rest = item
    except (TypeError, ValueError):
        raise DataError(f"not an (image, label, meta) pair: {type(item).__name__}") from None
    return image, inst, dict(rest[0] or {}) if rest else {}


def as_pairs(pairs: Iterable[Any], prefix: str = "pair") -> list[ExportPair]:
    """Validate pairs and give them ids ``<prefix>_0001``...; DataError naming the pair at fault."""
    out: list[ExportPair] = []
    seen: set[str] = set()
    for i, item in enumerate(pairs, start=1):
        image, inst, meta = _unpack(item)
        pid = str(meta.get("id") or f"{prefix}_{i:04d}")
        if not pid.replace("_", "").replace("-", "").isalnum() or pid in seen:
            pid = f"{prefix}_{i:04d}"
        seen.add(pid)
        if image is None or inst is None:
            raise DataError(f"pair {i} ({pid}) has no image or no label")
        image = np.asarray(image)
        inst = np.asarray(inst)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"pair {i} ({pid}): image must be (H, W, 3) RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise DataError(f"pair {i} ({pid}): image must be uint8, got {image.dtype}")
        if inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
            raise DataError(f"pair {i} ({pid}): label must be an (H, W) integer instance map, "
                            f"got shape {inst.shape} {inst.dtype}")
        if inst.shape != image.shape[:2]:
            raise DataError(f"pair {i} ({pid}): label is {inst.shape[0]}x{inst.shape[1]} px but image is "
                            f"{image.shape[0]}x{image.shape[1]} px")
        if inst.size and inst.min() < 0:
            raise DataError(f"pair {i} ({pid}): label has negative ids")
        inst = relabel(inst)
        if inst.max() > np.iinfo(np.uint16).max:
            raise DataError(f"pair {i} ({pid}): more than 65535 nuclei do not fit a 16-bit label")
        out.append(ExportPair(pid, np.ascontiguousarray(image), inst, meta))
    if not out:
        raise DataError("nothing to export: the basket is empty")
    return out


# ----------------------------------------------------------------------------- geometry


def nucleus_polygons(inst: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Outer outlines of every nucleus: id -> list of (K, 2) float arrays of (x, y) pixel centres.

    A nucleus in several pieces has one polygon per piece. Pieces of one or two pixels get the
    outline of their pixel squares so every polygon has at least 3 distinct vertices.
    """
    out: dict[int, list[np.ndarray]] = {}
    ids = np.unique(inst)
    for k in ids[ids > 0]:
        mask = (inst == k).astype(np.uint8)
        found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        polys = []
        for c in found:
            pts = c.reshape(-1, 2).astype(np.float64)
            if len(np.unique(pts, axis=0)) < 3:
                x0, y0 = pts.min(0)
                x1, y1 = pts.max(0) + 1
                polys.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
            else:
                polys.append(pts + 0.5)
        out[int(k)] = polys
    return out


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _color(k: int) -> list[int]:
    h = (k * 0.618033988749895) % 1.0
    import colorsys

    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)]


def _coco(pairs: list[ExportPair], polys: list[dict[int, list[np.ndarray]]]) -> dict:
    images, anns = [], []
    ann_id = 1
    for img_id, (p, pp) in enumerate(zip(pairs, polys), start=1):
        h, w = p.inst.shape
        images.append({"id": img_id, "file_name": f"images/{p.id}.png", "height": h, "width": w,
                       "label_file": f"labels/{p.id}.tif"})
        areas = np.bincount(p.inst.ravel(), minlength=p.n_nuclei + 1)
        for k, rings in pp.items():
            anns.append({"id": ann_id, "image_id": img_id, "category_id": 1, "instance_id": k,
                         "segmentation": [[round(float(v), 2) for v in r.ravel()] for r in rings],
                         "area": int(areas[k]), "bbox": _bbox(p.inst == k), "iscrowd": 0})
            ann_id += 1
    return {"info": {"description": "NuDiff synthetic nuclei pairs", "version": "1.0"},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]}


def _geojson(p: ExportPair, pp: dict[int, list[np.ndarray]]) -> dict:
    feats = []
    for k, rings in pp.items():
        closed = [[[round(float(x), 2), round(float(y), 2)] for x, y in r] + [[round(float(r[0, 0]), 2),
                                                                             round(float(r[0, 1]), 2)]]
                  for r in rings]
        geom = ({"type": "Polygon", "coordinates": [closed[0]]} if len(closed) == 1
                else {"type": "MultiPolygon", "coordinates": [[c] for c in closed]})
        feats.append({"type": "Feature", "id": f"{p.id}-{k}", "geometry": geom,
                      "properties": {"objectType": "annotation", "instance_id": k, "isLocked": False,
                                     "classification": {"name": "Nucleus", "color": _color(k)}}})
    return {"type": "FeatureCollection", "features": feats}


# ----------------------------------------------------------------------------- encoding


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError("could not encode an image as PNG")
    return buf.tobytes()


def _tif(inst: np.ndarray) -> bytes:
    import tifffile

    bio = io.BytesIO()
    tifffile.imwrite(bio, inst.astype(np.uint16), compression="zlib")
    return bio.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, arr, allow_pickle=False)
    return bio.getvalue()


def _hovernet(p: ExportPair) -> np.ndarray:
    return np.concatenate([p.image.astype(np.int32), p.inst[..., None].astype(np.int32)], axis=-1)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(round(v, 6))
    return str(v)


def _manifest(pairs: list[ExportPair], *, hovernet: bool, geojson: bool) -> bytes:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(MANIFEST_FIELDS), lineterminator="\n")
    wr.writeheader()
    for p in pairs:
        m = p.meta
        wr.writerow({
            "id": p.id, "image": f"images/{p.id}.png", "label": f"labels/{p.id}.tif",
            "hovernet": f"hovernet/{p.id}.npy" if hovernet else "",
            "geojson": f"geojson/{p.id}.geojson" if geojson else "",
            "height": p.inst.shape[0], "width": p.inst.shape[1], "n_nuclei": p.n_nuclei,
            **{k: _fmt(m.get(k)) for k in _FROM_META},
            "edited": _fmt(bool(m.get("edited", False))),
        })
    return buf.getvalue().encode()


def write_zip(pairs: Iterable[Any], zip_path: str | os.PathLike, *, hovernet: bool = True, coco: bool = True,
              geojson: bool = True, prefix: str = "pair") -> Path:
    """Write pairs as one zip (see the module docstring for its layout); returns its path.

    Atomic: built as a temporary file beside ``zip_path`` and renamed into place; on any error the
    temporary file is removed and an existing ``zip_path`` is left untouched.
    """
    zip_path = Path(zip_path)
    items = as_pairs(pairs, prefix)
    with held_temp(zip_path, folder=False) as tmp:
        _write_zip(items, zip_path, tmp, hovernet=hovernet, coco=coco, geojson=geojson)
    return zip_path


def _write_zip(items: list[ExportPair], zip_path: Path, tmp: Path, *, hovernet: bool, coco: bool,
               geojson: bool) -> None:
    with atomic_output(zip_path, temp=tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            polys = [nucleus_polygons(p.inst) for p in items] if (coco or geojson) else []
            for i, p in enumerate(items):
                zf.writestr(f"images/{p.id}.png", _png(p.image), compress_type=zipfile.ZIP_STORED)
                zf.writestr(f"labels/{p.id}.tif", _tif(p.inst))
                if hovernet:
                    zf.writestr(f"hovernet/{p.id}.npy", _npy(_hovernet(p)))
                if geojson:
                    zf.writestr(f"geojson/{p.id}.geojson", json.dumps(_geojson(p, polys[i])))
            if coco:
                zf.writestr("coco.json", json.dumps(_coco(items, polys)))
            zf.writestr("manifest.csv", _manifest(items, hovernet=hovernet, geojson=geojson))


def write_folder(pairs: Iterable[Any], folder: str | os.PathLike, *, prefix: str = "pair") -> Path:
    """Write ``images/<id>.png``, ``labels/<id>.tif`` and ``manifest.csv`` into a new folder.

    The result is a labeled folder that :func:`engine.data.load_folder` reads (e.g. to train on real
    plus synthetic tiles). The folder must not exist or be empty; it is built under a temporary name
    and renamed, so on error nothing is left.
    """
    folder = Path(folder)
    items = as_pairs(pairs, prefix)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"output folder {folder} already exists and is not empty")
    with held_temp(folder, folder=True) as tmp, atomic_output(folder, temp=tmp):
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for p in items:
            (tmp / "images" / f"{p.id}.png").write_bytes(_png(p.image))
            (tmp / "labels" / f"{p.id}.tif").write_bytes(_tif(p.inst))
        (tmp / "manifest.csv").write_bytes(_manifest(items, hovernet=False, geojson=False))
    return folder


# ----------------------------------------------------------------------------- safe unzip
