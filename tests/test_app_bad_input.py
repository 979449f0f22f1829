"""Bad input through the studio's API: the app-side half of issue 22's list (the command-line half, and the
count of both, is in tests/test_bad_input.py).

The real studio is launched with the tiny test models and driven with gradio_client. Every bad request must come
back as a readable one-line message (a status reading "**Error:** ..." or, for values Gradio itself refuses,
an AppError), with no Python traceback and no "Unexpected error" (an exception the studio did not expect),
must write nothing in the studio's work folder (uploads, runs, exports, sessions), and the studio must go on
answering: a good request follows each one.
"""

from __future__ import annotations

import struct
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import png_bomb
from engine.synthetic import write_folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoints):
    """Files the bad requests send (made once)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    good = write_folder(d / "good", n_images=2, size=64, seed=0)
    f = SimpleNamespace(d=d, s_ckpt=s_ckpt, i_ckpt=i_ckpt, good=good)
    f.junk_png = d / "junk.png"
    f.junk_png.write_bytes(b"this is not a png")
    (d / "junk.json").write_text("garbage{")  # checkpoint records (with weights files beside them)
    (d / "junk.safetensors").write_bytes(b"x")
    (d / "other.json").write_text('{"format": 1, "name": "not a model"}')
    (d / "other.safetensors").write_bytes(b"x")
    f.not_zip = d / "not_a.zip"
    f.not_zip.write_bytes(b"PK but not a zip at all")
    np.save(d / "empty.npy", np.zeros((0, 0), np.int32))
    np.save(d / "tiny.npy", np.ones((4, 4), np.int32))
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "colour.npy", np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8))
    (d / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (d / "coco.json").write_text('{"images": [], "annotations": [], "categories": []}')
    (d / "negative.geojson").write_text('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
                                        '[[[-5, 1], [4, 1], [4, 6], [-5, 1]]]}}')
    f.bomb_png = png_bomb(d / "bomb.png", 9000, 9000)  # 81 MP declared, a few hundred kB on disk
    # zips: path traversal, an absolute path, a declared size of 3 GB (zip bomb), 20001 entries, no images/,
    # images/ without labels/, and a dataset of pixel bombs
    with zipfile.ZipFile(d / "traversal.zip", "w") as zf:
        zf.writestr("data/images/a.png", "x")
        zf.writestr("../../escape.txt", "x")
    with zipfile.ZipFile(d / "absolute.zip", "w") as zf:
        zf.writestr("/tmp/nudiff-absolute.txt", "x")
    f.zip_bomb = _declared_size_bomb(d / "bomb.zip", 3_000_000_000)
    with zipfile.ZipFile(d / "many.zip", "w") as zf:
        for i in range(20001):
            zf.writestr(f"d/{i}.txt", b"")
    with zipfile.ZipFile(d / "no_images.zip", "w") as zf:
        zf.writestr("stuff/readme.txt", "x")
    with zipfile.ZipFile(d / "no_labels.zip", "w") as zf:
        zf.write(good / "images" / "synth_000.png", "d/images/a.png")
    png_bomb(d / "huge.png", 12000, 12000)  # 144 MP: over the 100 MP pixel budget
    with zipfile.ZipFile(d / "pixel_bomb.zip", "w") as zf:
        zf.write(d / "huge.png", "d/images/a.png")
        zf.write(d / "huge.png", "d/labels/a.png")
    # training folders: images/ only, labels that match no image, and label maps without nuclei
    f.images_only = write_folder(d / "images_only", n_images=1, size=64, seed=0)
    for p in (f.images_only / "labels").iterdir():
        p.unlink()
    (f.images_only / "labels").rmdir()
    f.unmatched = write_folder(d / "unmatched", n_images=1, size=64, seed=0)
    for p in (f.unmatched / "labels").iterdir():
        p.rename(p.with_name("other_" + p.name))
    f.no_nuclei = write_folder(d / "no_nuclei", n_images=2, size=64, seed=0)
    for p in (f.no_nuclei / "labels").iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(p)
    return f


def _declared_size_bomb(path: Path, size: int) -> Path:
    """A small zip whose central directory declares one member of `size` bytes uncompressed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("d/images/a.png", b"\0" * 1000)
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + 24  # uncompressed size field of the central directory header
    data[at:at + 4] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    assert zipfile.ZipFile(path).infolist()[0].file_size == size
    return path


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def nothing_written(work: Path):
    before = _files(work)
    yield
    after = _files(work)
    assert after == before, {k: after.get(k) for k in set(after) ^ set(before) | {
        k for k in after if k in before and after[k] != before[k]}}


