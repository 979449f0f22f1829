"""bench/realism.py end to end on procedural 512 px images with the tiny test-preset models: the rows it
writes, its caches, and --real-layouts (the image model alone, on the role's own label tiles)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import realism  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints, one_torch_thread):
    from engine.synthetic import write_folder

    root = tmp_path_factory.mktemp("realism")
    data = write_folder(root / "data", n_images=6, size=512, seed=3)
    stems = sorted(p.stem for p in (data / "images").iterdir())
    split = root / "split.json"
    split.write_text(json.dumps({"train": stems[:3], "validation": stems[3:5], "test": stems[5:]}))
    structure, image = tiny_checkpoints
    args = ["--structure", str(structure), "--image", str(image), "--data", str(data), "--split", str(split),
            "--role", "validation", "--n", "4", "--steps", "2", "--epochs", "2", "--threads", "1",
            "--work", str(root / "work")]
    return root, args


def _run(args: list[str], capsys) -> str:
    realism.main(args)
    return capsys.readouterr().out


def test_rows_sanity_rows_and_caches(setup, capsys):
    root, args = setup
    out = _run(["--name", "pair", *args], capsys)
    cache = root / "work" / "pair"
    res = json.loads((cache / "realism-validation.json").read_text())
    row = res["by_w"]["2"]
    # two 512 px validation images: 8 real tiles of 256 px, 32 of 128; 4 synthetic tiles and their 16
    # quadrants (the larger set is cut to the smaller's size)
    assert res["n_real_tiles"] == {"256": 8, "128": 32}
    assert row["two_sample_256"]["n_per_set"] == 4 and row["two_sample_128"]["n_per_set"] == 16
    for r in (row["two_sample_256"], row["two_sample_128"], *res["sanity"].values()):
        assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1 and r["epochs"] == 2
    assert set(res["sanity"]) == {f"{k}_{s}" for k in ("real_vs_real", "real_vs_blurred", "train_vs_held_out")
                                  for s in (256, 128)}
    assert len(row["copying_128"]["distance"]) == 16 and len(row["copying_256"]["distance"]) == 4
    assert "| 2 |" in out and str(cache / "realism-validation.json") in out
    # a rerun samples nothing again and rescores the same tiles to the same figures
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    assert sorted(files) == ["images-256-n4-s0-2-w2.npz", "structures-256-n4-s0-2.npz"]
    _run(["--name", "pair", *args], capsys)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == files
    again = json.loads((cache / "realism-validation.json").read_text())
    assert again["by_w"]["2"]["two_sample_256"] == row["two_sample_256"]


def test_smoothed_outlines_are_scored_on_their_rebuilt_structures(setup, capsys):
    import numpy as np

    from engine.structure import instances_to_structure, smooth_outlines

    root, args = setup
    _run(["--name", "pair", *args], capsys)
    _run(["--name", "pair", "--smooth-outlines", "3", *args], capsys)
    cache = root / "work" / "pair"
    res = json.loads((cache / "realism-validation-o3.json").read_text())
    assert res["outline_sigma"] == 3 and res["by_w"]["2"]["two_sample_256"]["n_per_set"] == 4
    plain, smooth = np.load(cache / "structures-256-n4-s0-2.npz"), np.load(cache / "structures-256-n4-s0-2-o3.npz")
    np.testing.assert_array_equal(plain["structures"], smooth["structures"])  # the same draws, maps smoothed after
    for a, b in zip(plain["insts"], smooth["insts"]):
        np.testing.assert_array_equal(b, smooth_outlines(a, 3.0))
    # the images are drawn on the rebuilt structures: synthesize those again and get the cached images
    from engine.pipeline import load_model, synthesize

    im = load_model(args[args.index("--image") + 1], kind="image")
    again = synthesize(im, [instances_to_structure(i) for i in smooth["insts"]], w=2, steps=2, seed=0)
    np.testing.assert_array_equal(np.stack(again), np.load(cache / "images-256-n4-s0-2-o3-w2.npz")["images"])
    with pytest.raises(SystemExit):
        realism.main(["--name", "x", "--real-layouts", "--smooth-outlines", "3", *args])
    for bad in (["--smooth-outlines", "-1"], ["--smooth-outlines", "11"], ["--oversample", "0.5"]):
        with pytest.raises(SystemExit):  # refused before anything is measured or written
            realism.main(["--name", "refused", *bad, *args])
    assert not (root / "work" / "refused").exists()


def test_real_layouts_judge_the_image_model_on_the_roles_own_labels(setup, capsys):
    root, args = setup
    # the sanity rows are cached per role; a row made with another classifier recipe is measured again
    f_sanity = root / "work" / "sanity-validation.json"
    if not f_sanity.exists():
        _run(["--name", "pair", *args], capsys)
    cached = json.loads(f_sanity.read_text())
    f_sanity.write_text(json.dumps({**cached, "real_vs_real_256": {**cached["real_vs_real_256"], "epochs": 40,
                                                                   "accuracy": 0.123}}))
    _run(["--name", "images", "--real-layouts", "--w", "1", *args, "--n", "8"], capsys)
    sanity = json.loads(f_sanity.read_text())
    assert sanity["real_vs_real_256"]["epochs"] == 2 and sanity["real_vs_real_256"]["accuracy"] != 0.123
    assert {k: v for k, v in sanity.items() if k != "real_vs_real_256"} == \
        {k: v for k, v in cached.items() if k != "real_vs_real_256"}
    res = json.loads((root / "work" / "images" / "realism-validation-real-layouts.json").read_text())
    row = res["by_w"]["1"]
    # n = 8 of the 8 real 256 px tiles: the synthetic layouts are the real ones, so their statistics agree
    assert row["nuclei_per_tile"]["synthetic"] == pytest.approx(row["nuclei_per_tile"]["real"])
    assert row["foreground_fraction"]["synthetic"] == pytest.approx(row["foreground_fraction"]["real"])
    assert not list((root / "work" / "images").glob("structures-*"))  # no layout was sampled
    with pytest.raises(SystemExit):
        realism.main(["--name", "x", "--real-layouts", "--size", "128", *args])


def test_colour_prior_from_the_split_or_from_the_model(setup, capsys, tmp_path):
    import numpy as np

    from engine.checkpoint import export_inference
    from engine.colour_prior import tile_mean_colours
    from engine.errors import CheckpointError

    root, args = setup
    at = args.index("--image") + 1
    plain = args[at]
    with pytest.raises(CheckpointError, match="stores no training colours"):  # a model without colours
        realism.main(["--name", "cpm", "--real-layouts", "--colour-prior", "model", *args])
    _run(["--name", "cpm", "--real-layouts", "--colour-prior", *args], capsys)  # the split's train images
    cache = root / "work" / "cpm"
    assert json.loads((cache / "realism-validation-real-layouts-cp.json").read_text())["colour_prior"] == "train"
    split = np.load(cache / "images-256-n4-s0-2-real-layouts-w2-cp.npz")["images"]

    def with_table(name, table):
        model = export_inference(plain, tmp_path / name, half=False, colours=table)
        _run(["--name", name, "--real-layouts", "--colour-prior", "model",
              *args[:at], str(model), *args[at + 1:]], capsys)
        res = json.loads((root / "work" / name / "realism-validation-real-layouts-cpm.json").read_text())
        assert res["colour_prior"] == "model"
        return np.load(root / "work" / name / "images-256-n4-s0-2-real-layouts-w2-cpm.npz")["images"]

    # the model's stored table is the one used: the split's own table stored with the model gives the same
    # images bit for bit, another table other images
    data = Path(args[args.index("--data") + 1])
    stems = json.loads(Path(args[args.index("--split") + 1]).read_text())["train"]
    t_img, t_lab = realism.load_role(data, stems)
    same = with_table("cpm-same", tile_mean_colours(t_img, 256, labels=t_lab))
    blue = with_table("cpm-blue", np.tile(np.array([[-0.8, -0.6, 0.9, 0.2]], np.float32), (6, 1)))
    assert same.shape == split.shape == blue.shape == (4, 256, 256, 3)
    assert np.array_equal(same, split) and not np.array_equal(blue, split)
