"""QuPath GeoJSON outlines read as a nuclei instance map.

A label file may be a GeoJSON FeatureCollection, a bare list of Features or one Feature, as QuPath
exports them: one Feature per nucleus (annotations and detections alike; a cell's ``nucleusGeometry``
is used instead of its cell boundary). :func:`rasterise_geojson` fills each outline with its own id in
file order; features without an area (points, lines) are skipped with a note. Coordinates are pixels
from the image's top-left corner, in pixel-edge units (see :func:`_fill_polygon`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from engine.errors import DataError

__all__ = ["looks_like_geojson", "rasterise_geojson", "MAX_LABEL_PIXELS"]

#: Largest label map (H * W pixels) a GeoJSON outline file may ask for; refused before allocating.
MAX_LABEL_PIXELS = 20000 * 20000

_AREA_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection")
_NON_AREA_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")
_DETECTION_TYPES = ("detection", "cell", "tile")
_GEOJSON_SNIFF = re.compile(rb'"type"\s*:\s*"Feature(Collection)?"')
_Polygon = tuple[np.ndarray, list[np.ndarray]]  # outer ring, hole rings: (K, 2) float (x, y)


def looks_like_geojson(path: Path) -> bool:
    """Cheap sniff (first 64 KiB) for a ``.json`` file in a folder of labels."""
    try:
        with open(path, "rb") as f:
            return _GEOJSON_SNIFF.search(f.read(1 << 16)) is not None
    except OSError:
        return False


def _geojson_features(path: Path) -> list:
    """The Features of a GeoJSON FeatureCollection, a bare list of Features or a single Feature."""
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"label {path} is not valid JSON ({exc})") from None
    expected = "expected a GeoJSON FeatureCollection or a list of Features, one per nucleus"
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError(f"label {path} is a FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in _AREA_TYPES + _NON_AREA_TYPES:
        raise DataError(f"label {path} is a bare {data['type']} geometry; {expected}")
    else:
        found = (f"an object with keys {', '.join(map(str, list(data)[:5])) or 'none'}"
                 if isinstance(data, dict) else f"a JSON {type(data).__name__}")
        raise DataError(f"label {path} is JSON but not GeoJSON ({found}); {expected}")
    for i, feature in enumerate(features, start=1):
        if not isinstance(feature, dict) or (feature.get("type") != "Feature"
                                             and "geometry" not in feature):
            raise DataError(f"label {path}: item {i} of the feature list is not a GeoJSON Feature")
    return features


def _object_type(feature: dict) -> str:
    """QuPath's ``objectType`` (``object_type`` before v0.3), lower case; "" if absent."""
    props = feature.get("properties")
    if not isinstance(props, dict):
        return ""
    return str(props.get("objectType") or props.get("object_type") or "").lower()


def _feature_name(i: int, feature: dict) -> str:
    fid = feature.get("id")
    return f"feature {i}" + (f" (id {str(fid)[:40]})" if fid not in (None, "") else "")


def _ring(coords, path: Path, name: str) -> np.ndarray:
    """A GeoJSON linear ring -> (K, 2) float (x, y); DataError if malformed or off-image."""
    try:
        arr = np.array(coords)
    except ValueError:  # ragged
        arr = np.zeros(0)
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iuf":
        raise DataError(f"label {path}: {name} has a malformed ring (expected a list of numeric "
                        "[x, y] pairs)")
    arr = arr[:, :2].astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"label {path}: {name} has a NaN or infinite coordinate")
    if arr.min() < 0:
        x, y = arr[np.argmin(arr.min(axis=1))]
        raise DataError(f"label {path}: {name} has a negative coordinate (x={x:g}, y={y:g}); "
                        "expected pixels from the image's top-left corner")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    if len(np.unique(arr, axis=0)) < 3:
        raise DataError(f"label {path}: {name} has a ring with fewer than 3 distinct points")
    return arr


def _polygon(coords, path: Path, name: str) -> _Polygon:
    if not isinstance(coords, list) or not coords:
        raise DataError(f"label {path}: {name} has a malformed Polygon (expected a list of rings)")
    rings = [_ring(r, path, name) for r in coords]
    return rings[0], rings[1:]


def _geometry_polygons(geom, path: Path, name: str) -> list[_Polygon] | str:
    """Polygons (outer ring, holes) of one geometry, or why it has no area (a str) to skip it."""
    if geom is None:
        return "no geometry"
    kind = geom.get("type") if isinstance(geom, dict) else None
    if kind in _NON_AREA_TYPES:
        return kind
    if kind == "GeometryCollection":
        parts = geom.get("geometries")
        if not isinstance(parts, list):
            raise DataError(f"label {path}: {name} has a GeometryCollection without 'geometries'")
        polys = [p for g in parts if not isinstance(got := _geometry_polygons(g, path, name), str)
                 for p in got]
        return polys or "GeometryCollection without polygons"
    if kind not in ("Polygon", "MultiPolygon"):
        what = f"unknown geometry type {kind!r}" if kind else "a geometry without a 'type'"
        raise DataError(f"label {path}: {name} has {what}")
    coords = geom.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coords, path, name)]
    if not isinstance(coords, list) or not coords:
        raise DataError(f"label {path}: {name} has a malformed MultiPolygon (expected a list of "
                        "polygons)")
    return [_polygon(c, path, name) for c in coords]