def refused(call, index: int = 0) -> str:
    """The one-line message of a refused request (its status output, or Gradio's AppError)."""
    try:
        out = call()
    except AppError as e:
        msg = str(e)
    else:
        status = out[index] if isinstance(out, (tuple, list)) else out
        assert isinstance(status, str) and status.startswith("**Error:** "), out
        msg = status[len("**Error:** "):]
    assert msg.strip() and "\n" not in msg, msg
    assert "Traceback" not in msg and "Unexpected error" not in msg and 'File "' not in msg, msg
    return msg


def still_serving(client: Client, i_ckpt: str) -> None:
    out = client.predict(32, i_ckpt, api_name="/edit_blank")
    assert out[0].startswith("Blank 32×32 tile"), out[0]


# (kind, api name, arguments from `inputs`, expected words, index of the status output, needs a structure first)
CASES = [
    # Train tab: inspection and uploads
    ("inspect: folder missing", "/inspect_folder", lambda f: (str(f.d / "nowhere"), 32), "folder not found", 0, False),
    ("inspect: a file, not a folder", "/inspect_folder", lambda f: (str(f.junk_png), 32), "not a folder", 0, False),
    ("inspect: tile size 0", "/inspect_folder", lambda f: (str(f.good), 0), "tile size 0", 0, False),
    ("inspect: tile size -8", "/inspect_folder", lambda f: (str(f.good), -8), "tile size -8", 0, False),
    ("inspect: tile size infinite", "/inspect_folder", lambda f: (str(f.good), "inf"), "tile size 'inf'", 0, False),
    ("inspect: tile size not a number", "/inspect_folder", lambda f: (str(f.good), "abc"), "tile size 'abc'", 0,
     False),
    ("upload: not a zip", "/upload_dataset", lambda f: (handle_file(str(f.not_zip)), 32), "not a readable zip", 1,
     False),
    ("upload: path traversal", "/upload_dataset", lambda f: (handle_file(str(f.d / "traversal.zip")), 32),
     "refusing", 1, False),
    ("upload: absolute path", "/upload_dataset", lambda f: (handle_file(str(f.d / "absolute.zip")), 32),
     "refusing", 1, False),
    ("upload: zip bomb (3 GB declared)", "/upload_dataset", lambda f: (handle_file(str(f.zip_bomb)), 32),
     "would unpack to 3000 MB", 1, False),
    ("upload: 20001 entries", "/upload_dataset", lambda f: (handle_file(str(f.d / "many.zip")), 32),
     "holds 20001 entries", 1, False),
    ("upload: no images/", "/upload_dataset", lambda f: (handle_file(str(f.d / "no_images.zip")), 32),
     "no images/ folder", 1, False),
    ("upload: no labels/", "/upload_dataset", lambda f: (handle_file(str(f.d / "no_labels.zip")), 32),
     "no labels/, masks/ or annotations/", 1, False),
    ("upload: pixel bombs", "/upload_dataset", lambda f: (handle_file(str(f.d / "pixel_bomb.zip")), 32),
     "NUDIFF_MAX_PIXELS", 1, False),
    # Train tab: starting a job (refused before any run folder is made)
    ("train: folder missing", "/train_structure",
     lambda f: (str(f.d / "nowhere"), "r", "test", 32, "100%", 5, 0, 2), "not found", 0, False),
    ("train: images/ without labels/", "/train_structure",
     lambda f: (str(f.images_only), "r", "test", 32, "100%", 5, 0, 2), "no labels/", 0, False),
    ("train: labels match no image", "/train_structure",
     lambda f: (str(f.unmatched), "r", "test", 32, "100%", 5, 0, 2), "has no label", 0, False),
    ("train: run name with ../", "/train_image",
     lambda f: (str(f.good), "../../evil", "test", 32, "100%", 5, 0, 2), "run name", 0, False),
    ("train: 0 steps", "/train_structure", lambda f: (str(f.good), "r", "test", 32, "100%", 0, 0, 2),
     "minimum", 0, False),
    ("train: batch size 0", "/train_structure", lambda f: (str(f.good), "r", "test", 32, "100%", 5, 0, 0),
     "minimum", 0, False),
    ("train: tile size not a number", "/train_structure",
     lambda f: (str(f.good), "r", "test", "abc", "100%", 5, 0, 2), "tile size 'abc'", 0, False),
    ("train: tile size the preset cannot take", "/train_structure",
     lambda f: (str(f.good), "r", "test", 33, "100%", 5, 0, 2), "does not suit preset 'test'", 0, False),
    # Structures tab
    ("sample: 0 structures", "/sample_structures", lambda f: (f.s_ckpt, 0, "ddim", 2, 0), "minimum", 0, False),
    ("sample: negative steps", "/sample_structures", lambda f: (f.s_ckpt, 2, "ddim", -3, 0), "minimum", 0, False),
    ("sample: unknown sampler", "/sample_structures", lambda f: (f.s_ckpt, 2, "bogus", 2, 0), "bogus", 0, False),
    ("sample: size 4 px", "/sample_structures", lambda f: (f.s_ckpt, 2, "ddim", 2, 0, 1.0, 4), "at least 8 px",
     0, False),
    ("sample: size -5 px", "/sample_structures", lambda f: (f.s_ckpt, 2, "ddim", 2, 0, 1.0, -5), "minimum", 0,
     False),
    ("sample: checkpoint missing", "/sample_structures", lambda f: (str(f.d / "none.json"), 2, "ddim", 2, 0),
     "not found", 0, False),
    ("sample: checkpoint record not JSON", "/sample_structures",
     lambda f: (str(f.d / "junk.json"), 2, "ddim", 2, 0), "is not valid JSON", 0, False),
    ("sample: checkpoint record of something else", "/sample_structures",
     lambda f: (str(f.d / "other.json"), 2, "ddim", 2, 0), "not a NuDiff checkpoint record", 0, False),
    ("send to edit: nothing sampled", "/send_to_edit", lambda f: (0,), "sample some structures first", 0, False),
    # Edit tab
    ("edit upload: not an image", "/edit_upload_label", lambda f: (handle_file(str(f.junk_png)),),
     "corrupt or unsupported file", 0, False),
    ("edit upload: empty label map", "/edit_upload_label", lambda f: (handle_file(str(f.d / "empty.npy")),),
     "at least 8 px", 0, False),
    ("edit upload: 4x4 label map", "/edit_upload_label", lambda f: (handle_file(str(f.d / "tiny.npy")),),
     "at least 8 px", 0, False),
    ("edit upload: pickled npy", "/edit_upload_label", lambda f: (handle_file(str(f.d / "pickled.npy")),),
     "pickled Python objects", 0, False),
    ("edit upload: colour array", "/edit_upload_label", lambda f: (handle_file(str(f.d / "colour.npy")),),
     "colour image", 0, False),
    ("edit upload: malformed GeoJSON", "/edit_upload_label", lambda f: (handle_file(str(f.d / "broken.geojson")),),
     "not valid JSON", 0, False),
    ("edit upload: JSON that is not GeoJSON", "/edit_upload_label", lambda f: (handle_file(str(f.d / "coco.json")),),
     "not GeoJSON", 0, False),
    ("edit upload: negative GeoJSON coordinate", "/edit_upload_label",
     lambda f: (handle_file(str(f.d / "negative.geojson")),), "negative coordinate", 0, False),
    ("edit upload: pixel bomb", "/edit_upload_label", lambda f: (handle_file(str(f.bomb_png)),),
     "9000×9000 px", 0, False),
    ("edit upload: a file type it does not take", "/edit_upload_label",
     lambda f: (handle_file(str(f.not_zip)),), "Invalid file type", 0, False),
    ("edit blank: negative size", "/edit_blank", lambda f: (-5, f.i_ckpt), "between 8 and 8192", 0, False),
    ("edit blank: absurd size", "/edit_blank", lambda f: (10 ** 9, f.i_ckpt), "between 8 and 8192", 0, False),
    ("edit: nothing to edit", "/edit_delete_at", lambda f: (3, 3), "no structure to edit yet", 0, False),
    ("edit region: size not a number", "/edit_region", lambda f: (0, 0, "abc"), "region size 'abc'", 0, True),
    # Synthesize tab
    ("synthesize: nothing to synthesize from", "/synthesize", lambda f: (f.i_ckpt, 2.0, "ddim", 2, 0, 1),
     "no structure", 0, False),
    ("synthesize: w -1", "/synthesize", lambda f: (f.i_ckpt, -1.0, "ddim", 2, 0, 1), "minimum", 0, True),
    ("synthesize: w 99", "/synthesize", lambda f: (f.i_ckpt, 99.0, "ddim", 2, 0, 1), "maximum", 0, True),
    ("synthesize: 0 variants", "/synthesize", lambda f: (f.i_ckpt, 2.0, "ddim", 2, 0, 0), "minimum", 0, True),
    ("synthesize: 0 steps", "/synthesize", lambda f: (f.i_ckpt, 2.0, "ddim", 0, 0, 1), "minimum", 0, True),
    ("synthesize: a structure model", "/synthesize", lambda f: (f.s_ckpt, 2.0, "ddim", 2, 0, 1),
     "is a structure model, but an image model is needed", 0, True),
    ("add to basket: nothing synthesized", "/add_to_basket", lambda f: (0, 0.8), "nothing to add", 0, False),
    # Export tab
    ("export: empty basket", "/export_zip", lambda f: ([], True), "nothing to export", 0, False),
    ("assess: empty basket", "/basket_quality", lambda f: (True, "", ""), "nothing to assess", 0, False),
    ("review: empty basket", "/accept_pair", lambda f: (0, 0.8), "the basket is empty", 0, False),
]


