"""Bad input to the command line: refused with a readable message (one line, status 2), nothing written.

Issue 22's list of bad-input kinds is kept in two halves. This file holds the command-line half, 56 kinds:
argument ranges of the sampling commands (20) and of inspect (3), damaged checkpoint records (8), a file that is no checkpoint (1), an empty
label map (1), an --out that is a busy folder or a file (2), label files that are no instance map (6), several
label files for one image (3: reported by inspect, refused by inspect and by train-structure when no image is
left), label maps without nuclei (4: refused by train-structure and train-image before the run folder, said in
a run folder that exists, images without nuclei or with two label files reported while training), unusable
training folders (4), a tile size the preset cannot take (1), and bad values of subset, export-model and
sample-structures (3).
tests/test_app_bad_input.py holds the studio's half, 56 kinds sent through its API with gradio_client (55 in
its CASES table, plus training on label maps without nuclei): 112 in all. Every case checks that nothing was
written: no output or run folder (a run folder that already exists, as a watching studio makes it, gets
only the failed status.json saying why, where the case says so), and the input folders unchanged.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("sample-structures", ["--n", "0"]), ("sample-structures", ["--n", "-3"]), ("sample-structures", ["--steps", "0"]),
    ("sample-structures", ["--batch-size", "0"]), ("sample-structures", ["--size", "0"]),
    ("sample-structures", ["--size", "abc"]), ("sample-structures", ["--tile", "4"]),
    ("sample-structures", ["--overlap", "-1"]), ("sample-structures", ["--window-batch", "0"]),
    ("sample-structures", ["--max-memory-gb", "0"]), ("sample-structures", ["--max-memory-gb", "nan"]),
    ("sample-structures", ["--smooth-outlines", "-1"]), ("generate", ["--smooth-outlines", "abc"]),
    ("generate", ["--n", "0"]), ("generate", ["--steps", "0"]), ("generate", ["--size", "0"]),
    ("generate", ["--batch-size", "0"]), ("generate", ["--w", "-1"]), ("generate", ["--w", "abc"]),
    ("synthesize", ["--variants", "0"]), ("synthesize", ["--steps", "-2"]), ("synthesize", ["--w", "99"]),
]


def _run(args: list[str]):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: relative path -> (size, mtime): what 'nothing written' compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def _one_error_line(r) -> str:
    """The refusal: status 2, no traceback, and one 'error:' line as the last line of stderr."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, r.stderr
    return lines[-1]


@pytest.mark.parametrize("command,extra", CASES, ids=[f"{c} {' '.join(e)}" for c, e in CASES])
def test_sampling_arguments_are_refused_while_parsing(command, extra, tmp_path):
    out = tmp_path / "out"
    base = {"sample-structures": ["--out", str(out)], "generate": ["--out", str(out)],
            "synthesize": ["--labels", str(tmp_path), "--out", str(out)]}[command]
    r = _run([command, *base, *extra])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--tile-size", "0"], ["--stride", "0"], ["--tile-size", "-8"]])
def test_inspect_tile_arguments(extra, tmp_path, labeled_folder):
    before = _files(labeled_folder)
    r = _run(["inspect", str(labeled_folder), *extra])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "must be at least 1" in r.stderr
    assert _files(labeled_folder) == before and not r.stdout


RECORD_CASES = [({"format": "abc"}, "'format' must be a whole number"), ({"format": True}, "'format'"),
                ({"model": "hello"}, "'model' must be a model config"), ({"kind": "x"}, "unknown model kind"),
                ({"diffusion": {"num_timesteps": 0}}, "num_timesteps"),
                ({"diffusion": {"schedule": "bogus"}}, "unknown beta schedule"),
                ({"diffusion": {"beta_start": 0.5, "beta_end": 0.1}}, "betas"),
                ({"diffusion": "x"}, "'diffusion' must be an object")]


