"""The Edit tab on large, rectangular label maps: an overview, a region shown in the editor, edits that
land in the whole map (pure functions, the tab's handlers, and the API end to end)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.errors import DataError, NuDiffError
from engine.structure import relabel
from engine.synthetic import make_tile
from nudiff_app import edit_tab, editing
from nudiff_app.editing import Region


def field(h: int, w: int, seed: int = 0, tile: int = 256) -> np.ndarray:
    """An (h, w) instance map of procedural 256 px tiles side by side (nuclei of realistic size)."""
    rows, cols = -(-h // tile), -(-w // tile)
    out = np.zeros((rows * tile, cols * tile), np.int32)
    offset = 0
    for i in range(rows):
        for j in range(cols):
            _, t = make_tile(tile, seed=seed + 100 * i + j)
            t = t.astype(np.int32)
            t[t > 0] += offset
            offset = max(offset, int(t.max()))
            out[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = t
    return relabel(out[:h, :w])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same nuclei (pixel sets), whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def consecutive(inst: np.ndarray) -> bool:
    return np.array_equal(np.unique(inst), np.arange(int(inst.max()) + 1))


def disc_layer(region: Region, cx: float, cy: float, r: float, color=(255, 255, 255)) -> np.ndarray:
    """An RGBA brush layer at the region's display size with a disc at region pixel (cx, cy), radius r."""
    s = region.scale
    layer = np.zeros((region.h * s, region.w * s, 4), np.uint8)
    yy, xx = np.mgrid[:layer.shape[0], :layer.shape[1]]
    m = ((xx + 0.5) / s - cx - 0.5) ** 2 + ((yy + 0.5) / s - cy - 0.5) ** 2 <= r * r
    layer[m] = (*color, 255)
    return layer


# ----------------------------------------------------------------------------- regions


def test_region_is_clamped_to_the_map():
    shape = (700, 1000)  # height, width
    r = editing.clamp_region(shape, 900, 600, 256)
    assert (r.x0, r.y0, r.w, r.h, r.x1, r.y1) == (744, 444, 256, 256, 1000, 700)
    r = editing.clamp_region(shape, -50, -3, 128)
    assert (r.x0, r.y0, r.w, r.h, r.scale) == (0, 0, 128, 128, 4)
    assert editing.clamp_region(shape, 10, 10, 0) == Region(0, 0, 1000, 700, 0)  # whole map
    assert editing.clamp_region(shape, 10, 10, 0).covers(shape)
    r = editing.clamp_region(shape, 0, 500, 900)  # taller than the map: cut to it
    assert (r.y0, r.w, r.h) == (0, 900, 700)
    r = editing.clamp_region((3000, 5000), 0, 0, 0)  # the editor shows at most MAX_REGION_SIDE
    assert (r.w, r.h) == (editing.MAX_REGION_SIDE,) * 2 and not r.covers((3000, 5000))
    r = editing.region_at(shape, 990, 5, 256)  # centred on a point near a corner
    assert (r.x0, r.y0) == (744, 0)
    r = editing.region_at(shape, 500, 350, 256)
    assert (r.x0, r.y0) == (372, 222)
    assert editing.default_region((512, 300)) == Region(0, 0, 300, 512, 0)  # fits the canvas: whole
    assert editing.default_region(shape) == Region(0, 0, 256, 256, editing.DEFAULT_REGION)


def test_region_text_names_map_and_region():
    r = editing.clamp_region((1000, 1000), 256, 0, 256)
    assert r.describe((1000, 1000)).startswith("region x 256–511, y 0–255 of 1000×1000")
    r = editing.clamp_region((700, 1000), 256, 0, 256)
    assert "region x 256–511, y 0–255 of 1000 (x) × 700 (y)" in r.describe((700, 1000))
    assert editing.clamp_region((32, 32), 0, 0, 0).describe((32, 32)).startswith("whole map")


