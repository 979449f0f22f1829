"""The colour prior: training tiles' mean colours given to samples while the model cannot see them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from engine import colour_prior, pipeline, samplers
from engine.colour_prior import SNR_MAX, colour_targets, correct_eps, tile_mean_colours
from engine.diffusion import NoiseSchedule
from engine.synthetic import make_tile


def test_tile_mean_colours_are_the_tiles_means_in_model_units():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 32:] = 255  # left half black, right half white
    got = tile_mean_colours([a], 32, stride=32)
    assert got.shape == (4, 3) and got.dtype == np.float32
    assert np.allclose(sorted(got[:, 0]), [-1, -1, 1, 1])
    assert tile_mean_colours([a[:16, :16]], 32).shape == (1, 3)  # smaller than a tile: one tile
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    assert len(tile_mean_colours([big], 8, max_colours=50)) == 50
    with pytest.raises(ValueError):
        tile_mean_colours([np.zeros((8, 8), np.uint8)], 4)


def test_with_labels_each_tile_also_has_its_foreground_fraction():
    img = np.zeros((64, 64, 3), np.uint8)
    lab = np.zeros((64, 64), np.int32)
    lab[:32, :16] = 3  # a quarter of the top-left tile is nucleus
    lab[32:, 32:] = 1  # the whole bottom-right tile
    got = tile_mean_colours([img], 32, stride=32, labels=[lab])
    assert got.shape == (4, 4) and got[:, :3].tolist() == [[-1.0] * 3] * 4
    assert got[:, 3].tolist() == [0.5, 0.0, 0.0, 1.0]  # row-major tiles
    with pytest.raises(ValueError, match="label of shape"):
        tile_mean_colours([img], 32, labels=[lab[:10]])
    with pytest.raises(ValueError):  # one label per image
        tile_mean_colours([img, img], 32, labels=[lab])


def test_a_layout_draws_among_the_tiles_of_the_nearest_foreground_fraction():
    fg = np.linspace(0, 1, 100, dtype=np.float32)
    table = np.stack([1 - 2 * fg, 1 - 2 * fg, 1 - 2 * fg, fg], 1)  # denser tiles are darker
    seeds = list(range(50))
    sparse = colour_targets(table, seeds, foreground=[0.02] * 50)
    dense = colour_targets(table, seeds, foreground=[0.9] * 50)
    # each among the 10 rows (MATCH_SHARE) nearest its fraction: fg 0-0.09 and 0.85-0.94
    assert sparse[:, 0].min() >= 1 - 2 * fg[9] - 1e-6 and len({float(v) for v in sparse[:, 0]}) > 5
    assert dense[:, 0].max() <= 1 - 2 * fg[85] + 1e-6 and dense[:, 0].min() >= 1 - 2 * fg[94] - 1e-6
    assert torch.equal(colour_targets(table, [7], foreground=[0.9])[0], dense[7])  # the seed alone decides
    anywhere = colour_targets(table, seeds)  # no layout given, or a table without fractions: among all rows
    assert anywhere[:, 0].max() - anywhere[:, 0].min() > 1.0
    assert torch.equal(colour_targets(table[:, :3], seeds, foreground=[0.02] * 50), anywhere)
    with pytest.raises(ValueError, match="2 foreground fractions for 1 seeds"):
        colour_targets(table, [1], foreground=[0.1, 0.2])


def test_targets_depend_on_the_seed_alone():
    colours = np.linspace(-1, 1, 30, dtype=np.float32)[:, None].repeat(3, 1)
    a = colour_targets(colours, [5, 6, 7])
    assert torch.equal(a[1], colour_targets(colours, [6])[0])  # batch neighbours do not matter
    assert len({float(v) for v in colour_targets(colours, range(40))[:, 0]}) > 10  # seeds spread over the table


def test_correction_sets_the_x0_mean_below_the_snr_and_leaves_eps_above():
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0_true = 0.3 * torch.tanh(torch.randn(2, 3, 16, 16, generator=g))
    eps = torch.randn(2, 3, 16, 16, generator=g)
    target = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.0, 0.4]])
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    high = int(torch.nonzero(snr >= SNR_MAX).max())  # the noisiest step the model is left alone at
    for t, corrected in ((high, False), (high + 1, True), (999, True)):
        abar = float(sched.alphas_cumprod[t])
        a, s = abar ** 0.5, (1 - abar) ** 0.5
        x = a * x0_true + s * eps  # eps is the exact noise: its x0 is x0_true
        new = correct_eps(eps, x, abar, target)
        if not corrected:
            assert torch.equal(new, eps)
            continue
        x0 = (x - s * new) / a
        assert torch.allclose(x0.mean(dim=(2, 3)), target, atol=1e-3)  # each sample's mean is its target
        centred = x0_true - x0_true.mean((2, 3), keepdim=True)
        assert torch.allclose(x0 - x0.mean((2, 3), keepdim=True), centred, atol=1e-3)  # the rest is untouched


@pytest.fixture(scope="module")
def image_model(tiny_checkpoints):
    return pipeline.load_model(tiny_checkpoints[1], device="cpu", precision="fp32").model


def test_sampling_moves_each_sample_to_its_target_colour(image_model, monkeypatch):
    inst = make_tile(32, seed=1)[1]
    from engine.structure import instances_to_structure

    cond = torch.from_numpy(instances_to_structure(inst)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1).float()
    targets = torch.tensor([[0.5, 0.1, 0.4], [-0.3, -0.5, -0.2]])
    kw = dict(sampler="ddim", steps=10, seeds=[3, 4], cond=cond, w=1.0, autocast=False)
    plain = samplers.sample(image_model, (2, 3, 32, 32), **kw)
    # corrected at every step (a threshold above any SNR of the schedule), the images' means are the targets
    monkeypatch.setattr(samplers, "correct_eps", functools.partial(colour_prior.correct_eps, snr_max=1e9))
    full = samplers.sample(image_model, (2, 3, 32, 32), colour_targets=targets, **kw)
    err_full = (full.mean(dim=(2, 3)) - targets).abs().max()
    err_plain = (plain.mean(dim=(2, 3)) - targets).abs().max()
    # within the clipping of pixels to [-1, 1] at each step (this tiny model saturates many of them)
    assert err_full < 0.06 and err_plain > 0.3 and err_full < err_plain / 5, (err_full, err_plain)
    monkeypatch.setattr(samplers, "correct_eps", colour_prior.correct_eps)
    part = samplers.sample(image_model, (2, 3, 32, 32), colour_targets=targets, **kw)  # the default threshold
    again = samplers.sample(image_model, (2, 3, 32, 32), colour_targets=targets, **kw)
    assert torch.equal(part, again) and not torch.equal(part, plain)


def test_synthesize_with_a_colour_prior_direct_and_tiled(tiny_checkpoints, monkeypatch):
    # corrected at every step, so that the target shows plainly whatever the tiny model draws (its first steps
    # alone move a freshly trained stand-in's image by only a few grey levels)
    monkeypatch.setattr(samplers, "correct_eps", functools.partial(colour_prior.correct_eps, snr_max=1e9))
    _, image_ckpt = tiny_checkpoints
    model = pipeline.load_model(image_ckpt, device="cpu", precision="fp32")
    assert model.colour_reference is None  # the test models carry none: the prior is the caller's
    inst = make_tile(32, seed=1)[1]
    bright = np.full((1, 3), 0.9, np.float32)
    plain = pipeline.synthesize(model, [inst], w=1.0, steps=4, seed=2)[0]
    lit = pipeline.synthesize(model, [inst], w=1.0, steps=4, seed=2, colour_prior=bright)[0]
    assert lit.mean() > plain.mean() + 5
    assert np.array_equal(lit, pipeline.synthesize(model, [inst], w=1.0, steps=4, seed=2, colour_prior=bright)[0])
    big = make_tile(80, seed=3)[1]  # larger than the model's tile: fused windows, one target for the canvas
    tiled = pipeline.synthesize(model, [big], w=1.0, steps=4, seed=2, colour_prior=bright)[0]
    assert tiled.shape == (80, 80, 3)
    assert tiled.mean() > pipeline.synthesize(model, [big], w=1.0, steps=4, seed=2)[0].mean() + 5
    # a table with foreground fractions: the layout's own fraction picks the colour (the nearest row of two)
    fg = float((inst > 0).mean())
    near_bright = np.array([[0.9, 0.9, 0.9, fg], [-0.9, -0.9, -0.9, fg + 0.5]], np.float32)
    near_dark = np.array([[0.9, 0.9, 0.9, fg + 0.5], [-0.9, -0.9, -0.9, fg]], np.float32)
    a = pipeline.synthesize(model, [inst], w=1.0, steps=4, seed=2, colour_prior=near_bright)[0]
    b = pipeline.synthesize(model, [inst], w=1.0, steps=4, seed=2, colour_prior=near_dark)[0]
    assert a.mean() > b.mean() + 20


def test_cli_colour_prior_from_a_folder_or_the_exported_model(tiny_checkpoints, tmp_path, capsys):
    import csv

    from PIL import Image

    from engine import cli
    from engine.synthetic import write_folder

    _, image_ckpt = tiny_checkpoints
    real = write_folder(tmp_path / "real", n_images=2, size=64, seed=3)
    labels = sorted((real / "labels").iterdir())[:1]

    def run(*extra: str) -> tuple[int, str]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        code = cli.main(["synthesize", "--labels", str(labels[0]), "--steps", "3", "--w", "1", "--seed", "4",
                         "--out", str(out), *extra])
        return code, out

    code, plain = run("--checkpoint", str(image_ckpt))
    assert code == 0
    code, _ = run("--checkpoint", str(image_ckpt), "--colour-prior", "model")
    assert code == 2 and "stores no training colours" in capsys.readouterr().err  # refused before any work
    code, _ = run("--checkpoint", str(image_ckpt), "--colour-prior", str(tmp_path / "nowhere"))
    assert code == 2 and "colour prior: folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code, _ = run("--checkpoint", str(image_ckpt), "--colour-prior", str(tmp_path / "empty"))
    assert code == 2 and "colour prior: no images in" in capsys.readouterr().err
    code, folder = run("--checkpoint", str(image_ckpt), "--colour-prior", str(real))
    assert code == 0
    # the same prior stored with the model by export-model --reference: the same images
    assert cli.main(["export-model", str(image_ckpt), str(tmp_path / "img2"), "--fp32", "--reference", str(real)]) == 0
    stored = pipeline.load_model(tmp_path / "img2.json", device="cpu").colour_reference
    assert stored is not None and stored.shape[1] == 4  # a labeled folder: with the tiles' foreground fractions
    from engine.data import load_folder

    items = load_folder(real)[0]
    expect = tile_mean_colours([it.image for it in items], 32, labels=[it.inst for it in items])
    assert np.allclose(stored, expect, atol=1e-6)
    code, model_out = run("--checkpoint", str(tmp_path / "img2.json"), "--colour-prior", "model")
    assert code == 0

    def image(out):
        return np.asarray(Image.open(next((out / "images").iterdir())))

    assert not np.array_equal(image(plain), image(folder))
    assert np.array_equal(image(folder), image(model_out))
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert rows[0]["colour_prior"] == str(real)
    assert list(csv.DictReader(open(plain / "manifest.csv")))[0]["colour_prior"] == ""


def test_generate_with_a_colour_prior_records_it(tiny_checkpoints, tmp_path):
    import csv

    from engine import cli
    from engine.synthetic import write_folder

    s_ckpt, i_ckpt = tiny_checkpoints
    real = write_folder(tmp_path / "real", n_images=2, size=64, seed=3)
    common = ["generate", "--structure-checkpoint", str(s_ckpt), "--image-checkpoint", str(i_ckpt), "--n", "2",
              "--steps", "3", "--w", "1", "--seed", "5"]
    assert cli.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--colour-prior", str(real), "--out", str(tmp_path / "prior")]) == 0
    plain = list(csv.DictReader(open(tmp_path / "plain" / "manifest.csv")))
    prior = list(csv.DictReader(open(tmp_path / "prior" / "manifest.csv")))
    assert [r["colour_prior"] for r in plain] == ["", ""] and [r["colour_prior"] for r in prior] == [str(real)] * 2
    assert [r["label"] for r in plain] == [r["label"] for r in prior]  # the same layouts, other images
    from PIL import Image

    img = [np.asarray(Image.open(tmp_path / d / plain[0]["image"])) for d in ("plain", "prior")]
    assert not np.array_equal(*img)
    labels = [np.asarray(Image.open(tmp_path / d / plain[0]["label"])) for d in ("plain", "prior")]
    assert np.array_equal(*labels)
