"""Importing nucleus outlines as QuPath exports them (GeoJSON), incl. a round trip with engine.export."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.data import DataWarning, label_files, load_folder, read_label
from engine.geojson import MAX_LABEL_PIXELS
from engine.errors import DataError
from engine.export import write_zip
from engine.metrics import aji
from engine.synthetic import make_tile


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """Closed ring along pixel edges: covers columns x0..x1-1 and rows y0..y1-1."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry, object_type: str = "detection", **extra) -> dict:
    return {"type": "Feature", "geometry": geometry, **extra,
            "properties": {"objectType": object_type, "classification": {"name": "Nucleus"}}}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _tricky_inst() -> np.ndarray:
    """A procedural tile plus shapes the exporter must handle: border nuclei, a fragmented nucleus,
    1- and 2-pixel pieces, a one-pixel-wide line, a concave nucleus."""
    _, inst = make_tile(size=96, seed=3, density=0.3)
    inst = inst.copy()
    top = int(inst.max())
    inst[0:6, 40:52] = top + 1  # touches the top border
    inst[60:75, 90:96] = top + 2  # touches the right border
    inst[90:96, 0:7] = top + 3  # bottom-left corner
    inst[20:24, 0:3] = top + 4  # fragmented: two pieces of one nucleus
    inst[30:33, 0:3] = top + 4
    inst[80, 30] = top + 5  # single pixel
    inst[84, 30:32] = top + 6  # two pixels
    inst[88, 20:28] = top + 7  # one pixel wide line
    inst[44:54, 44:54] = top + 8  # concave: a U shape
    inst[44:50, 47:51] = 0
    return inst


def test_round_trip_with_export_geojson(tmp_path):
    insts = [_tricky_inst()] + [make_tile(size=s, seed=k)[1] for k, s in ((0, 64), (1, 128), (5, 256))]
    pairs = [(np.zeros((*m.shape, 3), np.uint8), m, {}) for m in insts]
    zpath = write_zip(pairs, tmp_path / "out.zip", hovernet=False, coco=False)
    with zipfile.ZipFile(zpath) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("geojson/"))
        assert len(names) == len(insts)
        zf.extractall(tmp_path / "x")
    for name, inst in zip(names, insts):
        back = read_label(tmp_path / "x" / name, inst.shape)
        assert back.max() == len(np.unique(inst)) - 1  # same nucleus count
        assert aji(inst, back) >= 0.98
        if inst is insts[0]:
            assert np.array_equal(back > 0, inst > 0)  # pixel-exact on the tricky shapes


def test_qupath_style_file_ids_and_areas(tmp_path):
    poly = {"type": "Polygon", "coordinates": [_square(2, 2, 6, 5)]}  # 4 x 3 = 12 px
    multi = {"type": "MultiPolygon", "coordinates": [[_square(10, 0, 12, 2)],  # 4 px
                                                     [_square(10, 5, 11, 8)]]}  # 3 px
    holed = {"type": "Polygon", "coordinates": [_square(0, 10, 8, 18), _square(2, 12, 5, 15)]}  # 64 - 9
    point = {"type": "Point", "coordinates": [3.0, 3.0]}
    data = {"type": "FeatureCollection", "features": [
        _feature(poly, id="a"), _feature(point), _feature(multi, "annotation"), _feature(holed),
        _feature(None)]}
    path = _write(tmp_path / "tile.geojson", data)
    with pytest.warns(DataWarning) as record:
        inst = read_label(path, (20, 20))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all(str(path) in m for m in messages)
    assert any("skipped 2 feature(s) without a polygon outline (1 Point, 1 no geometry)" in m
               for m in messages)
    assert any("mixes 1 annotation(s) and 2 detection(s)" in m for m in messages)
    assert inst.shape == (20, 20) and inst.max() == 3
    assert np.bincount(inst.ravel()).tolist()[1:] == [12, 7, 55]
    assert (inst[2:5, 2:6] == 1).all()
    assert (inst[0:2, 10:12] == 2).all() and (inst[5:8, 10] == 2).all()  # one nucleus, two pieces
    assert (inst[12:15, 2:5] == 0).all() and inst[10, 0] == 3 and inst[17, 7] == 3  # hole is background


def test_bare_feature_list_later_wins_and_cell_nucleus(tmp_path):
    cell = _feature({"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}, "cell",
                    nucleusGeometry={"type": "Polygon", "coordinates": [_square(2, 2, 4, 4)]})
    first = _feature({"type": "Polygon", "coordinates": [_square(5, 5, 9, 9)]})
    second = _feature({"type": "Polygon", "coordinates": [_square(7, 5, 11, 9)]})
    inst = read_label(_write(tmp_path / "cells.json", [cell, first, second]), (12, 12))
    assert np.bincount(inst.ravel()).tolist()[1:] == [4, 8, 16]  # nucleus, not cell; later wins
    assert inst[6, 8] == 3


def test_mixed_annotations_and_detections_are_all_nuclei_with_a_note(tmp_path):
    region = _feature({"type": "Polygon", "coordinates": [_square(0, 0, 20, 20)]}, "annotation")
    nucleus = _feature({"type": "Polygon", "coordinates": [_square(3, 3, 6, 6)]})
    with pytest.warns(DataWarning, match="mixes 1 annotation.*1 detection"):
        inst = read_label(_write(tmp_path / "t.geojson", [region, nucleus]), (20, 20))
    assert inst.max() == 2 and (inst == 2).sum() == 9


def test_outside_features_dropped_with_note(tmp_path):
    inside = _feature({"type": "Polygon", "coordinates": [_square(1, 1, 4, 4)]})
    outside = _feature({"type": "Polygon", "coordinates": [_square(30, 30, 40, 40)]})
    with pytest.warns(DataWarning, match="outside"):
        inst = read_label(_write(tmp_path / "t.geojson", [outside, inside]), (10, 10))
    assert inst.max() == 1 and (inst == 1).sum() == 9


def test_without_shape_uses_coordinate_extent(tmp_path):
    feats = [_feature({"type": "Polygon", "coordinates": [_square(1, 1, 4, 4)]}),
             _feature({"type": "Polygon", "coordinates": [[[10, 2], [20.2, 2], [20.2, 7.5], [10, 7.5],
                                                           [10, 2]]]})]
    inst = read_label(_write(tmp_path / "t.geojson", {"type": "FeatureCollection", "features": feats}))
    assert inst.shape == (8, 21)  # ceil(max y), ceil(max x)
    assert inst.max() == 2


def test_empty_collection(tmp_path):
    path = _write(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})
    assert read_label(path, (8, 9)).tolist() == np.zeros((8, 9), int).tolist()  # a tile without nuclei
    with pytest.raises(DataError, match=r"empty\.geojson.*no nucleus polygons"):
        read_label(path)


