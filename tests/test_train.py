"""Training: loss goes down, checkpoints are atomic safetensors + JSON, resume is exact, NaN stops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.config import TrainConfig
from engine.errors import CheckpointError, TrainingError
from engine.synthetic import make_tile
from engine.structure import instances_to_structure
from engine.run_status import budget_reached, read_status
from engine.train import Trainer, TrainingSet


@pytest.fixture(scope="module")
def data() -> TrainingSet:
    tiles = [make_tile(32, seed=i) for i in range(8)]
    return TrainingSet.from_arrays([t[0] for t in tiles], [t[1] for t in tiles])


def cfg(kind="structure", **kw) -> TrainConfig:
    base = dict(kind=kind, preset="test", steps=12, finetune_steps=4, batch_size=4, lr=1e-3, save_every=6,
                preview_every=0, log_every=2, keep_last=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_batch_augmentation_keeps_image_and_structure_aligned(data):
    gen = torch.Generator().manual_seed(0)
    x, y = data.batch(list(range(8)), gen)
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    # nuclei are darker than background in the procedural tiles: the semantic channel follows the image
    for i in range(8):
        nuc = y[i, 0] > 0
        assert x[i].mean(0)[nuc].mean() < x[i].mean(0)[~nuc].mean()


def test_batch_is_the_tile_transformed_exactly(data):
    idx = torch.tensor([3, 3, 5, 0])
    k, flip = torch.tensor([1, 2, 3, 0]), torch.tensor([True, False, True, True])
    x, y = data.batch(idx, k=k, flip=flip)
    assert x.dtype == y.dtype == torch.float32
    for b in range(4):
        i, kk, ff = int(idx[b]), int(k[b]), bool(flip[b])
        moved_img = np.rot90(data.images[i][:, ::-1] if ff else data.images[i], kk)
        moved_inst = np.rot90(data.insts[i][:, ::-1] if ff else data.insts[i], kk)
        np.testing.assert_allclose(x[b].permute(1, 2, 0).numpy(), moved_img / 127.5 - 1, atol=1e-6)
        np.testing.assert_allclose(y[b].permute(1, 2, 0).numpy(),
                                   instances_to_structure(np.ascontiguousarray(moved_inst)), atol=1e-3)


def test_loss_goes_down(data, tmp_path):
    Trainer(cfg(steps=40, log_every=5, save_every=1000), tmp_path, data, show_progress=False).run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])


def test_image_model_two_stages_and_files(data, tmp_path):
    out = Trainer(cfg("image"), tmp_path, data, show_progress=False).run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    stages = {(r["lr"], r["drop_rate"]) for r in log if "loss" in r}
    assert stages == {(1e-3, 0.0), (2e-5, 0.2)}
    ck = load_checkpoint(out)
    assert ck.kind == "image" and ck.record["contents"] == "inference" and ck.step == 16
    assert set((tmp_path / n).name for n in ["latest.json", "latest.safetensors", "model.json"]) <= \
        set(p.name for p in tmp_path.iterdir())
    snaps = sorted(p.name for p in tmp_path.glob("step_*.json"))
    assert snaps == ["step_0000012.json", "step_0000016.json"]  # keep_last = 2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    rec = json.loads((tmp_path / "latest.json").read_text())
    assert rec["train"]["kind"] == "image" and rec["data_fingerprint"] == data.fingerprint
    assert read_status(tmp_path)["state"] == "finished"


def test_structure_preview_is_what_sampling_gives_and_logs_layout_statistics(data, tmp_path):
    from PIL import Image

    from engine import render
    from engine.samplers import sample
    from engine.structure import structure_to_instances

    t = Trainer(cfg(steps=6, preview_every=4), tmp_path, data, show_progress=False)
    t.run()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    previews = [r for r in rows if "preview" in r]
    assert [r["step"] for r in previews] == [4, 6]  # one preview per due step, none twice at the end
    assert sorted(p.name for p in (tmp_path / "previews").glob("step_*.png")) == \
        ["step_0000004.png", "step_0000006.png"]
    # the preview is what the CLI / studio sampler draws from these weights: DDIM 20, eta = 1, seeds 0..7
    x = sample(t.ema, (8, 3, 32, 32), seeds=list(range(8)), diffusion=t.diffusion)
    layouts = [structure_to_instances(x[i].permute(1, 2, 0).numpy()) for i in range(8)]
    want = render.grid([render.colorize_instances(a) for a in layouts], cols=4)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "previews" / "latest.png").convert("RGB")), want)
    last = previews[-1]
    count = [len(np.unique(a[a > 0])) for a in layouts]
    assert last["preview"]["n"] == 8
    assert last["preview"]["nuclei_per_tile"] == pytest.approx(np.mean(count), abs=1e-3)
    assert last["preview"]["fg_fraction"] == pytest.approx(np.mean([(a > 0).mean() for a in layouts]), abs=1e-4)
    real = [len(np.unique(a[a > 0])) for a in data.insts]
    assert last["real"]["nuclei_per_tile"] == pytest.approx(np.mean(real), abs=1e-3) and np.mean(real) > 0
    assert last["real"]["fg_fraction"] == pytest.approx(np.mean([(a > 0).mean() for a in data.insts]), abs=1e-4)


def test_min_snr_weighting_is_the_documented_weighted_mean(data):
    """min(SNR, gamma) / SNR per sample: 1 for the noisy steps (SNR <= gamma), gamma / SNR for the clean ones;
    the loss is the weighted mean of per-sample squared errors, and gamma = 0 is the plain MSE."""
    from engine.diffusion import NoiseSchedule
    from engine.unet import UNet
    from engine.config import preset

    sched = NoiseSchedule()
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = sched.min_snr_weights(t, 5.0)
    assert snr[0] > 5 and snr[-1] < 5
    assert torch.allclose(w.double(), torch.where(snr > 5, 5 / snr, torch.ones_like(snr)), rtol=1e-6)
    assert w[-1] == 1 and w[0] < 0.01
    torch.manual_seed(0)
    model = UNet(preset("test", "structure", 32)).eval()
    _, x0 = data.batch(range(4), k=torch.zeros(4, dtype=torch.long), flip=torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        weighted = sched.loss(model, x0, generator=torch.Generator().manual_seed(1), min_snr_gamma=5.0)
        plain = sched.loss(model, x0, generator=torch.Generator().manual_seed(1))
        # by hand, with the same draws of t and noise
        g = torch.Generator().manual_seed(1)
        tt = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        err = (model(sched.q_sample(x0, tt, noise), tt) - noise).pow(2).mean((1, 2, 3))
    assert torch.allclose(plain, err.mean(), rtol=1e-5)
    assert torch.allclose(weighted, (sched.min_snr_weights(tt, 5.0) * err).mean(), rtol=1e-5)
    assert not torch.allclose(weighted, plain)


def test_min_snr_gamma_trains_and_is_a_trained_setting(data, tmp_path):
    Trainer(cfg(steps=4, min_snr_gamma=5.0), tmp_path, data, show_progress=False).run()
    assert load_checkpoint(tmp_path / "latest").record["train"]["min_snr_gamma"] == 5.0
    with pytest.raises(TrainingError, match="min_snr_gamma 5.0 -> 0.0"):
        Trainer(cfg(steps=6), tmp_path, data, show_progress=False)
    # a run recorded before the setting existed was trained with plain MSE: turning it on is a change
    old = tmp_path / "old"
    Trainer(cfg(steps=2), old, data, show_progress=False).run()
    record = json.loads((old / "latest.json").read_text())
    del record["train"]["min_snr_gamma"]
    (old / "latest.json").write_text(json.dumps(record))
    with pytest.raises(TrainingError, match="min_snr_gamma 0.0 -> 5.0"):
        Trainer(cfg(steps=4, min_snr_gamma=5.0), old, data, show_progress=False)
    Trainer(cfg(steps=4), old, data, show_progress=False).close()  # unchanged: resumes


def test_resume_is_exact(data, tmp_path):
    full = Trainer(cfg(), tmp_path / "a", data, show_progress=False)
    full.run()
    # the same run interrupted at step 6 (STOP after a save), then resumed to the end
    t = Trainer(cfg(steps=6), tmp_path / "b", data, show_progress=False)
    t.run()
    assert read_status(tmp_path / "b")["step"] == 6
    resumed = Trainer(cfg(), tmp_path / "b", data, show_progress=False)
    assert resumed.step == 6
    resumed.run()
    a = load_checkpoint(tmp_path / "a" / "latest")
    b = load_checkpoint(tmp_path / "b" / "latest")
    assert a.step == b.step == 12
    for k in a.tensors:
        if k.startswith(("model.", "ema.", "optim.")):
            assert torch.allclose(a.tensors[k].float(), b.tensors[k].float(), atol=1e-6), k


def test_stop_file_saves_and_marks_stopped(data, tmp_path):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    Trainer(cfg(), tmp_path, data, stop=stop, show_progress=False).run()
    st = read_status(tmp_path)
    assert st["state"] == "stopped" and st["step"] == 3 and st["reason"] == "requested"
    assert load_checkpoint(tmp_path / "latest").step == 3
    assert (tmp_path / "model.json").exists() and not budget_reached(tmp_path)  # exported, but to be resumed


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(data, tmp_path):
    t = Trainer(cfg(steps=20, save_every=5), tmp_path, data, show_progress=False)
    orig = t.schedule.loss

    def loss(*a, **k):
        value = orig(*a, **k)
        return value * float("nan") if t.step >= 7 else value

    t.schedule.loss = loss
    with pytest.raises(TrainingError, match="step 5"):
        t.run()
    assert load_checkpoint(tmp_path / "latest").step == 5
    assert read_status(tmp_path)["state"] == "failed"


def test_nan_loss_between_checks_is_never_saved(data, tmp_path):
    # losses are read back every log_every steps; a stop in between must not save the weights a NaN reached
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    t = Trainer(cfg(steps=20, save_every=100, log_every=10), tmp_path, data, stop=stop, show_progress=False)
    orig = t.schedule.loss
    t.schedule.loss = lambda *a, **k: orig(*a, **k) * (float("nan") if t.step == 2 else 1.0)
    with pytest.raises(TrainingError, match="at step 3"):
        t.run()
    assert not (tmp_path / "latest.json").exists()
    assert read_status(tmp_path)["state"] == "failed"


def test_resume_refuses_another_kind(data, tmp_path):
    Trainer(cfg(steps=2), tmp_path, data, show_progress=False).run()
    with pytest.raises(CheckpointError, match="structure model"):
        Trainer(cfg("image", steps=2), tmp_path, data, show_progress=False)


def test_records_name_every_machine_the_weights_were_trained_on(data, tmp_path):
    from engine.precision import machine_description

    here, other = machine_description("cpu"), "cpu: another CPU (AVX2), torch 2.0.0"
    assert here.startswith("cpu: ") and torch.__version__ in here
    exported = Trainer(cfg(steps=2, save_every=2), tmp_path / "a", data, show_progress=False).run()
    assert load_checkpoint(tmp_path / "a" / "latest").record["trained_on"] == [here]
    assert json.loads(exported.read_text())["trained_on"] == [here]  # the export keeps it
    # resumed on this machine after steps made on another: both, the earlier one first
    latest = tmp_path / "a" / "latest.json"
    latest.write_text(json.dumps({**json.loads(latest.read_text()), "trained_on": [other]}))
    Trainer(cfg(steps=4, save_every=2), tmp_path / "a", data, show_progress=False).run()
    assert load_checkpoint(tmp_path / "a" / "latest").record["trained_on"] == [other, here]
    # a model fine-tuned from another keeps its machines: its bits depend on where its start was trained
    start = Trainer(cfg("image", steps=2, finetune_steps=0, save_every=2), tmp_path / "s1", data,
                    show_progress=False).run()
    start.write_text(json.dumps({**json.loads(start.read_text()), "trained_on": [other]}))
    tuned = Trainer(cfg("image", steps=0, finetune_steps=2, save_every=2, init_from=str(start)), tmp_path / "s2",
                    data, show_progress=False).run()
    assert json.loads(tuned.read_text())["trained_on"] == [other, here]


def test_init_from_loads_weights(data, tmp_path):
    first = Trainer(cfg("image", steps=4, finetune_steps=0), tmp_path / "s1", data, show_progress=False).run()
    t = Trainer(cfg("image", steps=0, finetune_steps=2, init_from=str(first)), tmp_path / "s2", data,
                show_progress=False)
    ema = load_checkpoint(first).weights_for_inference()
    for k, v in t.ema.state_dict().items():
        assert torch.equal(v, ema[k])


def test_ema_warm_up_rule(data, tmp_path):
    """Each EMA update uses decay min(ema_decay, (1 + step) / (10 + step)): 2/11 at step 1, 3/12 at step 2
    (here after a resume). Not a copy at the first update, as torch's AveragedModel and diffusers' EMAModel
    would make it."""
    t = Trainer(cfg(steps=1, save_every=1000), tmp_path, data, show_progress=False)
    ema = {k: v.clone() for k, v in t.ema.state_dict().items()}
    for step in (1, 2):
        if step == 2:
            t = Trainer(cfg(steps=2, save_every=1000), tmp_path, data, show_progress=False)
        t.run()
        live = t.acc.unwrap_model(t.model).state_dict()
        decay = min(t.cfg.ema_decay, (1 + step) / (10 + step))
        new = t.ema.state_dict()
        moved = [k for k in new if not torch.equal(live[k], ema[k])]  # (at step 1 only the zero-initialised
        assert moved and not any(torch.equal(new[k], live[k]) for k in moved)  # output layer learns)
        for k, v in new.items():
            assert torch.equal(v, torch.lerp(ema[k], live[k], 1 - decay)), (step, k)
        ema = {k: v.clone() for k, v in new.items()}


def test_warmup_raises_the_lr_of_whichever_stage_the_run_starts_in(data, tmp_path):
    Trainer(cfg("image", steps=0, finetune_steps=3, warmup_steps=4, log_every=1, finetune_lr=2e-5), tmp_path,
            data, show_progress=False).run()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lrs == pytest.approx([2e-5 / 4, 2e-5 * 2 / 4, 2e-5 * 3 / 4])


def test_time_limit_stops_saves_and_resumes(data, tmp_path):
    t = Trainer(cfg(steps=10_000, save_every=10_000), tmp_path, data, show_progress=False, time_limit=1.0)
    out = t.run()
    st = read_status(tmp_path)
    step = st["step"]
    assert st["state"] == "stopped" and "time limit" in st["message"] and st["reason"] == "time_limit"
    assert budget_reached(tmp_path)  # the time limit was its budget
    assert 0 < step < 10_000
    assert load_checkpoint(tmp_path / "latest").step == step and load_checkpoint(out).step == step
    again = Trainer(cfg(steps=step + 2, save_every=10_000), tmp_path, data, show_progress=False).run()
    assert load_checkpoint(again).step == step + 2 and read_status(tmp_path)["state"] == "finished"
    assert budget_reached(tmp_path)
    assert not budget_reached(tmp_path / "never-trained")
    with pytest.raises(TrainingError, match="time limit"):
        Trainer(cfg(), tmp_path / "x", data, show_progress=False, time_limit=0)
