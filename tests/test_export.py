"""engine.export: zip layout, alignment across formats, atomicity, folder export, safe unzip."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from engine.data import load_folder
from engine.errors import DataError
from engine.export import write_folder, write_zip
from engine.unzip import safe_extract_zip
from engine.synthetic import make_tile


def _pairs(n=3, size=48):
    out = []
    for i in range(n):
        image, inst = make_tile(size, seed=10 + i)
        inst = inst.copy()
        inst[inst > 0] += 5  # non-consecutive ids: the export must renumber them consistently
        out.append((image, inst, {"seed": 10 + i, "w": 2.0, "sampler": "dpm++", "steps": 20,
                                  "structure_checkpoint": "s.safetensors", "structure_sha256": "ab" * 32,
                                  "image_checkpoint": "i.safetensors", "image_sha256": "cd" * 32,
                                  "edited": i == 1}))
    return out


def _read_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _poly_mask(rings, shape):
    """Rasterise polygon rings given as pixel-centre coordinates."""
    m = np.zeros(shape, np.uint8)
    for r in rings:
        pts = np.round(np.asarray(r, np.float64).reshape(-1, 2) - 0.5).astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
        cv2.polylines(m, [pts], True, 1)
    return m.astype(bool)


def _assert_outlines(poly, mask):
    """The rasterised polygon covers the nucleus and little else (concavities may add a pixel or two)."""
    assert not (mask & ~poly).any()
    assert (poly & ~mask).sum() <= 0.15 * mask.sum() + 2


def test_zip_contents_aligned_across_formats(tmp_path):
    pairs = _pairs()
    out = write_zip(pairs, tmp_path / "basket.zip")
    assert out == tmp_path / "basket.zip" and out.exists()
    files = _read_zip(out)
    ids = sorted(Path(n).stem for n in files if n.startswith("images/"))
    assert len(ids) == 3
    for sub, ext in (("labels", "tif"), ("hovernet", "npy"), ("geojson", "geojson")):
        assert sorted(Path(n).stem for n in files if n.startswith(f"{sub}/")) == ids
        assert all(n.endswith(ext) for n in files if n.startswith(f"{sub}/"))
    assert {"coco.json", "manifest.csv"} <= set(files)
    assert not [n for n in Path(tmp_path).iterdir() if n.name != "basket.zip"]  # no temp file left

    coco = json.loads(files["coco.json"])
    assert coco["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
    rows = list(csv.DictReader(io.StringIO(files["manifest.csv"].decode())))
    assert [r["id"] for r in rows] == ids
    for (image, inst_in, meta), pid, row in zip(pairs, ids, rows):
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(files[f"images/{pid}.png"], np.uint8), 1), cv2.COLOR_BGR2RGB)
        lab = tifffile.imread(io.BytesIO(files[f"labels/{pid}.tif"]))
        hv = np.load(io.BytesIO(files[f"hovernet/{pid}.npy"]))
        assert lab.dtype == np.uint16 and lab.shape == img.shape[:2] == inst_in.shape
        assert np.array_equal(img, image)
        # ids consecutive 1..N and the same partition as the input
        n = int(lab.max())
        assert np.array_equal(np.unique(lab), np.arange(n + 1))
        assert n == len(np.unique(inst_in)) - 1
        for k in np.unique(inst_in)[1:]:
            assert len(np.unique(lab[inst_in == k])) == 1
        assert hv.shape == (*img.shape[:2], 4) and hv.dtype == np.int32
        assert np.array_equal(hv[..., :3], image) and np.array_equal(hv[..., 3], lab)
        # manifest
        assert int(row["n_nuclei"]) == n and row["image"] == f"images/{pid}.png"
        assert row["edited"] == ("true" if meta["edited"] else "false")
        assert row["seed"] == str(meta["seed"]) and row["sampler"] == "dpm++" and float(row["w"]) == 2.0
        assert row["structure_sha256"] == "ab" * 32
        # coco
        img_rec = next(r for r in coco["images"] if r["file_name"] == f"images/{pid}.png")
        assert (img_rec["height"], img_rec["width"]) == lab.shape
        anns = [a for a in coco["annotations"] if a["image_id"] == img_rec["id"]]
        assert sorted(a["instance_id"] for a in anns) == list(range(1, n + 1))
        for a in anns:
            k = a["instance_id"]
            m = lab == k
            assert a["area"] == int(m.sum()) and a["iscrowd"] == 0 and a["category_id"] == 1
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            poly = _poly_mask([np.array(s).reshape(-1, 2) for s in a["segmentation"]], lab.shape)
            _assert_outlines(poly, m)
        # geojson
        gj = json.loads(files[f"geojson/{pid}.geojson"])
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == n
        for f in gj["features"]:
            p = f["properties"]
            assert p["objectType"] == "annotation" and p["classification"]["name"] == "Nucleus"
            g = f["geometry"]
            rings = [g["coordinates"][0]] if g["type"] == "Polygon" else [c[0] for c in g["coordinates"]]
            assert all(r[0] == r[-1] and len(r) >= 4 for r in rings)  # closed rings
            poly = _poly_mask([np.array(r) for r in rings], lab.shape)
            _assert_outlines(poly, lab == p["instance_id"])


def test_optional_formats_can_be_left_out(tmp_path):
    files = _read_zip(write_zip(_pairs(1), tmp_path / "a.zip", hovernet=False, coco=False, geojson=False))
    assert sorted(files) == ["images/pair_0001.png", "labels/pair_0001.tif", "manifest.csv"]


def test_tiny_and_fragmented_nuclei_give_valid_polygons(tmp_path):
    image = np.full((16, 16, 3), 200, np.uint8)
    inst = np.zeros((16, 16), np.int32)
    inst[2, 2] = 1  # one pixel
    inst[5, 5:7] = 2  # two pixels
    inst[10:13, 1:4] = 3
    inst[10:13, 8:11] = 3  # a nucleus in two pieces
    files = _read_zip(write_zip([(image, inst, {})], tmp_path / "t.zip"))
    coco = json.loads(files["coco.json"])
    assert len(coco["annotations"]) == 3
    assert all(len(s) >= 6 for a in coco["annotations"] for s in a["segmentation"])
    frag = next(a for a in coco["annotations"] if a["instance_id"] == 3)
    assert len(frag["segmentation"]) == 2 and frag["area"] == 18
    gj = json.loads(files["geojson/pair_0001.geojson"])
    kinds = {f["properties"]["instance_id"]: f["geometry"]["type"] for f in gj["features"]}
    assert kinds == {1: "Polygon", 2: "Polygon", 3: "MultiPolygon"}


def test_failure_leaves_no_zip_and_keeps_previous(tmp_path):
    target = tmp_path / "out.zip"
    good = _pairs(1)
    bad = _pairs(2)
    bad[1] = (bad[1][0], bad[1][1][:-3], bad[1][2])  # label smaller than its image
    with pytest.raises(DataError, match="pair 2"):
        write_zip(bad, target)
    assert list(tmp_path.iterdir()) == []
    write_zip(good, target)
    before = target.read_bytes()

    class Boom:  # passes validation, then fails while the archive is being written
        image = np.zeros((8, 8, 3), np.uint8)
        meta = {}

        @property
        def inst(self):
            return np.zeros((8, 8), np.int32)

    import engine.export as ex

    orig = ex._tif
    ex._tif = lambda inst: (_ for _ in ()).throw(OSError("disk full"))
    try:
        with pytest.raises(OSError, match="disk full"):
            write_zip([Boom()], target)
    finally:
        ex._tif = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip"]
    assert target.read_bytes() == before


def test_empty_basket_is_a_readable_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        write_zip([], tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_write_folder_is_a_labeled_folder(tmp_path):
    pairs = _pairs(2, size=40)
    folder = write_folder(pairs, tmp_path / "synthetic")
    items, problems = load_folder(folder)
    assert [p for p in problems if p.severity == "error"] == []
    assert len(items) == 2
    for it, (image, inst, _) in zip(items, pairs):
        assert np.array_equal(it.image, image)
        assert it.inst.max() == len(np.unique(inst)) - 1
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert [r["edited"] for r in rows] == ["false", "true"]
    with pytest.raises(DataError, match="not empty"):
        write_folder(pairs, folder)


def _zip_with(tmp_path, entries, name="u.zip"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def test_safe_extract_ok_and_skips_junk(tmp_path):
    src = _zip_with(tmp_path, [("data/images/a.png", b"x"), ("data/labels/a.png", b"y"),
                               ("__MACOSX/data/._a.png", b"z"), ("data/.DS_Store", b"")])
    dest = safe_extract_zip(src, tmp_path / "out")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == \
        ["data/images/a.png", "data/labels/a.png"]


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "data/../../evil.txt", "C:/evil.txt"])
def test_safe_extract_rejects_traversal(tmp_path, member):
    src = _zip_with(tmp_path, [("ok.txt", b"fine"), (member, b"evil")])
    with pytest.raises(DataError, match="refusing"):
        safe_extract_zip(src, tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temp folder left


def test_safe_extract_rejects_symlinks(tmp_path):
    link = zipfile.ZipInfo("data/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    src = _zip_with(tmp_path, [(link, "/etc/passwd")])
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_zip(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_rejects_bombs_and_corrupt_files(tmp_path):
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (4 << 20))
    assert src.stat().st_size < 100_000
    with pytest.raises(DataError, match="MB"):
        safe_extract_zip(src, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()
    # a header that under-declares the size is caught while decompressing
    with pytest.raises(DataError):
        _lying = tmp_path / "lying.zip"
        data = bytearray(src.read_bytes())
        info = zipfile.ZipFile(src).infolist()[0]
        # patch the declared uncompressed size in the central directory and local header
        for sig, off in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
            i = data.find(sig)
            data[i + off:i + off + 4] = (10).to_bytes(4, "little")
        _lying.write_bytes(bytes(data))
        assert info.file_size == 4 << 20
        safe_extract_zip(_lying, tmp_path / "out2", max_bytes=1 << 20)
    assert not (tmp_path / "out2").exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        safe_extract_zip(bad, tmp_path / "out3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "bomb.zip", "lying.zip"]
    assert os.path.exists(src)