def test_edit_size_limit():
    editing.check_edit_size((editing.MAX_EDIT_SIDE, 10))
    with pytest.raises(DataError) as e:
        editing.check_edit_size((9000, 12000), "label map big.tif")
    msg = str(e.value)
    assert "big.tif" in msg and "12000×9000" in msg and str(editing.MAX_EDIT_SIDE) in msg


def test_region_view_coordinates_map_to_the_full_map():
    r = editing.clamp_region((700, 1000), 300, 200, 128)  # zoom x4
    assert r.scale == 4
    assert editing.region_to_full(r, 0, 0) == (300, 200)
    assert editing.region_to_full(r, 7, 11) == (301, 202)
    assert editing.region_to_full(r, 511, 511) == (427, 327)
    assert editing.region_to_full(r, 5000, -3) == (427, 200)  # clicks off the picture stay in the region


def test_overview_keeps_the_aspect_and_draws_the_region():
    inst = field(700, 1000)
    region = editing.clamp_region(inst.shape, 256, 0, 256)
    pic = editing.overview(inst, region)
    assert pic.dtype == np.uint8 and pic.shape == (350, 500, 3)  # area-downscaled by 2
    up, down = editing.overview_factor(inst.shape)
    assert (up, down) == (1, 2)
    col = np.array(editing.REGION_COLOR)
    top, left, bottom, right = 0, 128, 127, 255  # the region's rectangle in overview pixels
    for y, x in [(top, left + 50), (bottom, left + 10), (top + 60, left), (top + 60, right)]:
        assert (pic[y, x] == col).all(), (y, x)
    assert not (pic[200:300, 300:400] == col).all(-1).all()
    # a click on the overview maps back to the block's centre on the full map
    assert editing.overview_to_full(inst.shape, 128, 10) == (257, 21)
    # small maps are magnified; very large ones reduced to about OVERVIEW_SIZE, keeping the aspect
    small = editing.overview(np.zeros((32, 48), np.int32), editing.default_region((32, 48)))
    assert small.shape == (160, 240, 3)  # x5: long side about OVERVIEW_MIN
    assert (small[0, :] == col).all() and (small[:, -1] == col).all()  # the whole map is the region
    assert editing.overview_to_full((32, 48), 239, 159) == (47, 31)
    big = editing.overview(np.zeros((3000, 8192), np.int32))
    assert big.shape == (188, 512, 3) and (big == editing.BACKGROUND).all()


