"""Layout realism filter (engine.curate): features by hand, rejection sampling on procedural layouts,
and the reference stored in structure checkpoints (real files, CLI included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engine import pipeline
from engine.checkpoint import export_inference, load_checkpoint, save_checkpoint
from engine.curate import LAYOUT_FEATURES, REFERENCE_KEY, curate, layout_features, realism_ratio
from engine.demo import standin_checkpoints
from engine.errors import CheckpointError, NuDiffError
from engine.synthetic import make_tile, write_folder

ROOT = Path(__file__).resolve().parents[1]


def _layouts(seeds, density):
    return [make_tile(64, seed=s, density=density)[1] for s in seeds]


@pytest.fixture(scope="module")
def groups():
    """Reference layouts, candidates like them, and over-dense candidates (procedural, 64 px)."""
    ref = _layouts(range(60), 0.15)
    like = _layouts(range(1000, 1040), 0.15)
    dense = _layouts(range(2000, 2040), 0.45)
    return layout_features(ref), layout_features(like), layout_features(dense)


def test_layout_features_by_hand():
    inst = np.zeros((100, 100), np.int32)
    inst[10:20, 10:20] = 1  # two 10 x 10 squares: solidity 1
    inst[50:60, 50:60] = 2
    f = layout_features([inst])[0]
    assert f.shape == (len(LAYOUT_FEATURES),)
    np.testing.assert_allclose(f, [np.log1p(2.0), 0.02, np.log(100.0), 1.0, 0.0], rtol=1e-5)

    inst[30:50, 30:34] = 3  # an L: 20 x 4 bar + 4 x 16 foot -> solidity well below 0.85
    inst[46:50, 34:50] = 3
    f = layout_features([inst])[0]
    assert f[0] == pytest.approx(np.log1p(3.0))
    assert f[4] == pytest.approx(1 / 3)
    assert f[3] < (1 + 1 + 0.85) / 3

    empty = layout_features([np.zeros((32, 32), np.int32)])[0]
    np.testing.assert_allclose(empty, [0.0, 0.0, 0.0, 1.0, 0.0])
    with pytest.raises(NuDiffError):
        layout_features([np.zeros((4, 4, 3), np.int32)])


def test_ratio_prefers_layouts_like_the_reference(groups):
    ref, like, dense = groups
    r = realism_ratio(ref, np.concatenate([like, dense]))
    assert r.shape == (80,) and (r >= 0).all()
    assert np.median(r[:40]) > 5 * np.median(r[40:])


def test_curate_keeps_realistic_layouts(groups):
    ref, like, dense = groups
    cand = np.concatenate([like, dense])
    idx = curate(ref, cand, 40, seed=0)
    assert len(idx) == 40 and np.all(np.diff(idx) > 0) and idx.dtype == np.int64
    assert (idx < 40).mean() >= 0.8  # mostly from the realistic half
    fg = LAYOUT_FEATURES.index("fg_fraction")
    kept_gap = abs(cand[idx, fg].mean() - ref[:, fg].mean())
    all_gap = abs(cand[:, fg].mean() - ref[:, fg].mean())
    assert kept_gap < 0.5 * all_gap
    np.testing.assert_array_equal(idx, curate(ref, cand, 40, seed=0))  # deterministic per seed
    np.testing.assert_array_equal(curate(ref, cand, 80), np.arange(80))  # keeping all is the identity
    with pytest.raises(NuDiffError):
        curate(ref, cand, 81)
    with pytest.raises(NuDiffError):
        curate(ref, cand, 0)


def test_top_mode_keeps_the_highest_ratios(groups):
    ref, like, dense = groups
    cand = np.concatenate([dense[:10], like[:10]])  # the realistic ones last, so order alone cannot pass
    r = realism_ratio(ref, cand)
    idx = curate(ref, cand, 5, mode="top")
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert r[idx].min() >= np.delete(r, idx).max()  # nothing rejected is more realistic than what is kept
    assert (idx >= 10).all()
    np.testing.assert_array_equal(idx, curate(ref, cand, 5, seed=123, mode="top"))  # no randomness
    with pytest.raises(NuDiffError, match="mode"):
        curate(ref, cand, 5, mode="best")


def test_structure_checkpoints_store_a_reference(tmp_path):
    s, i = standin_checkpoints()
    smodel = pipeline.load_model(s, kind="structure", device="cpu")
    imodel = pipeline.load_model(i, kind="image", device="cpu")
    assert imodel.layout_reference is None
    ref = smodel.layout_reference
    assert ref is not None and ref.shape == (16, len(LAYOUT_FEATURES)) and ref.dtype == np.float32
    # the stand-in was trained on make_tile(32, seed=0..15): the stored reference is their features
    np.testing.assert_allclose(ref, layout_features([make_tile(32, seed=k)[1] for k in range(16)]), rtol=1e-6)

    # re-exporting an inference checkpoint keeps it; a given reference replaces it
    export_inference(s, tmp_path / "copy", half=True)
    assert torch.equal(load_checkpoint(tmp_path / "copy").tensors[REFERENCE_KEY], torch.from_numpy(ref))
    new = np.ones((3, len(LAYOUT_FEATURES)), np.float32)
    export_inference(s, tmp_path / "replaced", reference=new)
    np.testing.assert_array_equal(pipeline.load_model(tmp_path / "replaced", device="cpu").layout_reference, new)
    # storage computes no science: a folder is turned into layout features by the caller (the CLI does)
    with pytest.raises(TypeError, match="reference_from_folder"):
        export_inference(s, tmp_path / "from-folder", reference=str(tmp_path))
    assert not (tmp_path / "from-folder.json").exists()


def test_oversampled_generation(tmp_path):
    s, i = standin_checkpoints()
    # fp32: a kept pair is compared below with the same seed sampled alone, in batches of another size, which
    # bf16 kernels may round differently on some CPUs
    smodel = pipeline.load_model(s, kind="structure", device="cpu", precision="fp32")
    imodel = pipeline.load_model(i, kind="image", device="cpu", precision="fp32")
    pairs = pipeline.generate_pairs(smodel, imodel, 3, pipeline.PairSettings(steps=2, seed=5, oversample=2.5))
    seeds = [p.meta["seed"] for p in pairs]
    assert len(pairs) == 3 and seeds == sorted(seeds) and set(seeds) <= set(range(5, 13))
    assert all(p.meta["oversample"] == 2.5 and p.meta["filter_mode"] == "sample" for p in pairs)
    top = pipeline.generate_pairs(smodel, imodel, 3, pipeline.PairSettings(steps=2, seed=5, oversample=2.5, filter_mode="top"))
    assert all(p.meta["filter_mode"] == "top" for p in top) and set(p.meta["seed"] for p in top) <= set(range(5, 13))
    with pytest.raises(NuDiffError, match="filter mode"):
        pipeline.sample_structures(smodel, 2, steps=2, oversample=2, filter_mode="best")
    # a kept pair is reproduced from its recorded seed alone
    again = pipeline.generate_pairs(smodel, imodel, 1, pipeline.PairSettings(steps=2, seed=seeds[-1]))[0]
    np.testing.assert_array_equal(again.inst, pairs[-1].inst)
    # batched with other seeds or alone, the convolutions round differently: equal up to 1 gray level
    diff = np.abs(again.image.astype(int) - pairs[-1].image.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    with pytest.raises(NuDiffError, match="oversample"):
        pipeline.sample_structures(smodel, 2, steps=2, oversample=0.5)

    # a structure model without a stored reference: a clear error unless a reference is given
    ck = load_checkpoint(s)
    bare = {k: v for k, v in ck.tensors.items() if k.startswith("model.")}
    save_checkpoint(tmp_path / "bare", bare, kind="structure", model=ck.model_config, diffusion=ck.diffusion_config)
    bare_model = pipeline.load_model(tmp_path / "bare", device="cpu")
    with pytest.raises(NuDiffError, match="no layout reference"):
        pipeline.sample_structures(bare_model, 2, steps=2, oversample=2)
    out = pipeline.sample_structures(bare_model, 2, steps=2, oversample=2, reference=smodel.layout_reference)
    assert len(out) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_oversample_and_reference(tmp_path):
    s, i = standin_checkpoints()
    real = write_folder(tmp_path / "real", n_images=2, size=64, seed=3)
    r = _cli("export-model", str(s), str(tmp_path / "s2"), "--reference", str(real))
    assert r.returncode == 0, r.stderr
    ref = pipeline.load_model(tmp_path / "s2.json", device="cpu").layout_reference
    assert ref is not None and len(ref) == 2 * 9  # two 64 px images at the model's 32 px: 3 x 3 tiles each
    with pytest.raises(CheckpointError, match="structure models only"):  # (the CLI calibrates w instead)
        export_inference(i, tmp_path / "i2", reference=np.ones((3, len(LAYOUT_FEATURES)), np.float32))
    assert not (tmp_path / "i2.json").exists()

    r = _cli("generate", "--structure-checkpoint", str(tmp_path / "s2.json"), "--image-checkpoint", str(i),
             "--n", "2", "--steps", "2", "--oversample", "3", "--out", str(tmp_path / "gen"))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "gen" / "labels").glob("*.tif"))) == 2
    r = _cli("sample-structures", "--checkpoint", str(s), "--n", "2", "--steps", "2", "--oversample", "2",
             "--reference", str(real), "--filter-mode", "top", "--out", str(tmp_path / "st"))
    assert r.returncode == 0, r.stderr
    labels = sorted((tmp_path / "st" / "labels").glob("*.tif"))
    assert len(labels) == 2 and tifffile.imread(labels[0]).shape == (32, 32)
    r = _cli("generate", "--n", "1", "--oversample", "0", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "oversample" in r.stderr and "Traceback" not in r.stderr
