"""Noise process, guidance (eq. 6) and samplers."""

from __future__ import annotations

import pytest
import torch

from engine.config import DiffusionConfig, preset
from engine.diffusion import NoiseSchedule, guided_eps
from engine.samplers import Cancelled, make_scheduler, sample
from engine.unet import UNet, null_condition


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UNet(preset("test", "image")).eval()
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return m


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule(DiffusionConfig())
    assert s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    ours = s.alphas_cumprod.float()
    theirs = make_scheduler("ddpm").alphas_cumprod
    assert torch.allclose(ours, theirs, atol=1e-6)
    x0 = torch.ones(1, 1, 2, 2)
    noise = torch.zeros_like(x0)
    assert torch.allclose(s.q_sample(x0, torch.tensor([0]), noise), x0 * ours[0].sqrt())


def test_guidance_formula_and_batched_passes(model):
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([300, 300])
    c = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        e_c = model(x, t, c)
        e_u = model(x, t, null_condition(c))
        for w in (0.0, 1.0, 2.0, 7.5):
            g = guided_eps(model, x, t, c, w)
            assert torch.allclose(g, (w + 1) * e_c - w * e_u, atol=1e-5)
        assert torch.allclose(guided_eps(model, x, t, c, 0.0), e_c)  # w = 0: the conditional model


def test_ddim_eta1_full_steps_equals_ddpm(model):
    # an identity of the samplers' arithmetic: in fp32 (bf16 autocast, used where it is fast, rounds the
    # network's output to 8 bits of mantissa, which 1000 steps amplify past the tolerance)
    c = torch.rand(2, 3, 32, 32) * 2 - 1
    a = sample(model, (2, 3, 32, 32), sampler="ddpm", steps=1000, seeds=[1, 2], cond=c, w=2.0, autocast=False)
    b = sample(model, (2, 3, 32, 32), sampler="ddim", steps=1000, seeds=[1, 2], cond=c, w=2.0, eta=1.0,
               autocast=False)
    assert (a - b).abs().max() < 1e-3
    assert a.std() > 0.1


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++sde", "ddim", "ddpm"])
def test_seed_reproducible_and_batch_independent(model, sampler):
    c = torch.rand(3, 3, 32, 32) * 2 - 1
    # fp32: float sums differ slightly with batch size; under bf16 autocast (a CPU with native bf16) oneDNN's
    # kernels differ by batch size and thread count, far past this tolerance
    a = sample(model, (3, 3, 32, 32), sampler=sampler, steps=8, seeds=[5, 6, 7], cond=c, w=2.0, autocast=False)
    b = sample(model, (1, 3, 32, 32), sampler=sampler, steps=8, seeds=[6], cond=c[1:2], w=2.0, autocast=False)
    assert torch.allclose(a[1:2], b, atol=1e-4)
    again = sample(model, (3, 3, 32, 32), sampler=sampler, steps=8, seeds=[5, 6, 7], cond=c, w=2.0)
    assert torch.equal(sample(model, (3, 3, 32, 32), sampler=sampler, steps=8, seeds=[5, 6, 7], cond=c, w=2.0), again)
    other = sample(model, (1, 3, 32, 32), sampler=sampler, steps=8, seeds=[99], cond=c[1:2], w=2.0)
    assert not torch.allclose(other, b)
    assert a.min() >= -1 and a.max() <= 1


def test_sde_solver_injects_noise_the_deterministic_one_does_not(model):
    """dpm++sde starts from the same seeded noise as dpm++ but adds fresh per-sample noise at each step:
    same seed, different result; and the stochastic part of each sample comes from its own seed."""
    c = torch.rand(2, 3, 32, 32) * 2 - 1
    det = sample(model, (2, 3, 32, 32), sampler="dpm++", steps=8, seeds=[3, 4], cond=c, w=2.0)
    sde = sample(model, (2, 3, 32, 32), sampler="dpm++sde", steps=8, seeds=[3, 4], cond=c, w=2.0)
    assert (det - sde).abs().mean() > 0.05
    # with one step the solver is first order: both reduce to the clipped x0 prediction of the start noise
    det1 = sample(model, (2, 3, 32, 32), sampler="dpm++", steps=1, seeds=[3, 4], cond=c, w=2.0)
    sde1 = sample(model, (2, 3, 32, 32), sampler="dpm++sde", steps=1, seeds=[3, 4], cond=c, w=2.0)
    assert torch.allclose(det1, sde1, atol=1e-5)



