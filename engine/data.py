"""Reading folders of labeled nuclei tiles as users keep them, and cutting them into tiles.

Folder layout::

    <folder>/images/<stem>.png|jpg|jpeg|tif|tiff|bmp
    <folder>/labels/<stem>[_label|_mask|_inst|...].png|tif|tiff|npy|mat|xml|geojson|json
                                                  (or masks/, annotations/)

Labels are instance maps (0 = background, one id per nucleus): integer PNG / TIFF, ``.npy``,
HoVer-Net ``.mat`` (``inst_map``), MoNuSeg XML polygons or QuPath GeoJSON outlines
(``<stem>.geojson``, also ``<stem>.json`` or ``<stem>.<image ext>.geojson``). When several label
files match one image (``labels/a.png`` beside ``labels/a.tif``, ``masks/a.png`` or ``annotations/a.xml``),
all are read: if they hold the same nuclei (the same instance map up to the numbering of its ids, e.g. a
PNG rendered from MoNuSeg's XML), the first in the order ``labels/`` > ``masks/`` > ``annotations/``, then
png > tif > tiff > npy > mat > xml > geojson > json, is used; if they differ (or one cannot be read) the
image is skipped with an error :class:`Problem` naming every candidate, since picking one would be a
guess. A ``.json`` beside other candidates that is not GeoJSON is ignored with a warning.

Every problem with the user's files is a :class:`~engine.errors.DataError` (or a :class:`Problem`
in a folder report) whose message names the file at fault.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from engine.errors import DataError
from engine.geojson import looks_like_geojson, rasterise_geojson
from engine.metrics import relabel

__all__ = [
    "IMAGE_EXTENSIONS", "LABEL_EXTENSIONS", "DataWarning", "LabeledImage", "Tile", "Problem",
    "read_image", "read_label", "load_folder", "tile_positions", "tile_image", "load_tiles",
    "max_pixels", "raster_size", "find_pairs",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".npy", ".mat", ".xml", ".geojson", ".json")
#: Default pixel budget of one raster file (H * W), checked from its header before any decode; raise it
#: with the environment variable NUDIFF_MAX_PIXELS. 100 MP: a 10000 x 10000 field, 300 MB as RGB.
DEFAULT_MAX_PIXELS = 100_000_000
_LABEL_DIRS = ("labels", "masks", "annotations")
_LABEL_SUFFIX = re.compile(
    r"[_\-. ](label|labels|mask|masks|inst|inst_map|instance|instances|gt)$", re.IGNORECASE)
_MAX_LISTED = 5  # problems quoted in a "nothing usable" error

Notes = list[tuple[Path, str]]  # (file, warning message) collected while reading


class DataWarning(UserWarning):
    """A file was read but altered (e.g. 16-bit image rescaled, binary mask split into nuclei)."""


@dataclass
class LabeledImage:
    """One image with its instance label, as loaded from a folder."""

    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    inst: np.ndarray  # (H, W) int32, 0 = background, ids 1..N consecutive
    image_path: Path
    label_path: Path


@dataclass
class Tile:
    """A square crop of a LabeledImage."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    inst: np.ndarray  # (S, S) int32, ids relabelled 1..N within the tile
    stem: str
    y: int  # origin (top-left) in the source image
    x: int


@dataclass
class Problem:
    """A file that was skipped ("error") or used with a caveat / ignored ("warning")."""

    path: str
    message: str
    severity: str  # "error" | "warning"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


# ----------------------------------------------------------------------------- images


def max_pixels() -> int:
    """Pixel budget of one raster file: NUDIFF_MAX_PIXELS, or DEFAULT_MAX_PIXELS."""
    import os

    try:
        return max(1, int(float(os.environ.get("NUDIFF_MAX_PIXELS", DEFAULT_MAX_PIXELS))))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def raster_size(path: Path) -> tuple[int, int] | None:
    """(height, width) a raster file declares in its header, without decoding its pixels (None: unknown)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # read the header only; judged below
        try:
            with Image.open(path) as img:
                w, h = img.size
                return int(h), int(w)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the decoder itself
        return None


def _check_pixels(path: Path) -> None:
    """DataError before any decode when the file's header declares more pixels than the budget."""
    hw = raster_size(path)
    limit = max_pixels()
    if hw is not None and hw[0] * hw[1] > limit:
        raise DataError(f"{path} declares {hw[1]}x{hw[0]} px ({hw[0] * hw[1] / 1e6:.0f} MP), over the limit of "
                        f"{limit / 1e6:.0f} MP for one file; cut it into smaller files, or raise the limit with "
                        f"the environment variable NUDIFF_MAX_PIXELS")