@pytest.mark.parametrize("kind,api,args,expected,index,needs_structure", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_in_one_line_and_writes_nothing(studio, inputs, kind, api, args, expected, index,
                                                               needs_structure):
    _, url, work = studio
    client = Client(url, verbose=False)  # a new session: nothing sampled, edited or in its basket
    if needs_structure:
        assert client.predict(32, inputs.i_ckpt, api_name="/edit_blank")[0].startswith("Blank 32×32")
    with nothing_written(work):
        msg = refused(lambda: client.predict(*args(inputs), api_name=api), index)
    assert expected in msg, msg
    still_serving(client, inputs.i_ckpt)


def test_nothing_escaped_from_the_refused_zips(studio):
    assert not (studio[2] / "escape.txt").exists() and not (studio[2].parent / "escape.txt").exists()
    assert not Path("/tmp/nudiff-absolute.txt").exists()
    assert list((studio[2] / "uploads").iterdir()) == []


def test_training_on_label_maps_without_nuclei_fails_with_the_reason_and_no_checkpoint(studio, inputs):
    """The job starts (the layout is fine) and its trainer refuses the data: the Train tab says why in one line,
    and the run folder holds the studio's process log and the failed status, nothing trained."""
    _, url, work = studio
    client = Client(url, verbose=False)
    status = client.predict(str(inputs.no_nuclei), "empty", "test", 32, "100%", 5, 0, 2, api_name="/train_structure")
    assert status.startswith("Started structure training"), status
    deadline = time.time() + 180
    while True:
        text, _ = client.predict(api_name="/training_status")
        if "**failed**" in text or "**finished**" in text or time.time() > deadline:
            break
        time.sleep(1)
    assert "**failed**" in text and "no nuclei to train on" in text and "Traceback" not in text, text
    run = work / "runs" / "empty" / "structure"
    assert sorted(p.name for p in run.iterdir()) == ["process.log", "status.json"]
    still_serving(client, inputs.i_ckpt)


def test_a_good_upload_still_works_after_the_bad_ones(studio, inputs, tmp_path):
    _, url, work = studio
    client = Client(url, verbose=False)
    zpath = tmp_path / "good.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in inputs.good.rglob("*"):
            if p.is_file():
                zf.write(p, f"mine/{p.relative_to(inputs.good)}")
    folder, status, _, _ = client.predict(handle_file(str(zpath)), 32, api_name="/upload_dataset")
    assert status.startswith("Inspected: 2 images"), status
    assert Path(folder).is_relative_to(work / "uploads") and (Path(folder) / "labels").is_dir()