def test_first_order_sde_solver_is_ddim_eta1(model):
    """With 2 steps both of dpm++sde's steps are first order, where SDE-DPM-Solver++ equals DDIM with
    eta = 1; the same per-sample noise must then give the same samples."""
    c = torch.rand(2, 3, 32, 32) * 2 - 1  # an identity of the arithmetic: in fp32, as above
    sde = sample(model, (2, 3, 32, 32), sampler="dpm++sde", steps=2, seeds=[8, 9], cond=c, w=2.0, autocast=False)
    ddim = sample(model, (2, 3, 32, 32), sampler="ddim", steps=2, seeds=[8, 9], cond=c, w=2.0, eta=1.0,
                  autocast=False)
    assert torch.allclose(sde, ddim, atol=1e-4)
    assert not torch.allclose(sde, sample(model, (2, 3, 32, 32), sampler="dpm++", steps=2, seeds=[8, 9],
                                          cond=c, w=2.0), atol=1e-2)

def test_bf16_autocast_where_fast_stays_close_to_fp32(model, monkeypatch):
    """Sampling runs the network under bf16 autocast where that is fast (a GPU, a CPU with native bf16), and
    in fp32 elsewhere or when asked (autocast=False, load_model(precision="fp32"))."""
    import engine.samplers
    from engine.precision import bf16_is_fast

    c = torch.rand(2, 3, 32, 32) * 2 - 1
    fp32 = sample(model, (2, 3, 32, 32), steps=8, seeds=[3, 4], cond=c, w=2.0, autocast=False)
    auto = sample(model, (2, 3, 32, 32), steps=8, seeds=[3, 4], cond=c, w=2.0)
    assert (auto - fp32).abs().mean() < 0.01  # the same samples up to bf16 rounding
    assert torch.equal(auto, fp32) == (not bf16_is_fast("cpu"))  # bf16 was used exactly where it is fast
    monkeypatch.setattr(engine.samplers, "bf16_is_fast", lambda device: True)  # as on a GPU or such a CPU
    forced = sample(model, (2, 3, 32, 32), steps=8, seeds=[3, 4], cond=c, w=2.0)
    assert not torch.equal(forced, fp32) and (forced - fp32).abs().mean() < 0.01
    assert torch.equal(sample(model, (2, 3, 32, 32), steps=8, seeds=[3, 4], cond=c, w=2.0, autocast=False), fp32)


def test_cli_offers_every_sampler():
    """The registry drives the CLI: its names are the choices, in its order, and its descriptions and
    default steps are the help."""
    from engine.cli import build_parser
    from engine.samplers import SAMPLERS

    assert list(SAMPLERS) == ["ddim", "dpm++", "dpm++sde", "ddpm"]
    sub = next(a for a in build_parser()._actions if a.choices and "sample-structures" in a.choices)
    for command in ("sample-structures", "synthesize", "generate"):
        actions = sub.choices[command]._actions
        opt = next(a for a in actions if "--sampler" in a.option_strings)
        assert list(opt.choices) == list(SAMPLERS)
        steps = next(a for a in actions if "--steps" in a.option_strings)
        for spec in SAMPLERS.values():
            assert f"{spec.name} ({spec.description})" in opt.help
            assert f"{spec.steps} for {spec.name}" in steps.help