def _decode_raster(path: Path) -> np.ndarray:
    """Raw pixel array of an image or raster label file (channels RGB(A) order), after the header's pixel
    count is checked against the budget (max_pixels(): decompression bombs are refused undecoded)."""
    _check_pixels(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = np.asarray(tifffile.imread(path))
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
        return arr
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


def _read_file(path: Path, what: str, decode) -> np.ndarray:
    """Call ``decode(path)``, turning any failure into a DataError naming the file."""
    if not path.exists():
        raise DataError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} path is not a file: {path}")
    try:
        return decode(path)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{what} {path} is too large to load into memory") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        reason = str(exc).strip() or type(exc).__name__
        raise DataError(f"cannot read {what} {path}: corrupt or unsupported file ({reason})") \
            from None


def _to_uint8(arr: np.ndarray, path: Path, notes: Notes) -> np.ndarray:
    """Integer / float pixels -> uint8, noting any rescaling."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        notes.append((path, f"image {path} is 1-bit; mapped to 0/255"))
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0:
            raise DataError(f"image {path} has negative or non-finite float pixel values")
        top = 1.0 if arr.max() <= 1.0 else 255.0
        if arr.max() > 255.0:
            raise DataError(f"image {path} has float pixel values above 255; cannot interpret")
        notes.append((path, f"image {path} has float pixels; scaled from [0, {top:g}] to 8-bit"))
        return np.round(arr * (255.0 / top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0:
            raise DataError(f"image {path} has negative pixel values")
        top = int(arr.max())
        bits = min(max(8, top.bit_length()), arr.dtype.itemsize * 8)
        full = (1 << bits) - 1
        notes.append((path, f"image {path} is {arr.dtype.itemsize * 8}-bit; rescaled from "
                            f"[0, {full}] to 8-bit"))
        return np.round(arr.astype(np.float64) * (255.0 / full)).astype(np.uint8)
    raise DataError(f"image {path} has unsupported pixel type {arr.dtype}")


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) -> (H, W, 3): grey replicated, alpha dropped."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"image {path} has shape {arr.shape}; expected (H, W), (H, W, 3) or "
                        "(H, W, 4)")
    if arr.shape[2] in (1, 2):  # grey or grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _read_image(path: Path, notes: Notes) -> np.ndarray:
    arr = _read_file(path, "image", _decode_raster)
    image = _to_rgb(_to_uint8(arr, path, notes), path)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"image {path} is empty (size {image.shape[0]}x{image.shape[1]})")
    return image


def _emit(notes: Notes) -> None:
    for _, message in notes:
        warnings.warn(message, DataWarning, stacklevel=3)


def read_image(path: str | Path) -> np.ndarray:
    """Read PNG / JPEG / TIFF / BMP -> (H, W, 3) uint8 RGB.

    RGBA drops alpha, grey is replicated, 16-bit (or float) is rescaled to 8-bit with a
    :class:`DataWarning`. Raises DataError naming the file if it is missing or unreadable.
    """
    notes: Notes = []
    image = _read_image(Path(path), notes)
    _emit(notes)
    return image


# ----------------------------------------------------------------------------- labels


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"label {path} holds pickled Python objects; refusing to load it "
                            "(save a plain integer array with np.save)") from None
        raise


def _load_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        data = loadmat(path)
    except NotImplementedError:
        raise DataError(f"label {path} is a MATLAB v7.3 (HDF5) file; re-save it with "
                        "save(..., '-v7')") from None
    if "inst_map" not in data:
        found = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise DataError(f"label {path} has no 'inst_map' variable (found: {found})")
    return np.asarray(data["inst_map"])


def _rasterise_xml(path: Path, shape: tuple[int, int] | None, notes: Notes) -> np.ndarray:
    """MoNuSeg XML polygons -> (H, W) int32, drawn in file order (later wins)."""
    from skimage.draw import polygon

    if shape is None:
        raise DataError(f"label {path} holds polygons; the paired image size is needed to "
                        "rasterise it")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"label {path} is not valid XML ({exc})") from None
    if root.tag != "Annotations":
        raise DataError(f"label {path} is not a MoNuSeg annotation file (root element "
                        f"<{root.tag}>, expected <Annotations>)")
    inst = np.zeros(shape, np.int32)
    regions = root.findall("./Annotation/Regions/Region")
    next_id, outside = 1, 0
    for region in regions:
        vertices = region.findall("./Vertices/Vertex")
        try:
            xs = np.array([float(v.attrib["X"]) for v in vertices])
            ys = np.array([float(v.attrib["Y"]) for v in vertices])
        except (KeyError, ValueError):
            raise DataError(f"label {path}: region {region.get('Id', '?')} has a vertex without "
                            "numeric X and Y") from None
        if len(xs) < 3:
            continue
        rr, cc = polygon(ys, xs, shape=shape)
        if len(rr) == 0:
            outside += 1
            continue
        inst[rr, cc] = next_id
        next_id += 1
    if outside:
        notes.append((path, f"label {path}: {outside} of {len(regions)} polygons lie outside the "
                            f"{shape[0]}x{shape[1]} image and were dropped"))
    return inst


def _decode_label(path: Path, shape: tuple[int, int] | None, notes: Notes) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_file(path, "label", _load_npy)
    if suffix == ".mat":
        return _read_file(path, "label", _load_mat)
    if suffix == ".xml":
        return _read_file(path, "label", lambda p: _rasterise_xml(p, shape, notes))
    if suffix in (".geojson", ".json"):
        return _read_file(path, "label", lambda p: rasterise_geojson(p, shape, notes))
    return _read_file(path, "label", _decode_raster)


def _single_channel(arr: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze a label to (H, W); colour labels are accepted only if all channels are equal."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        colour = arr[..., :3]
        if np.array_equal(colour[..., 0], colour[..., 1]) and \
                np.array_equal(colour[..., 0], colour[..., 2]):
            arr = colour[..., 0]
        else:
            raise DataError(f"label {path} is a colour image; expected a single-channel integer "
                            "instance map (0 = background, one id per nucleus)")
    if arr.ndim != 2:
        raise DataError(f"label {path} has shape {arr.shape}; expected a 2-D instance map")
    return arr


def _integer_label(arr: np.ndarray, path: Path, notes: Notes) -> np.ndarray:
    """Validate values and return a non-negative integer array (binary masks split into nuclei)."""
    if arr.dtype == bool:
        return _split_binary(arr, path, notes)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"label {path} contains NaN or infinite values")
        fractional = arr != np.round(arr)
        if fractional.any():
            example = float(arr[fractional].flat[0])
            raise DataError(f"label {path} has non-integer values (e.g. {example:g}); expected "
                            "integer instance ids")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"label {path} has unsupported type {arr.dtype}; expected integers")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise DataError(f"label {path} has negative values (min {int(arr.min())}); expected "
                        "0 for background and positive instance ids")
    if arr.dtype == np.uint8 and arr.size:
        counts = np.bincount(arr.ravel(), minlength=256)
        if counts[255] and counts[1:255].sum() == 0:
            return _split_binary(arr > 0, path, notes)
    return arr


def _split_binary(mask: np.ndarray, path: Path, notes: Notes) -> np.ndarray:
    inst, n = ndimage.label(mask)
    notes.append((path, f"label {path} is a binary mask, not an instance map; split into {n} "
                        "nuclei by connected components (touching nuclei stay merged)"))
    return inst


def _read_label(path: Path, shape: tuple[int, int] | None, notes: Notes) -> np.ndarray:
    arr = _single_channel(np.asarray(_decode_label(path, shape, notes)), path)
    return relabel(_integer_label(arr, path, notes))


def read_label(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an instance label -> (H, W) int32, 0 = background, ids 1..N consecutive.

    Formats: integer PNG / TIFF (8/16/32-bit), ``.npy`` (no pickles), HoVer-Net ``.mat``
    (``inst_map``), MoNuSeg XML (needs ``shape``, the paired image's (H, W)), and QuPath GeoJSON
    (``.geojson``, or ``.json`` holding GeoJSON): a FeatureCollection or a list of Features, one
    nucleus per Feature in file order (later wins on overlap); a MultiPolygon is one nucleus, holes
    are excluded, a cell's ``nucleusGeometry`` is preferred to its cell outline; coordinates are
    pixels (x, y) from the top-left image corner, and a pixel belongs to an outline when its centre
    (col + 0.5, row + 0.5) is inside or on it. Features without an area (null, Point, LineString)
    or outside the image are skipped with a :class:`DataWarning`; a file mixing annotations and
    detections reads both as nuclei, with a DataWarning. GeoJSON without ``shape`` gets the extent
    of its coordinates, H = ceil(max y), W = ceil(max x) (an empty bottom / right margin of the
    original image is lost), at most ``engine.geojson.MAX_LABEL_PIXELS``. A 0/255 binary mask is split into
    connected components with a :class:`DataWarning`. If ``shape`` is given the label must have
    that (H, W). Raises DataError naming the file for any problem.
    """
    path = Path(path)
    hw = None if shape is None else (int(shape[0]), int(shape[1]))
    notes: Notes = []
    inst = _read_label(path, hw, notes)
    if hw is not None and inst.shape != hw:
        raise DataError(f"label {path} is {inst.shape[0]}x{inst.shape[1]} px but its image is "
                        f"{hw[0]}x{hw[1]} px")
    _emit(notes)
    return inst


