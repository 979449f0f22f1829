"""Tests for engine.data (folder reading, formats, validation messages, tiling), engine.inspection and
engine.subset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import tifffile

from engine import features
from engine.data import (
    DataWarning,
    LabeledImage,
    Tile,
    load_folder,
    load_tiles,
    read_image,
    read_label,
    tile_image,
    tile_positions,
)
from engine.errors import DataError
from engine.inspection import inspect_folder
from engine.subset import plan_subset, select_subset
from engine.synthetic import make_tile, write_folder

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg" / "train"


# ----------------------------------------------------------------------------- helpers


def write_rgb(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}
    data = cv2.cvtColor(image, channels[image.shape[2]]) if image.ndim == 3 else image
    assert cv2.imwrite(str(path), data)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_pair(folder: Path, stem: str, size: int = 64, seed: int = 0,
              label_dir: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    image, inst = make_tile(size, seed=seed)
    write_rgb(folder / "images" / f"{stem}.png", image)
    write_png(folder / label_dir / f"{stem}.png", inst.astype(np.uint16))
    return image, inst


def problem_for(problems, path: Path):
    """The single problem about ``path``, checking its message names the file."""
    found = [p for p in problems if p.path == str(path)]
    assert len(found) == 1, problems
    assert str(path) in found[0].message
    return found[0]


def xml_for(polygons: list[list[tuple[float, float]]]) -> str:
    regions = "".join(
        f'<Region Id="{i}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly)
        + "</Vertices></Region>"
        for i, poly in enumerate(polygons, start=1))
    return (f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>'
            f"<RegionAttributeHeaders/>{regions}</Regions></Annotation></Annotations>")


# ----------------------------------------------------------------------------- folder errors


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        load_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_folder(tmp_path / "f.txt")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty") as err:
        load_folder(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_subfolders(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="images/"):
        load_folder(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="labels/"):
        load_folder(tmp_path)
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="no image files") as err:
        load_folder(tmp_path)
    assert str(tmp_path / "images") in str(err.value)


def test_nothing_usable_lists_the_files(tmp_path):
    make_pair(tmp_path, "a")
    (tmp_path / "labels" / "a.png").unlink()
    with pytest.raises(DataError, match="no usable") as err:
        load_folder(tmp_path)
    assert str(tmp_path / "images" / "a.png") in str(err.value)


# ----------------------------------------------------------------------------- pair problems


def test_orphans_reported_and_rest_loaded(tmp_path):
    make_pair(tmp_path, "good")
    write_rgb(tmp_path / "images" / "lonely.png", make_tile(64, seed=1)[0])
    write_png(tmp_path / "labels" / "stray.png", np.ones((64, 64), np.uint16))
    items, problems = load_folder(tmp_path)
    assert [it.stem for it in items] == ["good"]
    assert problem_for(problems, tmp_path / "images" / "lonely.png").severity == "error"
    assert problem_for(problems, tmp_path / "labels" / "stray.png").severity == "warning"


def test_size_mismatch_names_both_files(tmp_path):
    make_pair(tmp_path, "good")
    write_rgb(tmp_path / "images" / "odd.png", make_tile(64, seed=1)[0])
    label = write_png(tmp_path / "labels" / "odd.png", np.ones((48, 64), np.uint16))
    items, problems = load_folder(tmp_path)
    assert len(items) == 1
    problem = problem_for(problems, label)
    assert "mismatch" in problem.message and str(tmp_path / "images" / "odd.png") in problem.message
    with pytest.raises(DataError, match="48x64"):
        read_label(label, shape=(64, 64))


def test_corrupt_files(tmp_path):
    make_pair(tmp_path, "good")
    make_pair(tmp_path, "bad_image", seed=1)
    make_pair(tmp_path, "bad_label", seed=2)
    bad_image = tmp_path / "images" / "bad_image.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    bad_label = tmp_path / "labels" / "bad_label.png"
    bad_label.write_bytes(b"garbage")
    items, problems = load_folder(tmp_path)
    assert [it.stem for it in items] == ["good"]
    assert "cannot read" in problem_for(problems, bad_image).message
    assert "cannot read" in problem_for(problems, bad_label).message
    with pytest.raises(DataError, match="bad_image.png"):
        read_image(bad_image)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("label, expected", [
    (np.full((64, 64), 0.5, np.float32), "non-integer"),
    (np.full((64, 64), -1, np.int32), "negative"),
    (np.full((64, 64), np.nan), "NaN"),
    (np.zeros((64, 64, 2), np.int32), "shape"),
])
def test_bad_label_values(tmp_path, label, expected):
    make_pair(tmp_path, "good")
    write_rgb(tmp_path / "images" / "bad.png", make_tile(64, seed=1)[0])
    path = tmp_path / "labels" / "bad.npy"
    np.save(path, label)
    items, problems = load_folder(tmp_path)
    assert len(items) == 1
    problem = problem_for(problems, path)
    assert expected in problem.message and problem.severity == "error"


def test_pickled_npy_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled") as err:
        read_label(path)
    assert str(path) in str(err.value)


def test_colour_label_refused(tmp_path):
    label = np.zeros((8, 8, 3), np.uint8)
    label[..., 0] = 3
    path = write_png(tmp_path / "rgb.png", label)
    with pytest.raises(DataError, match="colour"):
        read_label(path)


def test_mat_without_inst_map(tmp_path):
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"type_map": np.zeros((4, 4), np.int32)})
    with pytest.raises(DataError, match="inst_map") as err:
        read_label(path)
    assert "type_map" in str(err.value) and str(path) in str(err.value)


def test_bad_xml(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text("<Annotations><Annotation>")
    with pytest.raises(DataError, match="not valid XML"):
        read_label(broken, shape=(8, 8))
    other = tmp_path / "other.xml"
    other.write_text("<svg/>")
    with pytest.raises(DataError, match="MoNuSeg"):
        read_label(other, shape=(8, 8))
    good = tmp_path / "good.xml"
    good.write_text(xml_for([[(1, 1), (4, 1), (4, 4)]]))
    with pytest.raises(DataError, match="image size"):
        read_label(good)


# ----------------------------------------------------------------------------- formats


def test_label_formats_round_trip(tmp_path):
    _, inst = make_tile(64, seed=3)
    n = int(inst.max())
    sparse = np.where(inst > 0, inst * 1000 + 70000, 0).astype(np.int32)  # ids beyond 16 bits
    write_png(tmp_path / "p8.png", inst.astype(np.uint8))
    write_png(tmp_path / "p16.png", inst.astype(np.uint16))
    tifffile.imwrite(tmp_path / "t32.tif", sparse)
    tifffile.imwrite(tmp_path / "u32.tiff", sparse.astype(np.uint32))
    np.save(tmp_path / "n.npy", sparse.astype(np.int64))
    np.save(tmp_path / "f.npy", inst.astype(np.float32))  # integral floats are fine
    scipy.io.savemat(tmp_path / "h.mat", {"inst_map": sparse.astype(np.float64),
                                          "type_map": np.zeros_like(inst)})
    for name in ["p8.png", "p16.png", "t32.tif", "u32.tiff", "n.npy", "f.npy", "h.mat"]:
        got = read_label(tmp_path / name)
        assert got.dtype == np.int32 and got.max() == n, name
        assert np.array_equal(got, inst), name


def test_xml_polygons_rasterised_in_order(tmp_path):
    from skimage.draw import polygon

    squares = [[(2, 2), (10, 2), (10, 10), (2, 10)],
               [(8, 8), (16, 8), (16, 16), (8, 16)],  # overlaps the first: later wins
               [(40, 40), (45, 40)],  # degenerate: skipped
               [(20.5, 3.5), (28.5, 3.5), (24.5, 12.5)]]
    path = tmp_path / "a.xml"
    path.write_text(xml_for(squares))
    got = read_label(path, shape=(32, 32))
    expected = np.zeros((32, 32), np.int32)
    for label, poly in enumerate([squares[0], squares[1], squares[3]], start=1):
        xs, ys = zip(*poly)
        rr, cc = polygon(ys, xs, shape=(32, 32))
        expected[rr, cc] = label
    assert np.array_equal(got, expected)
    assert got[9, 9] == 2 and got[3, 3] == 1 and got.max() == 3


def test_xml_pairs_from_annotations_folder(tmp_path):
    image, _ = make_tile(32, seed=0)
    write_rgb(tmp_path / "images" / "a.png", image)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "a.xml").write_text(xml_for([[(2, 2), (10, 2), (10, 10)]]))
    (item,), problems = load_folder(tmp_path)
    assert problems == [] and item.inst.max() == 1 and item.label_path.suffix == ".xml"


def test_label_suffixes_masks_folder_and_priority(tmp_path):
    _, inst_a = make_pair(tmp_path, "a", seed=0)
    (tmp_path / "labels" / "a.png").rename(tmp_path / "labels" / "a_label.png")
    image_b, inst_b = make_tile(64, seed=1)
    write_rgb(tmp_path / "images" / "b.png", image_b)
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "masks" / "b_inst.npy", inst_b)
    image_c, inst_c = make_tile(64, seed=2)
    write_rgb(tmp_path / "images" / "c.png", image_c)
    write_png(tmp_path / "labels" / "c-mask.png", inst_c.astype(np.uint16))
    renumbered = np.where(inst_c > 0, inst_c.max() + 1 - inst_c, 0)  # the same nuclei, other ids
    write_png(tmp_path / "masks" / "c.png", renumbered.astype(np.uint16))  # lower priority, same nuclei
    items, problems = load_folder(tmp_path)
    assert problems == []
    by_stem = {it.stem: it for it in items}
    assert by_stem["a"].label_path.name == "a_label.png"
    assert by_stem["b"].label_path.name == "b_inst.npy"
    assert by_stem["c"].label_path.name == "c-mask.png"
    for stem, inst in [("a", inst_a), ("b", inst_b), ("c", inst_c)]:
        assert np.array_equal(by_stem[stem].inst, inst)


@pytest.mark.parametrize("others", [
    [("labels", "a.tif")], [("labels", "a.npy")], [("masks", "a.png")], [("labels", "a_label.png")],
    [("labels", "a.tif"), ("labels", "a.npy")]], ids=lambda o: "+".join(f"{d}/{n}" for d, n in o))
def test_several_label_files_that_differ_skip_the_image_naming_them_all(tmp_path, others):
    """labels/a.png beside another label file for images/a.png that holds other nuclei: which one is meant is
    a guess, so the image is skipped with an error naming every candidate (the other images are used)."""
    make_pair(tmp_path, "a", seed=0)
    make_pair(tmp_path, "b", seed=1)
    _, other = make_tile(64, seed=7)
    paths = [tmp_path / "labels" / "a.png"]
    for folder, name in others:
        path = tmp_path / folder / name
        path.parent.mkdir(exist_ok=True)
        if path.suffix == ".npy":
            np.save(path, other)
        elif path.suffix == ".tif":
            tifffile.imwrite(path, other[:, ::-1].astype(np.uint16))
        else:
            write_png(path, other.astype(np.uint16))
        paths.append(path)
    items, problems = load_folder(tmp_path)
    assert [it.stem for it in items] == ["b"]
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1 and errors[0].path == str(tmp_path / "images" / "a.png"), problems
    msg = errors[0].message
    assert all(str(p) in msg for p in paths) and "do not hold the same nuclei" in msg and "\n" not in msg
    assert f"{len(paths)} label files" in msg
    # the same through inspect, and a folder of only such images is refused as a whole
    assert inspect_folder(tmp_path, size=32).n_images == 1
    for p in (tmp_path / "images" / "b.png", tmp_path / "labels" / "b.png"):
        p.unlink()
    with pytest.raises(DataError, match="no usable image/label pairs") as err:
        load_folder(tmp_path)
    assert all(str(p) in str(err.value) for p in paths)


def test_an_unreadable_second_label_file_skips_the_image(tmp_path):
    make_pair(tmp_path, "a", seed=0)
    make_pair(tmp_path, "b", seed=1)
    (tmp_path / "labels" / "a.npy").write_bytes(b"not a numpy file")
    items, problems = load_folder(tmp_path)
    assert [it.stem for it in items] == ["b"]
    (err,) = [p for p in problems if p.severity == "error"]
    assert "unreadable" in err.message and str(tmp_path / "labels" / "a.npy") in err.message
    assert str(tmp_path / "labels" / "a.png") in err.message


def test_several_label_files_with_the_same_nuclei_are_fine(tmp_path):
    """E.g. MoNuSeg: labels/a.png rendered from annotations/a.xml; and a non-GeoJSON .json beside a label."""
    image, _ = make_tile(32, seed=0)
    write_rgb(tmp_path / "images" / "a.png", image)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "a.xml").write_text(xml_for([[(12, 14), (20, 14), (20, 24), (12, 24)],
                                                             [(2, 2), (10, 2), (10, 10), (2, 10)]]))
    inst = read_label(tmp_path / "annotations" / "a.xml", shape=(32, 32))
    assert inst.max() == 2
    write_png(tmp_path / "labels" / "a.png", inst.astype(np.uint16))
    np.save(tmp_path / "labels" / "a.npy", np.where(inst > 0, 3 - inst, 0))  # ids swapped
    (tmp_path / "labels" / "a.json").write_text('{"scanner": "x", "magnification": 40}')
    (item,), problems = load_folder(tmp_path)
    assert item.label_path == tmp_path / "labels" / "a.png" and np.array_equal(item.inst, inst)
    assert [p.severity for p in problems] == ["warning"]
    assert str(tmp_path / "labels" / "a.json") in problems[0].message and "not GeoJSON" in problems[0].message
    # one polygon drawn one pixel wider: not the same nuclei any more
    (tmp_path / "annotations" / "a.xml").write_text(xml_for([[(12, 14), (21, 14), (21, 24), (12, 24)],
                                                             [(2, 2), (10, 2), (10, 10), (2, 10)]]))
    with pytest.raises(DataError, match="do not hold the same nuclei") as err:
        load_folder(tmp_path)
    assert str(tmp_path / "annotations" / "a.xml") in str(err.value)


def test_same_nuclei_compares_partitions_not_ids():
    from engine.data import _same_nuclei

    a = np.array([[1, 1, 0], [2, 2, 0], [0, 3, 3]])
    assert _same_nuclei(a, np.array([[3, 3, 0], [1, 1, 0], [0, 2, 2]]))
    assert not _same_nuclei(a, np.array([[1, 1, 0], [1, 1, 0], [0, 3, 3]]))  # two nuclei merged
    assert not _same_nuclei(a, np.array([[1, 2, 0], [2, 2, 0], [0, 3, 3]]))  # a nucleus split across ids
    assert not _same_nuclei(a, np.array([[1, 1, 1], [2, 2, 0], [0, 3, 3]]))  # other foreground
    assert not _same_nuclei(a, a[:, :2])
    assert _same_nuclei(np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32))
    assert _same_nuclei(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.uint16))


def test_image_variants(tmp_path):
    image, _ = make_tile(32, seed=0)
    rgba = np.dstack([image, np.full((32, 32), 128, np.uint8)])
    assert np.array_equal(read_image(write_rgb(tmp_path / "rgba.png", rgba)), image)
    gray = image[..., 1]
    assert np.array_equal(read_image(write_png(tmp_path / "g.png", gray)), np.dstack([gray] * 3))
    tifffile.imwrite(tmp_path / "rgb.tif", image)
    assert np.array_equal(read_image(tmp_path / "rgb.tif"), image)
    jpeg = read_image(write_rgb(tmp_path / "a.jpg", image))
    assert jpeg.shape == (32, 32, 3) and np.abs(jpeg.astype(int) - image).mean() < 12
    sixteen = image.astype(np.uint16) * 257
    with pytest.warns(DataWarning, match="16-bit"):
        got = read_image(write_rgb(tmp_path / "16.png", sixteen))
    assert np.array_equal(got, image)


def test_conversions_reported_as_warnings(tmp_path):
    image, inst = make_tile(64, seed=0)
    write_rgb(tmp_path / "images" / "a.png", image.astype(np.uint16) * 257)
    write_png(tmp_path / "labels" / "a.png", ((inst > 0) * 255).astype(np.uint8))  # binary mask
    (item,), problems = load_folder(tmp_path)
    assert np.array_equal(item.image, image)
    assert item.inst.max() >= 1
    assert {p.severity for p in problems} == {"warning"}
    assert "16-bit" in problem_for(problems, tmp_path / "images" / "a.png").message
    assert "binary mask" in problem_for(problems, tmp_path / "labels" / "a.png").message


def test_ignored_files_and_hidden_files(tmp_path):
    make_pair(tmp_path, "a")
    (tmp_path / "images" / "notes.txt").write_text("hi")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0")
    items, problems = load_folder(tmp_path)
    assert len(items) == 1
    assert problem_for(problems, tmp_path / "images" / "notes.txt").severity == "warning"


# ----------------------------------------------------------------------------- tiling


def test_tile_positions():
    assert tile_positions(1000, 256, 128) == [0, 128, 256, 384, 512, 640, 744]
    assert tile_positions(256, 256, 128) == [0]
    assert tile_positions(300, 256, 128) == [0, 44]
    assert tile_positions(512, 256, 128) == [0, 128, 256]
    assert tile_positions(10, 4, 3) == [0, 3, 6]
    with pytest.raises(DataError, match="larger"):
        tile_positions(200, 256, 128)
    with pytest.raises(ValueError):
        tile_positions(200, 64, 0)


def test_tile_image_crops_and_relabels(tmp_path):
    image, inst = make_tile(160, seed=4)
    item = LabeledImage("x", image, inst, tmp_path / "x.png", tmp_path / "x_label.png")
    tiles = tile_image(item, size=64, stride=48)
    assert [(t.y, t.x) for t in tiles[:4]] == [(0, 0), (0, 48), (0, 96), (48, 0)]
    assert len(tiles) == len(tile_positions(160, 64, 48)) ** 2
    for tile in tiles:
        assert tile.image.shape == (64, 64, 3) and tile.inst.dtype == np.int32
        assert np.array_equal(tile.image, image[tile.y : tile.y + 64, tile.x : tile.x + 64])
        crop = inst[tile.y : tile.y + 64, tile.x : tile.x + 64]
        assert np.array_equal(tile.inst > 0, crop > 0)
        assert tile.inst.max() == len(np.unique(crop[crop > 0]))
    with pytest.raises(DataError, match="smaller than the tile") as err:
        tile_image(item, size=256)
    assert str(tmp_path / "x.png") in str(err.value)


def test_load_tiles_skips_small_images(tmp_path):
    make_pair(tmp_path, "big", size=128)
    make_pair(tmp_path, "small", size=48, seed=1)
    tiles, problems = load_tiles(tmp_path, size=64, stride=64)
    assert len(tiles) == 4 and {t.stem for t in tiles} == {"big"}
    small = problem_for(problems, tmp_path / "images" / "small.png")
    assert "smaller than the tile" in small.message
    with pytest.raises(DataError, match="no usable"):
        load_tiles(tmp_path, size=256)


def test_inspect_folder(tmp_path):
    write_folder(tmp_path, n_images=2, size=128, seed=0)
    report = inspect_folder(tmp_path, size=64, stride=32)
    n = sum(int(make_tile(128, seed=s)[1].max()) for s in range(2))
    assert (report.n_images, report.n_tiles, report.n_nuclei) == (2, 2 * 9, n)
    assert len(report.areas) == n and report.image_sizes == [(128, 128)] * 2
    text = report.summary()
    for fragment in ["Images: 2", "Tiles: 18", f"Nuclei: {n}", "median", "0 error"]:
        assert fragment in text


# ----------------------------------------------------------------------------- subset selection


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("subset"), n_images=3, size=192, seed=11)
    return load_tiles(folder, size=96, stride=48)[0]  # 3 x 9 tiles


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_subset_reaches_fraction_minimally(tiles, fraction):
    plan = plan_subset(tiles, fraction, seed=0)
    counts = np.array([t.inst.max() for t in tiles])
    assert plan.feature_kind == "handcrafted"
    assert len(set(plan.indices)) == len(plan.indices)
    assert counts[plan.indices].sum() >= fraction * counts.sum()
    assert counts[plan.indices[:-1]].sum() < fraction * counts.sum()  # stops as soon as reached
    assert plan.fraction_reached >= fraction
    assert len(set(plan.clusters[plan.indices[:6]].tolist())) == 6 or len(plan.indices) < 6


def test_subset_deterministic_and_edge_cases(tiles):
    first = select_subset(tiles, 0.3, seed=1)
    assert select_subset(tiles, 0.3, seed=1) == first
    assert sorted(select_subset(tiles, 1.0)) == list(range(len(tiles)))
    assert len(select_subset(tiles[:2], 0.5, n_clusters=6)) >= 1
    with pytest.raises(ValueError):
        select_subset(tiles, 0.0)
    with pytest.raises(ValueError):
        select_subset(tiles, 1.5)
    with pytest.raises(DataError):
        select_subset([], 0.5)
    # no nuclei anywhere: the fraction applies to the number of tiles instead
    blank = [Tile(np.full((32, 32, 3), 40 * i, np.uint8), np.zeros((32, 32), np.int32), "e", 0, 0)
             for i in range(4)]
    assert len(select_subset(blank, 0.5, n_clusters=2)) == 2


def test_feature_kind_falls_back_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "resnet50_weights_path", lambda: None)
    assert features.available_feature_kind() == "handcrafted"
    with pytest.raises(RuntimeError):
        features.tile_features([np.zeros((8, 8, 3), np.uint8)], kind="resnet50")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not present at {REAL_DATA}")
def test_real_monuseg_folder_loads():
    items, problems = load_folder(REAL_DATA)
    # all 30 MoNuSeg 2018 training images since 2026-11-29 (13 before; ../shared/data/README.md)
    assert len(items) == 30 and [p for p in problems if p.severity == "error"] == []
    assert sum(int(it.inst.max()) for it in items) == 16959
    for item in items:
        assert item.image.shape == (1000, 1000, 3) and item.inst.shape == (1000, 1000)
        assert item.label_path.parent.name == "labels"
    first = next(it for it in items if (REAL_DATA / "annotations" / f"{it.stem}.xml").exists())  # 13 of 30 have XML
    from_xml = read_label(REAL_DATA / "annotations" / f"{first.stem}.xml", shape=(1000, 1000))
    assert np.array_equal(from_xml, first.inst)  # polygons rasterise exactly to the PNG labels