def test_overview_colours_match_the_editor():
    inst = np.zeros((1200, 900), np.int32)
    inst[100:300, 200:500] = 1
    inst[600:1000, 100:300] = 2
    pic = editing.overview(inst)
    f = editing.overview_factor(inst.shape)[1]
    colour = editing.editor_background(np.array([[1]]))[0, 0]  # id 1 in the editor
    assert (pic[200 // f, 350 // f] == colour).all()
    assert (pic[5, 5] == editing.BACKGROUND).all()


# ----------------------------------------------------------------------------- edits land in the full map


def test_strokes_in_a_region_land_at_the_right_place():
    shape = (700, 1000)
    inst = np.zeros(shape, np.int32)
    region = editing.clamp_region(shape, 300, 200, 128)
    layer = np.zeros((512, 512, 4), np.uint8)
    layer[100:140, 40:80] = (255, 255, 255, 255)  # display rows 100..139, cols 40..79 at zoom 4
    add, erase = editing.region_strokes([layer], shape, region)
    assert not erase.any()
    ys, xs = np.nonzero(add)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (225, 234, 310, 319)
    out, added = editing.apply_strokes(inst, add, erase, merge_touching=False, min_px=5)
    assert added == 1 and out.max() == 1 and np.array_equal(out > 0, add)
    # erasing in another region of the same map
    region2 = editing.clamp_region(shape, 256, 128, 256)
    er_layer = np.zeros((512, 512, 4), np.uint8)
    er_layer[194:214, 108:128] = (255, 0, 255, 255)  # region px y 97..106, x 54..63 -> full y 225..234, x 310..319
    add2, erase2 = editing.region_strokes([er_layer], shape, region2)
    assert not add2.any() and np.array_equal(erase2, add)
    out2, _ = editing.apply_strokes(out, add2, erase2, merge_touching=False, min_px=5)
    assert out2.max() == 0


def test_stroke_across_the_region_border_joins_a_nucleus_outside():
    shape = (600, 600)
    inst = np.zeros(shape, np.int32)
    inst[100:112, 250:290] = 1  # crosses the region's right border (x = 255 | 256)
    inst[300:320, 300:320] = 2
    inst[130:140, 240:250] = 3  # a nucleus under the stroke's far end
    inst[500:510, 500:510] = 4
    region = editing.clamp_region(shape, 0, 0, 256)  # zoom x2
    # a vertical stroke inside the region, from nucleus 1 (x 250..255 inside) down to nucleus 3
    layer = np.zeros((512, 512, 4), np.uint8)
    layer[2 * 105:2 * 135, 2 * 244:2 * 252] = (255, 255, 255, 255)
    add, erase = editing.region_strokes([layer], shape, region)
    out, added = editing.apply_strokes(inst, add, erase, merge_touching=True, min_px=5)
    assert added == 0 and out.max() == 3 and consecutive(out)
    k = out[105, 288]  # nucleus 1's part outside the region
    assert k > 0 and out[105, 252] == k and out[120, 245] == k and out[135, 245] == k
    assert len(np.unique(out[100:140, 240:290])) == 2  # one nucleus (and background) there
    # the nuclei away from the stroke are unchanged (up to their ids)
    assert np.array_equal(out[300:320, 300:320] > 0, inst[300:320, 300:320] > 0)
    assert out[505, 505] > 0 and out[505, 505] != k
    # keep-separate mode: a new nucleus of its own, drawn over the others
    out, added = editing.apply_strokes(inst, add, erase, merge_touching=False, min_px=5)
    assert added == 1 and out.max() == 5 and out[120, 245] == 5 and out[105, 288] == 1


def test_delete_at_full_map_coordinates():
    inst = field(700, 1000, seed=3)
    n = int(inst.max())
    y, x = 650, 900  # far outside a top-left region
    ys, xs = np.nonzero(inst)
    i = np.argmin((ys - y) ** 2 + (xs - x) ** 2)
    y, x = int(ys[i]), int(xs[i])
    k0 = int(inst[y, x])
    out, k = editing.delete_at(inst, y, x)
    assert k == k0 and out.max() == n - 1 and consecutive(out) and out[y, x] == 0
    keep = (inst > 0) & (inst != k0)
    assert np.array_equal(out > 0, keep) and same_partition(out, np.where(inst == k0, 0, inst))
    # only the highest id changed its name (it took the deleted one's)
    moved = (inst != out) & (out > 0)
    assert set(np.unique(inst[moved])) <= {n}


def _reference_apply(inst, add, erase, merge_touching, min_px):
    """The original whole-map algorithm (per component work on the full image)."""
    out = np.asarray(inst).astype(np.int32).copy()
    out[erase] = 0
    add = ndimage.binary_fill_holes(add)
    comps, n = ndimage.label(add, structure=np.ones((3, 3), bool))
    next_id = int(out.max()) + 1
    for c in range(1, n + 1):
        m = comps == c
        if merge_touching:
            touched = np.unique(out[ndimage.binary_dilation(m, structure=np.ones((3, 3), bool))])
            touched = touched[touched > 0]
            if touched.size:
                keep = int(touched.min())
                out[np.isin(out, touched)] = keep
                out[m] = keep
                continue
        out[m] = next_id
        next_id += 1
    return editing.clean_fragments(out, min_px)


@pytest.mark.parametrize("merge", [False, True])
def test_apply_strokes_matches_the_whole_map_algorithm(merge):
    rng = np.random.default_rng(1 if merge else 2)
    inst = editing.clean_fragments(field(300, 400, seed=5), 8)  # no fragments left to clean elsewhere
    for _ in range(6):
        add = np.zeros(inst.shape, bool)
        erase = np.zeros(inst.shape, bool)
        for _ in range(3):  # a few blobs, rings and bars
            y, x = rng.integers(0, 300), rng.integers(0, 400)
            r = int(rng.integers(3, 15))
            yy, xx = np.ogrid[:300, :400]
            d = (yy - y) ** 2 + (xx - x) ** 2
            kind = rng.integers(3)
            if kind == 0:
                add |= d <= r * r
            elif kind == 1:
                add |= (d <= r * r) & (d >= (r - 2) ** 2)
            else:
                erase[max(0, y - 2):y + 2, max(0, x - r):x + r] = True
        new, added = editing.apply_strokes(inst, add, erase, merge_touching=merge, min_px=8)
        ref = _reference_apply(inst, add, erase, merge, 8)
        assert consecutive(new) and new.max() == ref.max()
        assert same_partition(new, ref)
        inst = new


# ----------------------------------------------------------------------------- the tab's handlers


def test_handlers_work_on_regions_of_the_whole_map(tmp_path):
    import tifffile

    from nudiff_app.state import Session

    inst = field(700, 1000, seed=4)
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, inst.astype(np.uint16))
    sess = Session("test-session", tmp_path / "s")
    status, editor, labels, info, _ = edit_tab.upload_label(sess, str(path))
    assert status.startswith("Loaded") and sess.current.inst.shape == (700, 1000)
    assert "1000 (x) × 700 (y) px" in info and "region x 0–255, y 0–255" in info
    assert editor["background"].shape == (512, 512, 3) and labels.shape == (512, 512, 3)
    np.save(tmp_path / "wide.npy", np.zeros((10, editing.MAX_EDIT_SIDE + 1), np.uint16))
    side = editing.MAX_EDIT_SIDE
    with pytest.raises(DataError, match=f"wide.npy is {side + 1}×10 px.*at most {side}"):
        edit_tab.upload_label(sess, str(tmp_path / "wide.npy"))
    assert sess.current.inst.shape == (700, 1000)  # unchanged
    pic, x0, y0, size = edit_tab.overview_values(sess)
    assert pic.shape == (350, 500, 3) and (x0, y0, size) == (0, 0, 256)
    # a click on the overview centres the region there (overview pixel (400, 300) = full (801, 601))
    out = edit_tab.overview_click(sess, 400, 300, 128)
    r = edit_tab.region_of(sess.current)
    assert (r.x0, r.y0, r.w, r.h) == (737, 537, 128, 128) and out[-3:] == (737, 537, 128)
    with pytest.raises(NuDiffError, match="region size"):
        edit_tab.select_region(sess, 0, 0, "big")
    assert "region x 737–864, y 537–664" in out[3] and out[1]["background"].shape == (512, 512, 3)
    # a click on the region's label view deletes in full-map coordinates
    ys, xs = np.nonzero(inst[537:665, 737:865])
    k = int(inst[537 + ys[0], 737 + xs[0]])
    status, *_ = edit_tab.delete_in_view(sess, 4 * xs[0] + 1, 4 * ys[0] + 2)
    assert status.startswith("Deleted") and not (sess.current.inst[inst == k]).any()
    assert sess.current.inst.max() == inst.max() - 1
    # pending strokes are applied to the old region before the region moves
    before = sess.current.inst.copy()
    layer = disc_layer(r, 64, 64, 4)  # the region's centre: full (801, 601)
    out = edit_tab.select_region(sess, 0, 0, 0, {"background": None, "layers": [layer], "composite": None},
                                 edit_tab.SPLIT, 5)
    assert out[0].startswith("Pending strokes applied. Showing the whole map (zoom ×1)")
    assert edit_tab.region_of(sess.current) == Region(0, 0, 1000, 700, 0)
    ys, xs = np.nonzero((sess.current.inst > 0) != (before > 0))
    assert ys.size and np.abs(ys - 601).max() < 40 and np.abs(xs - 801).max() < 40
    assert sess.current.inst[601, 801] == sess.current.inst.max()  # the new nucleus
    assert edit_tab.undo(sess)[0] == "Undone." and np.array_equal(sess.current.inst, before)


# ----------------------------------------------------------------------------- the API end to end


def test_api_edits_a_region_of_a_large_rectangular_map(studio, tmp_path):
    import cv2
    import tifffile
    from gradio_client import Client, handle_file

    demo, url, _ = studio
    client = Client(url, verbose=False)
    assert "/edit_region" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    inst = field(700, 1000, seed=7)
    n = int(inst.max())
    tifffile.imwrite(tmp_path / "field.tif", inst.astype(np.uint16))
    out = client.predict(handle_file(str(tmp_path / "field.tif")), api_name="/edit_upload_label")
    assert len(out) == 5 and out[0].startswith("Loaded `field.tif`")
    assert f"**{n} nuclei**" in out[3] and "1000 (x) × 700 (y) px" in out[3]
    sess = demo.nudiff.session(client.session_hash)
    assert np.array_equal(sess.current.inst, inst)  # the whole map, not a centre crop

    out = client.predict(256, 0, 256, api_name="/edit_region")
    assert len(out) == 9 and out[0].startswith("Showing region x 256–511, y 0–255")
    assert "region x 256–511, y 0–255 of 1000 (x) × 700 (y)" in out[3]
    overview = cv2.imread(out[5])
    assert overview.shape == (350, 500, 3) and tuple(out[6:9]) == (256, 0, 256)
    background = cv2.imread(out[1]["background"] if isinstance(out[1]["background"], str)
                            else out[1]["background"]["path"])
    assert background.shape[:2] == (512, 512)  # the region at zoom x2

    # a disc on empty ground inside the region: one new nucleus there, nothing changes elsewhere
    region = editing.clamp_region(inst.shape, 256, 0, 256)
    crop = inst[region.slices]
    dist = ndimage.distance_transform_edt(crop == 0)
    dist[:8], dist[-8:], dist[:, :8], dist[:, -8:] = 0, 0, 0, 0
    cy, cx = np.unravel_index(np.argmax(dist), dist.shape)
    r = min(6.0, float(dist[cy, cx]) - 2)
    assert r >= 2
    layer = disc_layer(region, cx, cy, r)
    cv2.imwrite(str(tmp_path / "layer.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "bg.png"), np.full((512, 512, 3), 40, np.uint8))
    editor = {"background": handle_file(str(tmp_path / "bg.png")),
              "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}
    out = client.predict(editor, edit_tab.SPLIT, 3, api_name="/edit_apply")
    assert out[0] == f"Applied: {n} → {n + 1} nuclei." and "edited by hand" in out[3]
    new = sess.current.inst
    ys, xs = np.nonzero(new != inst)
    assert ys.size and (ys >= 0).all() and (ys < 256).all() and (xs >= 256).all() and (xs < 512).all()
    assert (new[ys, xs] == n + 1).all() and abs(ys.mean() - cy) < 1.5 and abs(xs.mean() - 256 - cx) < 1.5

    # delete a nucleus far outside the region, by full-map coordinates
    ys, xs = np.nonzero(inst[500:, 700:])
    y, x = 500 + int(ys[0]), 700 + int(xs[0])
    k = int(inst[y, x])
    out = client.predict(x, y, api_name="/edit_delete_at")
    assert out[0] == f"Deleted a nucleus ({n} left)." and f"**{n} nuclei**" in out[3]
    assert not sess.current.inst[inst == k].any()
    out = client.predict(api_name="/edit_undo")
    assert out[0] == "Undone." and np.array_equal(sess.current.inst, new)