def _bad(geometry) -> dict:
    return {"type": "FeatureCollection", "features": [_feature(geometry)]}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [], "annotations": []}), "not GeoJSON"),
    (json.dumps({"type": "FeatureCollection"}), "without a 'features' list"),
    (json.dumps([1, 2]), "not a GeoJSON Feature"),
    (json.dumps({"type": "Polygon", "coordinates": [_square(0, 0, 2, 2)]}), "bare Polygon"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4]]]})), "malformed ring"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": [[[1, 2, 3], [1]]]})), "malformed ring"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": []})), "malformed Polygon"),
    (json.dumps(_bad({"type": "MultiPolygon", "coordinates": 5})), "malformed MultiPolygon"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]})), "fewer than 3"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": [_square(-2, 0, 3, 3)]})), "negative coordinate"),
    (json.dumps(_bad({"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 1], [2, 2]]]})), "NaN"),
    (json.dumps(_bad({"type": "Circle", "coordinates": [1, 2]})), "unknown geometry type"),
    (json.dumps(_bad({"coordinates": [_square(0, 0, 2, 2)]})), "without a 'type'"),
])
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad_outlines.geojson"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_label(path, (10, 10))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_malformed_feature_is_named(tmp_path):
    feats = [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 2, 2)]}),
             _feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]}, id="nuc-7")]
    with pytest.raises(DataError, match=r"feature 2 \(id nuc-7\)"):
        read_label(_write(tmp_path / "t.geojson", feats), (5, 5))


def test_json_that_is_not_geojson_is_refused(tmp_path):
    path = _write(tmp_path / "coco.json", {"images": [], "annotations": [], "categories": []})
    with pytest.raises(DataError, match=r"coco\.json is JSON but not GeoJSON"):
        read_label(path)


def test_pixel_limit_refused_before_allocating(tmp_path):
    side = 30000.0
    path = _write(tmp_path / "huge.geojson", [_feature({"type": "Polygon", "coordinates": [
        _square(side - 10, side - 10, side, side)]})])
    assert side * side > MAX_LABEL_PIXELS
    with pytest.raises(DataError, match=r"huge\.geojson.*MAX_LABEL_PIXELS"):
        read_label(path)
    with pytest.warns(DataWarning, match="outside"):  # with its image's size it is only off-image
        assert read_label(path, (100, 100)).max() == 0


def test_folder_pairs_images_with_geojson(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    expected = {}
    for k, name in enumerate(("a", "b", "c")):
        image, inst = make_tile(size=64, seed=k)
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        expected[name] = inst
    zpath = write_zip([(np.zeros((64, 64, 3), np.uint8), expected[n], {"id": n}) for n in "abc"],
                      tmp_path / "e.zip", hovernet=False, coco=False)
    with zipfile.ZipFile(zpath) as zf:
        geo = {n: zf.read(f"geojson/{n}.geojson") for n in "abc"}
    (tmp_path / "labels" / "a.geojson").write_bytes(geo["a"])
    (tmp_path / "labels" / "b.json").write_bytes(geo["b"])  # QuPath's other naming
    (tmp_path / "labels" / "c.png.geojson").write_bytes(geo["c"])  # image name + .geojson
    items, problems = load_folder(tmp_path)
    assert [p for p in problems if p.severity == "error"] == []
    assert [(i.stem, i.label_path.name) for i in items] == [
        ("a", "a.geojson"), ("b", "b.json"), ("c", "c.png.geojson")]
    for item in items:
        assert item.inst.shape == (64, 64)
        assert aji(expected[item.stem], item.inst) >= 0.98


def test_folder_problem_for_bad_geojson(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.zeros((16, 16, 3), np.uint8))
    _write(tmp_path / "labels" / "a.geojson", [_feature({"type": "Polygon", "coordinates": [_square(1, 1, 5, 5)]})])
    (tmp_path / "labels" / "b.geojson").write_text("oops")
    items, problems = load_folder(tmp_path)
    assert [i.stem for i in items] == ["a"] and items[0].inst.max() == 1
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1 and "b.geojson" in errors[0].message and "not valid JSON" in errors[0].message


def test_label_files_lists_geojson(tmp_path):
    _write(tmp_path / "a.geojson", [_feature({"type": "Polygon", "coordinates": [_square(1, 1, 5, 5)]})])
    _write(tmp_path / "b.json", {"type": "FeatureCollection", "features": []})
    _write(tmp_path / "meta.json", {"note": "not outlines"})
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in label_files([tmp_path])] == ["a.geojson", "b.json"]
    assert read_label(label_files([tmp_path / "a.geojson"])[0]).shape == (5, 5)