# ----------------------------------------------------------------------------- folders


def label_files(items: Sequence[str | Path]) -> list[Path]:
    """Instance-map files named by ``items``: files as given; a folder gives its own (or its ``labels/``
    subfolder's) .png/.tif/.tiff/.npy/.mat/.geojson files (and .json files that look like GeoJSON),
    sorted. DataError if one is missing or none is found."""
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            sub = p / "labels" if (p / "labels").is_dir() else p
            files += sorted(f for f in sub.iterdir() if f.is_file() and (
                f.suffix.lower() in (".png", ".tif", ".tiff", ".npy", ".mat", ".geojson")
                or (f.suffix.lower() == ".json" and looks_like_geojson(f))))
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"label file not found: {p}")
    if not files:
        raise DataError("no label files given")
    return files


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _label_stem(path: Path) -> str:
    """Stem of a label file; for GeoJSON also without an image extension (QuPath may name the
    outlines of ``a.png`` ``a.png.geojson``)."""
    stem = path.stem
    if path.suffix.lower() in (".geojson", ".json"):
        inner = Path(stem).suffix.lower()
        if inner in IMAGE_EXTENSIONS or inner in (".svs", ".ndpi", ".scn", ".mrxs", ".vsi"):
            stem = stem[: -len(inner)]
    return stem


