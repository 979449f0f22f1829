"""Generation API and CLI on tiny test-preset models (real checkpoints, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine import pipeline
from engine.demo import standin_checkpoints
from engine.errors import CheckpointError, NuDiffError
from engine.structure import instances_to_structure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    s, i = standin_checkpoints()
    return pipeline.load_model(s, kind="structure"), pipeline.load_model(i, kind="image")


@pytest.fixture(scope="module")
def exact_models():
    """The same models sampled in fp32 on every CPU. Claims about float sums (a batch of 2 against a batch of
    1) hold only here: under bf16 autocast (a CPU with native bf16) oneDNN picks kernels by batch size and
    thread count, and after a few steps the same seed differs by a few 1e-2 (seen on a CI machine)."""
    s, i = standin_checkpoints()
    return (pipeline.load_model(s, kind="structure", precision="fp32"),
            pipeline.load_model(i, kind="image", precision="fp32"))


def test_sample_structures_shapes_and_seeds(exact_models):
    smodel, _ = exact_models
    out = pipeline.sample_structures(smodel, 3, steps=4, seed=10, batch_size=2)
    assert [s.seed for s in out] == [10, 11, 12]
    for s in out:
        assert s.structure.shape == (32, 32, 3) and s.structure.dtype == np.float32
        assert s.inst.shape == (32, 32) and s.inst.dtype == np.int32
        assert -1 <= s.structure.min() and s.structure.max() <= 1
    again = pipeline.sample_structures(smodel, 1, steps=4, seed=11)
    np.testing.assert_allclose(again[0].structure, out[1].structure, atol=1e-3)  # batch size changes float sums


def test_sampled_layouts_merge_watershed_fragments(models):
    from engine.structure import merge_fragments, structure_to_instances

    smodel, imodel = models
    raw = pipeline.sample_structures(smodel, 4, steps=4, seed=20)   # default: the paper's watershed alone
    merged = pipeline.sample_structures(smodel, 4, steps=4, seed=20, merge_below=0.2)
    for a, b in zip(raw, merged):
        np.testing.assert_array_equal(a.structure, b.structure)   # the structure stays as sampled
        np.testing.assert_array_equal(a.inst, structure_to_instances(a.structure))
        np.testing.assert_array_equal(b.inst, merge_fragments(a.inst, 0.2))
    assert sum(s.n_nuclei for s in merged) <= sum(s.n_nuclei for s in raw)
    pairs = pipeline.generate_pairs(smodel, imodel, 1, pipeline.PairSettings(steps=2, merge_below=0.3))
    assert pairs[0].meta["merge_below"] == 0.3
    with pytest.raises(NuDiffError, match="merge_below"):
        pipeline.sample_structures(smodel, 1, steps=2, merge_below=1.5)


def test_sampled_layouts_with_smoothed_outlines(models):
    from engine.structure import smooth_outlines, structure_to_instances

    smodel, _ = models
    raw = pipeline.sample_structures(smodel, 3, steps=4, seed=20)
    smooth = pipeline.sample_structures(smodel, 3, steps=4, seed=20, outline_sigma=1.5)
    for a, b in zip(raw, smooth):
        np.testing.assert_array_equal(a.structure, b.structure)   # sampled as before, the map smoothed after
        np.testing.assert_array_equal(b.inst, smooth_outlines(structure_to_instances(a.structure), 1.5))
        assert (a.outline_sigma, b.outline_sigma) == (0.0, 1.5)
        plain, rebuilt = a.condition(smodel), b.condition(smodel)
        assert not plain.rebuilt and plain.structure is a.structure
        assert rebuilt.rebuilt and not rebuilt.edited and rebuilt.origin["source"] == "sampled"
        assert rebuilt.origin["outline_sigma"] == 1.5 and rebuilt.origin["structure_seed"] == b.seed
        np.testing.assert_array_equal(rebuilt.structure, instances_to_structure(b.inst))
    for bad in (-1.0, 11.0):
        with pytest.raises(NuDiffError, match="outline smoothing"):
            pipeline.sample_structures(smodel, 1, steps=2, outline_sigma=bad)


def test_synthesize_variants_and_reproducible(exact_models):
    _, imodel = exact_models
    inst = np.zeros((32, 32), np.int32)
    inst[5:15, 5:15] = 1
    inst[18:28, 10:25] = 2
    imgs = pipeline.synthesize(imodel, [inst, instances_to_structure(inst)], w=2.0, steps=4, seed=3, variants=2)
    assert len(imgs) == 4 and all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in imgs)
    # structure j variant v uses seed + j * variants + v; an instance map equals its structure
    def close(a, b):  # uint8 images from different batch sizes: at most 1 level of rounding apart
        return np.abs(a.astype(int) - b.astype(int)).max() <= 1

    assert close(imgs[0], pipeline.synthesize(imodel, [inst], steps=4, seed=3)[0])
    assert not close(imgs[0], imgs[1])
    assert close(imgs[2], pipeline.synthesize(imodel, [inst], steps=4, seed=5)[0])
    progress = []
    pipeline.synthesize(imodel, [inst], steps=3, progress=lambda i, n: progress.append((i, n)))
    assert progress[-1] == (3, 3)


def test_precision_of_a_loaded_model_reaches_every_sampling_path(models):
    """load_model(precision="fp32") samples in fp32 on every path (batched, tiled canvas, images), which
    equals engine.samplers.sample without autocast; "auto" uses bf16 where it is fast."""
    from engine.precision import bf16_is_fast
    from engine.samplers import sample
    from engine.tiling import TilingOptions

    s, i = standin_checkpoints()
    exact = pipeline.load_model(s, kind="structure", precision="fp32"), pipeline.load_model(i, kind="image",
                                                                                           precision="fp32")
    assert not exact[0].autocast and models[0].autocast
    assert exact[1].precision == "fp32" and models[1].precision == ("bf16" if bf16_is_fast("cpu") else "fp32")
    pair = pipeline.generate_pairs(exact[0], exact[1], 1, pipeline.PairSettings(steps=2, seed=4))[0]
    assert pair.meta["precision"] == "fp32"  # each pair records what it was computed in
    x = sample(exact[0].model, (1, 3, 32, 32), steps=4, seeds=[7], diffusion=exact[0].diffusion, autocast=False)
    fp32 = pipeline.sample_structures(exact[0], 1, steps=4, seed=7)[0].structure
    np.testing.assert_array_equal(fp32, x[0].permute(1, 2, 0).numpy())
    auto = pipeline.sample_structures(models[0], 1, steps=4, seed=7)[0].structure
    assert np.array_equal(auto, fp32) == (not bf16_is_fast("cpu"))
    tiling = TilingOptions(tile=32, overlap=16)
    out = {}
    for name, m in (("auto", models), ("fp32", exact)):  # a tiled canvas, then images on one layout
        big = pipeline.sample_structures(m[0], 1, steps=2, seed=7, size=48, tiling=tiling)[0].structure
        img = pipeline.synthesize(m[1], [fp32], steps=2, seed=7)[0]
        out[name] = big, img
    for a, b in zip(out["auto"], out["fp32"]):
        assert np.array_equal(a, b) == (not bf16_is_fast("cpu"))
    with pytest.raises(NuDiffError, match="precision must be one of auto, fp32"):
        pipeline.load_model(s, kind="structure", precision="fp16")


def test_bad_requests_give_readable_errors(models):
    smodel, imodel = models
    with pytest.raises(CheckpointError, match="not an image model"):
        pipeline.synthesize(smodel, [np.zeros((32, 32), np.int32)])
    with pytest.raises(CheckpointError, match="not a structure model"):
        pipeline.sample_structures(imodel, 1)
    with pytest.raises(NuDiffError, match="at least 8 px"):  # any size from 8 px works (tests/test_tiling.py)
        pipeline.synthesize(imodel, [np.zeros((7, 33), np.int32)], steps=2)
    with pytest.raises(NuDiffError, match="shape"):
        pipeline.synthesize(imodel, [np.zeros((8, 8, 2), np.float32)], steps=2)
    with pytest.raises(NuDiffError, match="sampler"):
        pipeline.sample_structures(smodel, 1, sampler="euler")
    with pytest.raises(NuDiffError, match="steps"):
        pipeline.sample_structures(smodel, 1, steps=5000)


def test_generate_pairs_provenance(models):
    smodel, imodel = models
    pairs = pipeline.generate_pairs(smodel, imodel, 2, pipeline.PairSettings(steps=3, seed=4))
    assert len(pairs) == 2
    for p in pairs:
        assert p.image.shape[:2] == p.inst.shape
        assert p.meta["structure_sha256"] == smodel.sha256 and p.meta["image_sha256"] == imodel.sha256
        assert p.meta["w"] == 2.0 and p.meta["edited"] is False


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("inspect", "train-structure", "train-image", "sample-structures", "synthesize", "generate"):
        assert cmd in r.stdout
    r = _cli("train-image", "--help")
    assert "--finetune-steps" in r.stdout and "--drop-rate" in r.stdout


def test_cli_end_to_end(tmp_path, labeled_folder):
    s, i = standin_checkpoints()
    r = _cli("sample-structures", "--checkpoint", str(s), "--n", "2", "--steps", "3", "--out", str(tmp_path / "st"))
    assert r.returncode == 0, r.stderr
    labels = sorted((tmp_path / "st" / "labels").glob("*.tif"))
    assert len(labels) == 2 and tifffile.imread(labels[0]).dtype == np.uint16
    r = _cli("sample-structures", "--checkpoint", str(s), "--n", "2", "--steps", "3", "--merge-fragments", "0.3",
             "--out", str(tmp_path / "st-merged"))
    assert r.returncode == 0, r.stderr
    from engine.structure import merge_fragments

    for raw, merged in zip(labels, sorted((tmp_path / "st-merged" / "labels").glob("*.tif"))):
        np.testing.assert_array_equal(merge_fragments(tifffile.imread(raw), 0.3), tifffile.imread(merged))
    r = _cli("synthesize", "--checkpoint", str(i), "--labels", str(tmp_path / "st"), "--steps", "3",
             "--out", str(tmp_path / "syn"))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "syn" / "images").glob("*.png"))) == 2
    r = _cli("inspect", str(tmp_path / "syn"), "--tile-size", "32", "--stride", "32")
    assert r.returncode == 0 and "Images: 2" in r.stdout
    r = _cli("train-structure", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "run"), "--preset", "test",
             "--steps", "3", "--preview-every", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model.json").exists()
    r = _cli("generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "2", "--steps", "2",
             "--size", "48", "--out", str(tmp_path / "gen"))
    assert r.returncode == 0, r.stderr
    assert [tifffile.imread(p).shape for p in sorted((tmp_path / "gen" / "labels").glob("*.tif"))] == [(48, 48)] * 2
    r = _cli("generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "1",
             "--size", "49", "--tile", "33", "--out", str(tmp_path / "gen49"))
    assert r.returncode == 2 and "multiple of" in r.stderr and not (tmp_path / "gen49").exists()
    r = _cli("generate", "--structure-checkpoint", str(s), "--image-checkpoint", str(i), "--n", "1", "--steps", "2",
             "--size", "49", "--out", str(tmp_path / "gen49"))  # any size: windows of the 32 px tile, cropped
    assert r.returncode == 0, r.stderr
    assert [tifffile.imread(p).shape for p in (tmp_path / "gen49" / "labels").glob("*.tif")] == [(49, 49)]


def test_cli_fine_tune_takes_the_models_shape_warms_up_and_keeps_its_licence(tmp_path, labeled_folder):
    from engine.checkpoint import export_inference, load_checkpoint

    s, _ = standin_checkpoints()
    src = export_inference(s, tmp_path / "src", half=False, extra={"license": "CC BY-NC-SA 4.0", "sample_size": 48})
    # no --preset / --image-size: those of the source model (test preset, 32 px)
    r = _cli("train-structure", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "ft"), "--init-from",
             str(src), "--steps", "4", "--log-every", "1", "--preview-every", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert rec["model"]["image_size"] == 32 and rec["train"]["preset"] == "test"
    assert rec["license"] == "CC BY-NC-SA 4.0" and rec["sample_size"] == 48
    assert rec["init_from_sha256"] == load_checkpoint(src).sha256 and rec["train"]["warmup_steps"] == 100
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs == pytest.approx([1e-4 * k / 100 for k in (1, 2, 3, 4)])
    # the U-Net is fully convolutional: the same weights continue on larger tiles
    r = _cli("train-structure", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "ft64"), "--init-from",
             str(src), "--image-size", "64", "--steps", "2", "--preview-every", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "ft64" / "model.json").read_text())
    assert rec["model"]["image_size"] == 64 and rec["init_from_sha256"] == load_checkpoint(src).sha256
    # a source of the other kind, or none: a readable error, and the studio sees why
    r = _cli("train-image", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "bad"), "--init-from",
             str(src), "--steps", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "structure model" in r.stderr
    assert not (tmp_path / "bad").exists()  # refused before training: nothing written
    (tmp_path / "bad").mkdir()  # the folder a watching studio makes first is told why
    r = _cli("train-image", "--data", str(labeled_folder), "--run-dir", str(tmp_path / "bad"), "--init-from",
             str(src), "--steps", "2")
    assert r.returncode == 2 and "structure model" in r.stderr
    assert json.loads((tmp_path / "bad" / "status.json").read_text())["state"] == "failed"


def test_cli_errors_are_readable(tmp_path):
    s, i = standin_checkpoints()
    r = _cli("synthesize", "--checkpoint", str(s), "--labels", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: structure.safetensors is a structure model, but an image model is needed" in r.stderr
    r = _cli("synthesize", "--checkpoint", str(i), "--labels", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no label files" in r.stderr
    r = _cli("synthesize", "--checkpoint", str(i), "--labels", str(tmp_path / "none.png"), "--out", str(tmp_path))
    assert r.returncode == 2 and "not found" in r.stderr
    r = _cli("generate", "--structure-checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train-image", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"), "--preset", "test")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before training: nothing written
    (tmp_path / "run").mkdir()  # a folder that exists (a watching studio's) is told why
    r = _cli("train-image", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"), "--preset", "test")
    assert r.returncode == 2
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "nowhere" in status["message"]
    r = _cli("inspect", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
