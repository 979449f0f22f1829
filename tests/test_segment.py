"""Segmenter: consistent augmentation, short training on procedural tiles, tiled inference, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, DataError
from engine.metrics import dice
from engine.errors import NuDiffError
from engine.segment import (_RGB2YIQ, _YIQ2RGB, Segmenter, SegmenterConfig, _normalise, _Sampler, dihedral,
                            segmenter_paths, train_segmenter)
from engine.structure import instances_to_structure
from engine.synthetic import make_tile

TINY = SegmenterConfig(base_channels=8, depth=2, groups=4, tile=64, overlap=16)


@pytest.fixture(scope="module")
def trained(one_torch_thread) -> Segmenter:
    pairs = [make_tile(64, seed=i) for i in range(6)]
    return train_segmenter(pairs, size=48, steps=70, batch_size=4, lr=4e-3, seed=0, device="cpu", config=TINY)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_equals_structure_of_transformed_instances(k, flip):
    image, inst = make_tile(48, seed=5)
    moved = np.rot90(inst[:, ::-1] if flip else inst, k)
    img2, s2 = dihedral(image, instances_to_structure(inst), k, flip)
    np.testing.assert_allclose(s2, instances_to_structure(np.ascontiguousarray(moved)), atol=1e-5)
    np.testing.assert_array_equal(img2, np.rot90(image[:, ::-1] if flip else image, k))


def test_training_lowers_loss_and_beats_chance(trained):
    loss = np.asarray(trained.record["loss"])
    assert len(loss) == 70 and np.isfinite(loss).all()
    assert loss[-10:].mean() < 0.8 * loss[:10].mean()
    image, true = make_tile(96, seed=123)  # held out, and larger than the inference tile
    pred = trained.predict(image)
    fg = float((true > 0).mean())
    all_foreground = 2 * fg / (1 + fg)  # Dice of predicting nuclei everywhere
    assert dice(true, pred) > max(0.5, all_foreground + 0.2)
    assert pred.max() > 0


def test_tiled_inference_on_sizes_that_are_not_multiples(trained):
    for h, w in [(101, 77), (37, 150), (64, 64)]:
        image = make_tile(160, seed=9)[0][:h, :w]
        structure = trained.predict_structure(image, batch_size=3)
        assert structure.shape == (h, w, 3) and structure.dtype == np.float32
        assert np.isfinite(structure).all() and np.abs(structure).max() <= 1.0 + 1e-6
        inst = trained.predict(image)
        assert inst.shape == (h, w) and inst.dtype == np.int32


def test_save_load_round_trip_gives_equal_predictions(trained, tmp_path):
    record = trained.save(tmp_path / "seg")
    weights, rec = segmenter_paths(record)
    assert weights.is_file() and rec == record and json.loads(rec.read_text())["kind"] == "segmenter"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
    loaded = Segmenter.load(weights, device="cpu")
    assert loaded.config == trained.config
    image = make_tile(80, seed=77)[0]
    np.testing.assert_allclose(loaded.predict_structure(image), trained.predict_structure(image), atol=1e-6)
    np.testing.assert_array_equal(loaded.predict(image), trained.predict(image))


def test_load_rejects_corrupt_or_foreign_files(trained, tmp_path):
    record = trained.save(tmp_path / "seg")
    weights, _ = segmenter_paths(record)
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.load(tmp_path / "missing")
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match"):
        Segmenter.load(record)
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "kind": "structure"}))
    with pytest.raises(CheckpointError, match="not a segmenter"):
        Segmenter.load(record)


def test_training_is_reproducible_and_validates_input():
    pairs = [make_tile(40, seed=i) for i in range(2)]  # smaller than the crop: padded
    a = train_segmenter(pairs, size=48, steps=3, batch_size=2, seed=1, device="cpu", config=TINY)
    b = train_segmenter(pairs, size=48, steps=3, batch_size=2, seed=1, device="cpu", config=TINY)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(DataError):
        train_segmenter([], steps=1, device="cpu", config=TINY)
    with pytest.raises(DataError, match="uint8"):
        train_segmenter([(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.int32))], steps=1, config=TINY)
    with pytest.raises(DataError, match="label"):
        train_segmenter([(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.int32))], steps=1, config=TINY)


def test_pair_weights_steer_the_crop_sampling():
    pairs = [make_tile(32, seed=1), make_tile(64, seed=2), make_tile(64, seed=3)]
    np.testing.assert_allclose(_Sampler.build(pairs, 32, 0.0).weights, [1 / 9, 4 / 9, 4 / 9])
    np.testing.assert_allclose(_Sampler.build(pairs, 32, 0.0, [1.0, 0.0, 1.0]).weights, [0.2, 0.0, 0.8])
    with pytest.raises(NuDiffError, match="pair_weights"):
        train_segmenter(pairs, steps=1, pair_weights=[1.0, -1.0, 0.0], config=TINY)


def test_strong_augmentation_changes_colour_not_geometry():
    image, inst = make_tile(64, seed=3)
    structure = instances_to_structure(inst)
    np.testing.assert_allclose(_YIQ2RGB @ _RGB2YIQ, np.eye(3), atol=1e-5)  # no hue turn -> same colours
    light = _Sampler.build([(image, inst)], 64, 0.0)
    strong = _Sampler.build([(image, inst)], 64, 0.0, augment="strong")
    for sampler in (light, strong):
        xs, ys = sampler.batch(np.random.default_rng(0), 12)
        for x, y in zip(xs.transpose(0, 2, 3, 1), ys.transpose(0, 2, 3, 1)):
            # the label is a valid structure of the tile under some flip / quarter turn ...
            found = [(k, f) for k in range(4) for f in (False, True)
                     if np.allclose(dihedral(image, structure, k, f)[1], y, atol=1 / 127)]
            assert found, "the target is not a transformed structure of the tile"
            plain = _normalise(dihedral(image, structure, *found[0])[0])
            if sampler is light:  # ... and without jitter, light training shows the image as it is
                np.testing.assert_array_equal(x, plain)
                continue
            # strong: other colours, same picture (the nuclei stay where the label puts them)
            assert np.abs(x - plain).mean() > 0.02
            assert np.corrcoef(x.mean(-1).ravel(), plain.mean(-1).ravel())[0, 1] > 0.8
            assert x[y[..., 0] > 0].mean() < x[y[..., 0] <= 0].mean()
            assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6


def test_training_records_its_augmentation_and_refuses_unknown_ones():
    pairs = [make_tile(48, seed=i) for i in range(2)]
    seg = train_segmenter(pairs, size=32, steps=2, batch_size=2, seed=0, device="cpu", config=TINY, augment="strong")
    assert seg.record["augment"] == "strong"
    with pytest.raises(NuDiffError, match="augment must be one of light, strong"):
        train_segmenter(pairs, steps=1, device="cpu", config=TINY, augment="heavy")


class _Crash(Exception):
    """Stands for the process being killed part-way through a training."""


def _crash_at(n: int):
    def progress(step: int, steps: int) -> None:
        if step == n:
            raise _Crash

    return progress


def test_an_interrupted_training_resumes_from_its_snapshot_to_the_same_model(tmp_path):
    pairs = [make_tile(48, seed=i) for i in range(3)]
    settings = dict(size=32, steps=9, batch_size=2, lr=3e-3, seed=4, device="cpu", config=TINY, augment="strong")
    whole = train_segmenter(pairs, **settings)
    snap = tmp_path / "snap.safetensors"
    with pytest.raises(_Crash):  # killed at step 7: the snapshot of step 6 is on disk
        train_segmenter(pairs, **settings, snapshot=snap, snapshot_every=3, progress=_crash_at(7))
    torch.manual_seed(123)  # the resumed call must not depend on the random state it starts in
    np.random.seed(5)
    steps_seen: list[int] = []
    resumed = train_segmenter(pairs, **settings, snapshot=snap, snapshot_every=3,
                              progress=lambda s, n: steps_seen.append(s))
    assert steps_seen == [7, 8, 9]  # it trained only the steps after the snapshot
    for (ka, va), (kb, vb) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert resumed.record["loss"] == whole.record["loss"]
    assert snap.is_file()  # left for the caller to remove once its model is saved


def test_a_snapshot_of_another_training_or_a_damaged_one_is_ignored(tmp_path):
    pairs = [make_tile(48, seed=i) for i in range(3)]
    settings = dict(size=32, steps=4, batch_size=2, seed=4, device="cpu", config=TINY)
    whole = train_segmenter(pairs, **settings)
    snap = tmp_path / "snap.safetensors"
    train_segmenter(pairs, **{**settings, "lr": 5e-3}, snapshot=snap, snapshot_every=2)  # other settings
    for damage in ("other settings", "other pairs", "torn", "garbage"):
        if damage == "other pairs":
            train_segmenter(pairs[:2], **settings, snapshot=snap, snapshot_every=2)
        elif damage == "torn":
            train_segmenter(pairs, **settings, snapshot=snap, snapshot_every=2)
            snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
        elif damage == "garbage":
            snap.write_bytes(b"not a snapshot")
        steps_seen: list[int] = []
        again = train_segmenter(pairs, **settings, snapshot=snap, snapshot_every=2,
                                progress=lambda s, n: steps_seen.append(s))
        assert steps_seen == [1, 2, 3, 4], damage  # trained from the start ...
        for va, vb in zip(whole.net.state_dict().values(), again.net.state_dict().values()):
            assert torch.equal(va, vb), damage  # ... to the model of an uninterrupted call
    with pytest.raises(NuDiffError, match="snapshot_every"):
        train_segmenter(pairs, **settings, snapshot=snap, snapshot_every=0)