def _fill_polygon(inst: np.ndarray, poly: _Polygon, value: int) -> int:
    """Set the pixels of one polygon to ``value``; returns how many were set.

    Coordinates are in pixel-edge units (pixel (r, c) spans x in [c, c+1), y in [r, r+1)), so a pixel
    belongs to the polygon when its centre (c + 0.5, r + 0.5) is inside or on the outer ring and not
    strictly inside a hole. This is exact both for QuPath outlines along pixel edges and for outlines
    through boundary-pixel centres (engine.export's GeoJSON), whose boundary pixels are kept.
    """
    from skimage.measure import grid_points_in_poly

    outer, holes = poly
    height, width = inst.shape
    rc = outer[:, ::-1] - 0.5  # (row, col) of the pixel-centre lattice
    r0, c0 = (max(0, math.ceil(v)) for v in rc.min(axis=0))
    r1, c1 = math.floor(min(rc[:, 0].max(), height - 1)), math.floor(min(rc[:, 1].max(), width - 1))
    if r1 < r0 or c1 < c0:
        return 0
    box = (r1 - r0 + 1, c1 - c0 + 1)
    mask = grid_points_in_poly(box, rc - (r0, c0), binarize=False) > 0
    for hole in holes:
        mask &= grid_points_in_poly(box, hole[:, ::-1] - 0.5 - (r0, c0), binarize=False) != 1
    inst[r0 : r1 + 1, c0 : c1 + 1][mask] = value
    return int(mask.sum())


def rasterise_geojson(path: Path, shape: tuple[int, int] | None, notes: list[tuple[Path, str]]) -> np.ndarray:
    """QuPath GeoJSON outlines -> (H, W) int32: one id per Feature in file order (later wins).

    A MultiPolygon is one nucleus; holes are not part of it; a cell's ``nucleusGeometry`` is used
    instead of its cell boundary; annotations and detections alike are nuclei. Without ``shape`` the
    canvas is the coordinates' extent.
    """
    features = _geojson_features(path)
    nuclei: list[list[_Polygon]] = []
    kinds: list[str] = []  # objectType of each nucleus
    skipped: dict[str, int] = {}
    for i, feature in enumerate(features, start=1):
        name = _feature_name(i, feature)
        geom = feature.get("nucleusGeometry") or feature.get("geometry")
        got = _geometry_polygons(geom, path, name)
        if isinstance(got, str):
            skipped[got] = skipped.get(got, 0) + 1
        else:
            nuclei.append(got)
            kinds.append(_object_type(feature))
    n_annotations = kinds.count("annotation")
    n_detections = sum(k in _DETECTION_TYPES for k in kinds)
    if n_annotations and n_detections:
        notes.append((path, f"label {path} mixes {n_annotations} annotation(s) and {n_detections} "
                            "detection(s); all are read as nuclei (if the annotations are regions "
                            "such as tissue outlines, export the detections only)"))
    if skipped:
        why = ", ".join(f"{n} {k}" for k, n in skipped.items())
        notes.append((path, f"label {path}: skipped {sum(skipped.values())} feature(s) without a "
                            f"polygon outline ({why})"))
    if shape is None:
        if not nuclei:
            raise DataError(f"label {path} holds no nucleus polygons, so its size cannot be "
                            "inferred; read it with its image")
        top = np.max([ring.max(axis=0) for polys in nuclei for poly in polys for ring in poly[:1]],
                     axis=0)
        if top[0] * top[1] > MAX_LABEL_PIXELS:
            raise DataError(f"label {path}: its outlines reach x={top[0]:g}, y={top[1]:g}, beyond "
                            f"the MAX_LABEL_PIXELS limit of {MAX_LABEL_PIXELS} px")
        shape = (math.ceil(top[1]), math.ceil(top[0]))
    if shape[0] * shape[1] > MAX_LABEL_PIXELS:
        raise DataError(f"label {path}: a {shape[0]}x{shape[1]} px label map exceeds the "
                        f"MAX_LABEL_PIXELS limit of {MAX_LABEL_PIXELS} px")
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(f"label {path}: its outlines have zero extent ({shape[0]}x{shape[1]} px)")
    inst = np.zeros(shape, np.int32)
    next_id, empty = 1, 0
    for polys in nuclei:
        if sum([_fill_polygon(inst, poly, next_id) for poly in polys]) == 0:
            empty += 1
            continue
        next_id += 1
    if empty:
        notes.append((path, f"label {path}: {empty} of {len(nuclei)} outlines lie outside the "
                            f"{shape[0]}x{shape[1]} image or cover no pixel centre; dropped"))
    hidden = int(np.count_nonzero(np.bincount(inst.ravel(), minlength=next_id)[1:] == 0))
    if hidden:
        notes.append((path, f"label {path}: {hidden} outline(s) entirely covered by later ones "
                            "(later outlines win on overlap)"))
    return inst