@pytest.mark.parametrize("change,message", RECORD_CASES, ids=[m for _, m in RECORD_CASES])
def test_a_damaged_checkpoint_record_is_refused_in_one_line(change, message, tmp_path, tiny_checkpoints):
    import json
    import shutil

    src = Path(tiny_checkpoints[0])
    shutil.copy(src.with_suffix(".safetensors"), tmp_path / "structure.safetensors")
    rec = json.loads(src.read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            rec[key].update(value)
        else:
            rec[key] = value
    (tmp_path / "structure.json").write_text(json.dumps(rec))
    out = tmp_path / "out"
    r = _run(["sample-structures", "--checkpoint", str(tmp_path / "structure.json"), "--n", "1", "--steps", "2",
              "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    """An image given as --checkpoint is called what it is, not 'junk.png.safetensors not found'."""
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    out = tmp_path / "out"
    r = _run(["sample-structures", "--checkpoint", str(tmp_path / "junk.png"), "--n", "1", "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "junk.png is not a checkpoint" in lines[0], r.stderr
    assert ".safetensors" in lines[0] and "junk.png.safetensors" not in lines[0] and not out.exists()


def test_an_empty_label_map_is_refused(tmp_path, tiny_checkpoints):
    import numpy as np

    np.save(tmp_path / "empty.npy", np.zeros((0, 0), np.int32))
    r = _run(["synthesize", "--checkpoint", str(tiny_checkpoints[1]), "--labels", str(tmp_path / "empty.npy"),
              "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "at least 8 px" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_unusable_out_is_refused_before_any_sampling(tmp_path, tiny_checkpoints):
    s, i = map(str, tiny_checkpoints)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (busy, a_file):
        r = _run(["generate", "--structure-checkpoint", s, "--image-checkpoint", i, "--n", "1", "--steps", "200",
                  "--out", str(out)])
        assert r.returncode == 2 and "already exists and is not empty" in r.stderr and "Traceback" not in r.stderr
        assert "pairs:" not in r.stderr  # refused before the progress bar: nothing was sampled
    r = _run(["synthesize", "--checkpoint", i, "--labels", str(tmp_path), "--out", str(busy)])
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr
    assert (busy / "keep.txt").read_text() == "mine" and a_file.read_text() == "x"
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- label files and training data


def _label_files(tmp_path: Path) -> dict[str, Path]:
    """Label files that are not instance maps (each refused by synthesize)."""
    import numpy as np

    d = tmp_path / "bad_labels"
    d.mkdir()
    (d / "junk.png").write_bytes(b"this is not a png")
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (d / "coco.json").write_text('{"images": [], "annotations": [], "categories": []}')
    np.save(d / "float.npy", np.full((16, 16), 0.5))
    np.save(d / "negative.npy", -np.ones((16, 16), np.int32))
    return {p.name: p for p in d.iterdir()}


LABEL_CASES = [("junk.png", "corrupt or unsupported file"), ("pickled.npy", "pickled Python objects"),
               ("broken.geojson", "not valid JSON"), ("coco.json", "not GeoJSON"),
               ("float.npy", "non-integer values"), ("negative.npy", "negative values")]


@pytest.mark.parametrize("name,message", LABEL_CASES, ids=[n for n, _ in LABEL_CASES])
def test_a_label_file_that_is_no_instance_map_is_refused(name, message, tmp_path, tiny_checkpoints):
    path = _label_files(tmp_path)[name]
    before = _files(tmp_path)
    r = _run(["synthesize", "--checkpoint", str(tiny_checkpoints[1]), "--labels", str(path), "--steps", "2",
              "--out", str(tmp_path / "out")])
    line = _one_error_line(r)
    assert message in line and str(path) in line, line
    assert _files(tmp_path) == before and not (tmp_path / "out").exists()


def _folder_with_two_labels(root: Path, with_good_image: bool) -> list[Path]:
    """images/a.png with labels/a.png and masks/a.png holding other nuclei (and a good images/b.png)."""
    import numpy as np
    from engine.synthetic import make_tile
    from PIL import Image

    for sub in ("images", "labels", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image, inst = make_tile(64, seed=0)
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(inst.astype(np.uint16)).save(root / "labels" / "a.png")
    Image.fromarray(make_tile(64, seed=9)[1].astype(np.uint16)).save(root / "masks" / "a.png")
    if with_good_image:
        image, inst = make_tile(64, seed=1)
        Image.fromarray(image).save(root / "images" / "b.png")
        Image.fromarray(inst.astype(np.uint16)).save(root / "labels" / "b.png")
    return [root / "labels" / "a.png", root / "masks" / "a.png"]


def test_several_label_files_for_one_image_are_an_error_naming_them(tmp_path):
    data = tmp_path / "data"
    candidates = _folder_with_two_labels(data, with_good_image=True)
    before = _files(tmp_path)
    r = _run(["inspect", str(data), "--tile-size", "32"])  # the image is skipped, the report says why
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "[error]" in ln]
    assert all(str(p) in line for p in candidates) and "do not hold the same nuclei" in line, r.stdout
    assert "Images: 1 " in r.stdout and "Problems: 1 error(s)" in r.stdout
    assert _files(tmp_path) == before
    (data / "images" / "b.png").unlink()  # nothing usable left: refused
    (data / "labels" / "b.png").unlink()
    before = _files(tmp_path)
    r = _run(["inspect", str(data)])
    line = _one_error_line(r)
    assert line.startswith(f"error: no usable image/label pairs in {data}: ") and all(
        str(p) in line for p in candidates), line
    assert _files(tmp_path) == before


def test_training_on_an_image_with_several_label_files(tmp_path):
    data = tmp_path / "data"
    candidates = _folder_with_two_labels(data, with_good_image=False)
    before = _files(data)
    run = tmp_path / "run"
    r = _run(["train-structure", "--data", str(data), "--run-dir", str(run), "--preset", "test",
              "--image-size", "32", "--steps", "2", "--quiet"])
    line = _one_error_line(r)
    assert "no usable image/label pairs" in line and all(str(p) in line for p in candidates), line
    assert _files(data) == before
    assert not run.exists()  # refused before training: no run folder


def _folder_of_empty_labels(root: Path, n: int = 2) -> Path:
    import numpy as np
    from engine.synthetic import write_folder
    from PIL import Image

    write_folder(root, n_images=n, size=64, seed=0)
    for path in (root / "labels").iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(path)
    return root


@pytest.mark.parametrize("command", ["train-structure", "train-image"])
def test_training_on_label_maps_without_nuclei_is_refused_before_the_run_folder(command, tmp_path):
    data = _folder_of_empty_labels(tmp_path / "data")
    before = _files(tmp_path)
    r = _run([command, "--data", str(data), "--run-dir", str(tmp_path / "run"), "--preset", "test",
              "--image-size", "32", "--steps", "2", "--quiet"])
    line = _one_error_line(r)
    assert line.startswith(f"error: no nuclei to train on in {data}: every label map is background only"), line
    assert "[warning]" not in r.stderr  # the refusal says it once, not once per file
    assert _files(tmp_path) == before and not (tmp_path / "run").exists()


def test_label_maps_without_nuclei_in_a_run_folder_that_exists_say_why_there(tmp_path):
    """As a watching studio sees it: it makes the run folder (process.log) before starting the trainer."""
    import json

    data = _folder_of_empty_labels(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "process.log").write_text("")
    r = _run(["train-structure", "--data", str(data), "--run-dir", str(run), "--preset", "test",
              "--image-size", "32", "--steps", "2", "--quiet"])
    line = _one_error_line(r)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and line == f"error: {status['message']}"
    assert sorted(p.name for p in run.iterdir()) == ["process.log", "status.json"]


def test_an_image_without_nuclei_and_one_with_two_labels_are_reported_while_training(tmp_path):
    import numpy as np
    from engine.synthetic import write_folder
    from PIL import Image

    data = write_folder(tmp_path / "data", n_images=3, size=64, seed=0)
    first, empty, _ = sorted((data / "labels").iterdir())
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(empty)
    np.save(first.with_suffix(".npy"), np.zeros((64, 64), np.int32))  # a second label file of other nuclei
    before = _files(data)
    r = _run(["train-structure", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--preset", "test",
              "--image-size", "32", "--steps", "1", "--quiet"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert _files(data) == before  # the data is read, never changed
    skipped, warned = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert skipped.startswith(f"[error] image {data / 'images' / first.name} skipped: 2 label files") and str(
        first.with_suffix(".npy")) in skipped, r.stderr
    assert warned == f"[warning] label {empty} has no nuclei (all background)", r.stderr


TRAIN_DATA_CASES = [("missing folder", "folder not found"), ("images only", "no labels/, masks/ or annotations/"),
                    ("unmatched labels", "has no label"), ("too small", "smaller than the tile size")]


@pytest.mark.parametrize("case,message", TRAIN_DATA_CASES, ids=[c for c, _ in TRAIN_DATA_CASES])
def test_unusable_training_data_is_refused_in_one_line(case, message, tmp_path):
    import numpy as np
    from engine.synthetic import write_folder
    from PIL import Image

    data = tmp_path / "data"
    if case != "missing folder":
        write_folder(data, n_images=2, size=64, seed=0)
    if case == "images only":
        for p in (data / "labels").iterdir():
            p.unlink()
        (data / "labels").rmdir()
    elif case == "unmatched labels":
        for p in (data / "labels").iterdir():
            p.rename(p.with_name("other_" + p.name))
    elif case == "too small":
        for sub in ("images", "labels"):
            for p in (data / sub).iterdir():
                Image.fromarray(np.asarray(Image.open(p))[:16, :16]).save(p)
    before = _files(data)
    run = tmp_path / "run"
    r = _run(["train-structure", "--data", str(data), "--run-dir", str(run), "--preset", "test",
              "--image-size", "32", "--steps", "2", "--quiet"])
    line = _one_error_line(r)
    assert message in line, line
    assert _files(data) == before
    assert not run.exists()  # refused before training: no run folder


def test_a_tile_size_the_preset_cannot_take_is_refused_before_the_run_folder(tmp_path, labeled_folder):
    r = _run(["train-structure", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "run"),
              "--preset", "test", "--image-size", "33", "--steps", "2", "--quiet"])
    line = _one_error_line(r)
    assert "--image-size 33 does not suit preset 'test'" in line and "divisible" in line, line
    assert not (tmp_path / "run").exists()


def test_other_commands_refuse_bad_values_in_one_line(tmp_path, tiny_checkpoints, labeled_folder):
    s, _ = map(str, tiny_checkpoints)
    before = _files(labeled_folder)
    cases = [(["subset", str(labeled_folder), "--fraction", "abc", "--out", str(tmp_path / "sub")],
              "not a fraction", tmp_path / "sub"),
             (["export-model", s, str(tmp_path / "exp"), "--meta", "nokey"], "--meta expects KEY=VALUE",
              tmp_path / "exp.json"),
             (["sample-structures", "--checkpoint", str(tmp_path / "nowhere.json"), "--n", "1",
               "--out", str(tmp_path / "o")], "not found", tmp_path / "o")]
    for args, message, out in cases:
        line = _one_error_line(_run(args))
        assert message in line, line
        assert not out.exists()
    assert _files(labeled_folder) == before and sorted(p.name for p in tmp_path.iterdir()) == []