def _label_key(stem: str) -> str:
    """Image stem a label file belongs to: ``a_label`` / ``a-mask`` / ``a_inst`` -> ``a``."""
    return _LABEL_SUFFIX.sub("", stem)


def _check_folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    if not any(not p.name.startswith(".") for p in root.iterdir()):
        raise DataError(f"folder {root} is empty; expected images/ and labels/ subfolders")
    return root


def _subfolders(root: Path) -> tuple[Path, list[Path]]:
    """(images dir, label dirs in priority order); DataError if either is missing."""
    dirs = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}
    if "images" not in dirs:
        raise DataError(f"no images/ subfolder in {root}; expected images/ plus labels/, masks/ "
                        "or annotations/")
    label_dirs = [dirs[name] for name in _LABEL_DIRS if name in dirs]
    if not label_dirs:
        raise DataError(f"no labels/, masks/ or annotations/ subfolder in {root} (images are in "
                        f"{dirs['images']})")
    return dirs["images"], label_dirs


def _collect_images(images_dir: Path, problems: list[Problem]) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in _visible_files(images_dir):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(Problem(str(path), f"ignored {path}: not an image file "
                                    f"({', '.join(IMAGE_EXTENSIONS)})", "warning"))
        elif path.stem in images:
            problems.append(Problem(str(path), f"ignored {path}: another image has the same name "
                                    f"({images[path.stem].name})", "warning"))
        else:
            images[path.stem] = path
    if not images:
        raise DataError(f"no image files in {images_dir} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return images


def _collect_labels(label_dirs: list[Path], problems: list[Problem]) -> dict[str, list[Path]]:
    """Image stem -> candidate label files, best first."""
    found: dict[str, list[tuple[tuple[int, int, int], Path]]] = {}
    for rank, folder in enumerate(label_dirs):
        for path in _visible_files(folder):
            suffix = path.suffix.lower()
            if suffix not in LABEL_EXTENSIONS:
                problems.append(Problem(str(path), f"ignored {path}: not a label file "
                                        f"({', '.join(LABEL_EXTENSIONS)})", "warning"))
                continue
            stem = _label_stem(path)
            key = _label_key(stem)
            order = (rank, int(key != stem), LABEL_EXTENSIONS.index(suffix))
            found.setdefault(key, []).append((order, path))
            if key != stem:
                found.setdefault(stem, []).append((order, path))
    return {key: [p for _, p in sorted(items)] for key, items in found.items()}


def _pair_files(root: Path) -> tuple[list[tuple[str, Path, list[Path]]], list[Problem]]:
    """[(stem, image path, candidate label paths best first)] and the problems met while pairing."""
    problems: list[Problem] = []
    images_dir, label_dirs = _subfolders(root)
    images = _collect_images(images_dir, problems)
    labels = _collect_labels(label_dirs, problems)
    pairs = []
    for stem, image_path in images.items():
        candidates = labels.get(stem)
        if not candidates:
            where = ", ".join(f"{d.name}/" for d in label_dirs)
            problems.append(Problem(str(image_path), f"image {image_path} has no label (looked "
                                    f"for {stem}.* or {stem}_label.* in {where})", "error"))
            continue
        if len(candidates) > 1:  # a .json that is not GeoJSON (metadata, COCO) is no label candidate
            other_json = [p for p in candidates if p.suffix.lower() == ".json" and not looks_like_geojson(p)]
            if other_json and len(other_json) < len(candidates):
                for path in other_json:
                    problems.append(Problem(str(path), f"ignored {path}: JSON but not GeoJSON outlines "
                                            f"(the label of {image_path.name} is read from another file)",
                                            "warning"))
                candidates = [p for p in candidates if p not in other_json]
        pairs.append((stem, image_path, candidates))
    for key, candidates in labels.items():
        for path in candidates:
            if key == _label_stem(path) and key not in images and _label_key(key) not in images:
                problems.append(Problem(str(path), f"label {path} has no matching image in "
                                        f"{images_dir}", "warning"))
    return pairs, problems


def _same_nuclei(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two instance maps hold the same nuclei: equal shape and foreground, and a one-to-one
    correspondence of their ids (the numbering may differ)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    if not fg.any():
        return True
    ids_a, ids_b = np.unique(a[fg]), np.unique(b[fg])
    pairs = np.unique(a[fg].astype(np.int64) * (int(b.max()) + 1) + b[fg])
    # each id of a meets exactly one id of b, and vice versa
    return len(ids_a) == len(ids_b) == len(pairs)


def _read_candidates(image_path: Path, shape: tuple[int, int], paths: list[Path],
                     notes: Notes) -> tuple[Path, np.ndarray]:
    """(label path, instance map) of an image from its candidate label files (best first).

    One candidate: read it (DataError as read_label). Several: all are read, and used only if they hold
    the same nuclei; else DataError naming every candidate and how it differs (picking one would be a
    guess: they may be two versions of the annotation, or a mask that merges touching nuclei).
    """
    if len(paths) == 1:
        return paths[0], _read_label(paths[0], shape, notes)
    read: list[tuple[Path, np.ndarray | None, str, Notes]] = []
    for path in paths:
        own: Notes = []
        try:
            inst = _read_label(path, shape, own)
        except DataError as exc:
            read.append((path, None, f"unreadable ({exc})", own))
            continue
        what = (f"{int(inst.max())} nuclei over {int(np.count_nonzero(inst))} px"
                + ("" if inst.shape == shape else f", {inst.shape[0]}x{inst.shape[1]} px in all"))
        read.append((path, inst, what, own))
    best = read[0][1]
    if best is not None and all(
            inst is not None and _same_nuclei(best, inst) for _, inst, _, _ in read[1:]):
        notes.extend(read[0][3])
        return paths[0], best
    details = "; ".join(f"{path} ({what})" for path, _, what, _ in read)
    raise DataError(f"image {image_path} skipped: {len(paths)} label files match it and they do not hold "
                    f"the same nuclei: {details}. Keep one label file per image (or make them identical)")


def _load_pair(stem: str, image_path: Path, label_paths: list[Path],
               problems: list[Problem]) -> LabeledImage | None:
    """Load one pair; on failure record a Problem naming the file(s) at fault and return None."""
    notes: Notes = []
    try:
        image = _read_image(image_path, notes)
    except DataError as exc:
        problems.append(Problem(str(image_path), str(exc), "error"))
        return None
    try:
        label_path, inst = _read_candidates(image_path, image.shape[:2], label_paths, notes)
    except DataError as exc:
        where = label_paths[0] if len(label_paths) == 1 else image_path
        problems.append(Problem(str(where), str(exc), "error"))
        return None
    if inst.shape != image.shape[:2]:
        problems.append(Problem(str(label_path), f"size mismatch: image {image_path} is "
                                f"{image.shape[0]}x{image.shape[1]} px but label {label_path} is "
                                f"{inst.shape[0]}x{inst.shape[1]} px", "error"))
        return None
    problems.extend(Problem(str(path), message, "warning") for path, message in notes)
    if inst.max() == 0:
        problems.append(Problem(str(label_path), f"label {label_path} has no nuclei (all "
                                "background)", "warning"))
    return LabeledImage(stem, image, inst, image_path, label_path)


def _nothing_usable(what: str, root: Path, problems: list[Problem]) -> DataError:
    """One line: what is missing, then the first few files skipped and why."""
    errors = [" ".join(p.message.split()) for p in problems if p.severity == "error"]
    listed = errors[:_MAX_LISTED]
    text = f"no usable {what} in {root}"
    if listed:
        text += ": " + "; ".join(listed) + (f"; ... and {len(errors) - len(listed)} more"
                                            if len(errors) > len(listed) else "")
    return DataError(text)


def find_pairs(folder: str | Path) -> tuple[list[tuple[str, Path, list[Path]]], list[Problem]]:
    """The folder's (stem, image file, candidate label files) without reading any pixels: a quick check of
    its layout (load_folder reads them). Raises DataError as load_folder does for a missing folder or
    subfolder, or when no image has a label file."""
    root = _check_folder(folder)
    pairs, problems = _pair_files(root)
    if not pairs:
        raise _nothing_usable("image/label pairs", root, problems)
    return pairs, problems


def load_folder(folder: str | Path) -> tuple[list[LabeledImage], list[Problem]]:
    """Load all image/label pairs of a folder (see module docstring for the layout).

    Pairs that cannot be used are skipped and reported as Problems ("error"); files used with a
    caveat or ignored are "warning"s. Raises DataError if the folder is missing, empty, lacks the
    subfolders, or yields no usable pair. Items are in sorted image-name order.
    """
    root = _check_folder(folder)
    pairs, problems = _pair_files(root)
    items = [item for stem, image_path, label_paths in pairs
             if (item := _load_pair(stem, image_path, label_paths, problems)) is not None]
    if not items:
        raise _nothing_usable("image/label pairs", root, problems)
    return items, problems


# ----------------------------------------------------------------------------- tiling


def tile_positions(length: int, size: int, stride: int) -> list[int]:
    """Tile origins along one axis: 0, stride, 2*stride, ... plus a last tile flush with the far
    border (e.g. 1000, 256, 128 -> 0, 128, ..., 640, 744). DataError if size > length."""
    if size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got {size} and {stride}")
    if size > length:
        raise DataError(f"tile size {size} px is larger than the image side of {length} px")
    positions = list(range(0, length - size + 1, stride))
    if positions[-1] != length - size:
        positions.append(length - size)
    return positions


def tile_image(item: LabeledImage, size: int = 256, stride: int = 128) -> list[Tile]:
    """Cut an image into (size, size) tiles on the tile_positions grid (row-major order).

    DataError naming the image file if the image is smaller than the tile in either direction.
    """
    height, width = item.inst.shape
    if size > height or size > width:
        raise DataError(f"image {item.image_path} is {height}x{width} px, smaller than the tile "
                        f"size of {size} px")
    tiles = []
    for y in tile_positions(height, size, stride):
        for x in tile_positions(width, size, stride):
            tiles.append(Tile(image=np.ascontiguousarray(item.image[y : y + size, x : x + size]),
                              inst=relabel(item.inst[y : y + size, x : x + size]),
                              stem=item.stem, y=y, x=x))
    return tiles


def load_tiles(folder: str | Path, size: int = 256,
               stride: int = 128) -> tuple[list[Tile], list[Problem]]:
    """Load a folder and tile every image; images smaller than the tile are skipped as Problems.

    Raises DataError as load_folder does, or if no image is large enough for one tile.
    """
    items, problems = load_folder(folder)
    tiles: list[Tile] = []
    for item in items:
        try:
            tiles.extend(tile_image(item, size, stride))
        except DataError as exc:
            problems.append(Problem(str(item.image_path), str(exc), "error"))
    if not tiles:
        raise _nothing_usable(f"{size}x{size} tiles", Path(folder), problems)
    return tiles, problems