def test_registry_entries_make_their_schedulers_on_the_training_schedule():
    """Each registry entry makes its own diffusers scheduler, all on the noise process that training uses
    (engine.diffusion.scheduler_settings); NoiseSchedule's float64 betas are that schedule (diffusers'
    float32 linspace is the same line to within one float32 rounding)."""
    from engine.diffusion import scheduler_settings
    from engine.samplers import SAMPLERS

    cfg = DiffusionConfig()
    ours = NoiseSchedule(cfg)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    for name, spec in SAMPLERS.items():
        sched = make_scheduler(name, cfg)
        assert type(sched).__name__ == spec.scheduler
        for key, value in {**scheduler_settings(cfg), **spec.options}.items():
            assert sched.config[key] == value, (name, key)
        theirs = sched.betas.double()
        assert torch.allclose(ours.betas, theirs, rtol=2 ** -23, atol=0), name  # one float32 rounding
        assert torch.allclose(ours.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-5, atol=0), name
    with pytest.raises(ValueError):
        NoiseSchedule(DiffusionConfig(schedule="cosine"))
    with pytest.raises(ValueError):
        make_scheduler("ddim", DiffusionConfig(schedule="cosine"))


def test_default_steps_come_from_the_registry(model):
    """steps=None runs the registry's default number of steps (one step run, then cancelled)."""
    from engine.samplers import SAMPLERS, sampler_spec

    for name, spec in SAMPLERS.items():
        seen = []
        with pytest.raises(Cancelled):
            sample(model, (1, 3, 16, 16), sampler=name, cond=torch.zeros(1, 3, 16, 16), w=1.0,
                   progress=lambda i, n: seen.append(n), cancel=lambda: bool(seen))
        assert seen == [spec.steps], name
    with pytest.raises(ValueError, match="choose one of ddim, dpm\\+\\+, dpm\\+\\+sde, ddpm"):
        sampler_spec("euler")
    with pytest.raises(ValueError):
        sample(model, (1, 3, 16, 16), sampler="euler")


def test_progress_and_cancel(model):
    seen = []
    sample(model, (1, 3, 32, 32), sampler="dpm++", steps=5, cond=torch.zeros(1, 3, 32, 32), w=1.0,
           progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        sample(model, (1, 3, 32, 32), sampler="ddim", steps=10, cond=torch.zeros(1, 3, 32, 32), cancel=cancel)
    with pytest.raises(ValueError):
        make_scheduler("euler")


@pytest.mark.parametrize("autocast", [False, True])
def test_condition_maps_give_the_same_samples_as_recomputing_them(model, autocast):
    """The SPADE modulation kept from the first step (engine.unet.ConditionMaps) changes no number, whole,
    partly kept (a budget that holds only some layers) or with guidance off; and it is really reused."""
    from engine.diffusion import prepare_condition
    from engine.unet import SPADE, ConditionMaps

    c = torch.rand(2, 3, 32, 32) * 2 - 1
    calls = {"n": 0}
    original = SPADE.modulation

    def counting(self, cond, size):
        calls["n"] += 1
        return original(self, cond, size)

    SPADE.modulation = counting
    try:
        for w in (2.0, 0.0):
            full = prepare_condition(c, w, 1 << 30)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(torch.zeros(len(full.cond), 3, 32, 32), torch.tensor([1] * len(full.cond)), full)
            half = full.nbytes // 2  # holds some layers' maps, not all
            out = {}
            for cache in (0, 1, half, 1 << 30):
                calls["n"] = 0
                out[cache] = sample(model, (2, 3, 32, 32), sampler="ddim", steps=4, seeds=[3, 4], cond=c, w=w,
                                    autocast=autocast, cache_bytes=cache)
                out[cache, "calls"] = calls["n"]
            for cache in (1, half, 1 << 30):
                assert torch.equal(out[cache], out[0]), (w, cache)
            layers = sum(isinstance(m, SPADE) for m in model.modules())
            assert out[0, "calls"] == out[1, "calls"] == 4 * layers  # nothing kept: every step, every layer
            assert out[1 << 30, "calls"] == layers  # all kept: each layer once, at the first step
            assert layers < out[half, "calls"] < 4 * layers  # some kept
    finally:
        SPADE.modulation = original
    full = prepare_condition(c, 2.0, 1 << 30)
    assert isinstance(full, ConditionMaps) and full.cond.shape[0] == 4  # [y, null]
    with pytest.raises(ValueError, match="batch of 4 for a batch of 2"):
        model(torch.zeros(2, 3, 32, 32), torch.tensor([1, 1]), full)
