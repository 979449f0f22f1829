"""Reverse-process samplers: one protocol over diffusers' schedulers, the loop owned by the engine.

* ``ddim``  — DDIM (Song et al. 2021), the default: 20 steps, eta = 1 (DDPM's variance; eta = 0 is
  deterministic). On the demo models 20 DDIM steps give nuclei morphology as close to real as 1000 DDPM
  steps, at 50x fewer network evaluations (docs/benchmarks.md, section 4).
* ``dpm++`` — DPM-Solver++(2M) (Lu et al. 2022), x0 clipped to [-1, 1]; deterministic. Known issue: like
  deterministic DDIM (eta = 0), it leaves speckle in the structures of briefly trained structure models,
  which the watershed splits into fragments (docs/benchmarks.md, section 4); prefer ddim or dpm++sde there.
* ``dpm++sde`` — SDE-DPM-Solver++(2M) (Lu et al. 2022, the stochastic variant), x0 clipped to [-1, 1]: a
  second-order solver that injects fresh noise each step, as DDIM with eta = 1 does, and keeps the layouts.
* ``ddpm``  — ancestral DDPM (paper eq. 5); faithful with all T steps, usable with fewer.

Reproducibility: every sample of a batch has its own ``torch.Generator`` (seed + index), used for its
initial noise and for its per-step noise, so a sample depends on its seed, not on the batch it ran in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from engine.colour_prior import correct_eps
from engine.config import DiffusionConfig
from engine.diffusion import guided_eps, prepare_condition, scheduler_settings
from engine.errors import NuDiffError
from engine.memory import CONDITION_CACHE_BYTES
from engine.precision import bf16_is_fast

__all__ = ["SAMPLERS", "SamplerSpec", "sampler_spec", "make_scheduler", "sample", "Cancelled"]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: which diffusers scheduler, with which settings, and how its step is called.

    scheduler: the diffusers class, by name (diffusers is imported when a scheduler is made, so reading the
    registry -- the CLI's choices, the studio's dropdowns -- does not load it). noise: what a step draws
    fresh noise with -- "variance_noise" (each sample's own generator, passed as one batched tensor),
    "generators" (the per-sample generators, handed to the scheduler) or None (deterministic).
    """

    name: str
    scheduler: str
    options: dict[str, Any]  # the scheduler's settings beyond the noise process
    steps: int  # default number of steps
    description: str  # one line, for the CLI's help and the studio
    noise: Literal["variance_noise", "generators"] | None = None
    eta: bool = False  # the step takes DDIM's eta
    step_options: dict[str, Any] = field(default_factory=dict)  # fixed extra arguments of step()


# thresholding with max 1.0 clips each x0 prediction to the data range [-1, 1], as DDIM's clip_sample
# does; without it the first steps (alpha_bar ~ 4e-5) amplify eps errors wildly.
_DPM = dict(solver_order=2, timestep_spacing="trailing", lower_order_final=True, thresholding=True,
            sample_max_value=1.0)

#: the samplers by name, in the order the CLI and the studio offer them (the first is the default)
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("ddim", "DDIMScheduler", dict(clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing"),
                20, "DDIM, eta = 1; the default", noise="variance_noise", eta=True,
                step_options=dict(use_clipped_model_output=True)),
    SamplerSpec("dpm++", "DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="dpmsolver++"),
                20, "DPM-Solver++ 2M, deterministic; can fragment layouts"),
    SamplerSpec("dpm++sde", "DPMSolverMultistepScheduler", dict(_DPM, algorithm_type="sde-dpmsolver++"),
                20, "stochastic DPM-Solver++ 2M", noise="variance_noise"),
    SamplerSpec("ddpm", "DDPMScheduler", dict(clip_sample=True, variance_type="fixed_small",
                                              timestep_spacing="trailing"),
                1000, "ancestral; the paper's, 1000 steps", noise="generators"),
)}


class Cancelled(NuDiffError):
    """Raised inside a sampling loop when the caller's cancel() returned True."""


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry of sampler `name`; ValueError naming the choices for an unknown one."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def make_scheduler(name: str, cfg: DiffusionConfig | None = None):
    """A fresh diffusers scheduler for sampler `name` on the noise process `cfg`."""
    import diffusers

    spec = sampler_spec(name)
    return getattr(diffusers, spec.scheduler)(**scheduler_settings(cfg or DiffusionConfig()), **spec.options)


def _batched_noise(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(device, dtype)


@torch.no_grad()
def sample(
    model: nn.Module,
    shape: tuple[int, int, int, int],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seeds: list[int] | None = None,
    cond: torch.Tensor | None = None,
    w: float = 0.0,
    eta: float = 1.0,
    diffusion: DiffusionConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    autocast: bool = True,
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor] | None = None,
    cache_bytes: int = CONDITION_CACHE_BYTES,
    colour_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw a batch from the reverse process.

    shape: (B, C, H, W). seeds: B integers (default 0..B-1). cond: (B, 3, H, W) structures for a
    conditional model, used with guidance scale w. eta: DDIM's stochasticity (ignored otherwise).
    progress(i, n) is called after each step; cancel() is polled before each step. denoiser(x, t, cond, w):
    the guided noise prediction (default: the model's over the whole sample, engine.diffusion.guided_eps;
    engine.tiling.TiledDenoiser for canvases larger than the model's tile). autocast: run the network under
    bf16 autocast where that is fast (engine.precision.bf16_is_fast: a GPU, a CPU with native bf16); the
    sampler's own arithmetic stays fp32. False: fp32 throughout. cache_bytes: memory for the condition's
    SPADE modulation, computed at the first step and reused (engine.unet.ConditionMaps; the same samples,
    faster; 0 = recompute at every step), for the default denoiser; a TiledDenoiser has its own.
    colour_targets: (B, 3) mean colours in [-1, 1] that each sample's x0 is given while its mean colour is
    unobservable (engine.colour_prior; None: the model's own guess, as trained).
    Returns (B, C, H, W) float32 clipped to [-1, 1].
    """
    spec = sampler_spec(sampler)
    steps = steps or spec.steps
    if steps < 1:
        raise ValueError("steps must be >= 1")
    b = shape[0]
    seeds = list(range(b)) if seeds is None else list(seeds)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
    device = next(model.parameters()).device
    sched = make_scheduler(sampler, diffusion)
    sched.set_timesteps(steps)
    step_args = dict(spec.step_options, **({"eta": eta} if spec.eta else {}))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _batched_noise(shape, gens, device, torch.float32) * sched.init_noise_sigma
    model_cond = None
    if cond is not None:
        cond = cond.to(device, torch.float32)
        model_cond = prepare_condition(cond, w, cache_bytes) if denoiser is None and cache_bytes > 0 else cond
    use_amp = autocast and bf16_is_fast(device)
    timesteps = sched.timesteps
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            eps = (guided_eps(model, x, tt, model_cond, w) if denoiser is None else denoiser(x, tt, cond, w)).float()
        if colour_targets is not None:
            eps = correct_eps(eps, x, float(sched.alphas_cumprod[int(t)]), colour_targets)
        if spec.noise == "variance_noise":  # per-sample noise, from each sample's own generator
            step_args["variance_noise"] = _batched_noise(shape, gens, device, torch.float32)
        elif spec.noise == "generators":
            step_args["generator"] = gens  # one generator per sample
        x = sched.step(eps, t, x, **step_args).prev_sample
        if progress is not None:
            progress(i + 1, n)
    return x.clamp(-1, 1)

