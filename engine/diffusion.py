"""Gaussian noise process of DDPM (Ho et al. 2020) and the classifier-free guided noise prediction.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with T steps of linear betas; the network predicts eps
and is trained with the simple loss ||eps - eps_theta(x_t, t, y)||^2 (paper eq. 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DiffusionConfig
from engine.unet import ConditionMaps, null_condition

__all__ = ["NoiseSchedule", "scheduler_settings", "guided_eps", "prepare_condition"]


def scheduler_settings(cfg: DiffusionConfig) -> dict:
    """The noise process `cfg` as the settings of a diffusers scheduler: the one definition of the schedule
    that training (:class:`NoiseSchedule`) and the samplers (engine.samplers.make_scheduler) share."""
    if cfg.schedule != "linear":
        raise ValueError(f"unsupported beta schedule {cfg.schedule!r} (only 'linear')")
    return dict(num_train_timesteps=cfg.num_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                beta_schedule=cfg.schedule, prediction_type="epsilon")


class NoiseSchedule:
    """Forward process q(x_t | x_0) for a :class:`DiffusionConfig`.

    The betas are those of the samplers' diffusers schedulers (the same :func:`scheduler_settings`:
    diffusers' "linear" is this linspace) but computed here in float64, as training always has: diffusers
    builds them only in float32, whose alpha_bar differs in 867 of the 1000 steps (up to 2.5e-7), so
    taking its arrays would change every training loss.
    """

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg or DiffusionConfig()
        s = scheduler_settings(self.cfg)
        betas = torch.linspace(s["beta_start"], s["beta_end"], s["num_train_timesteps"], dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noisy x_t of clean x0 (B, C, H, W) at integer timesteps t (B,) with the given noise."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)[:, None, None, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        drop_rate: float = 0.0,
        generator: torch.Generator | None = None,
        min_snr_gamma: float = 0.0,
    ) -> torch.Tensor:
        """Simple loss (mean squared error on eps) for a batch x0 (B, C, H, W) in [-1, 1].

        min_snr_gamma > 0: each sample's mean squared error is weighted by min(SNR_t, gamma) / SNR_t
        (SNR_t = alpha_bar_t / (1 - alpha_bar_t); Min-SNR-gamma, Hang et al. 2023), which turns down the
        nearly clean steps (SNR > gamma) against the noisy ones; 0 = the plain mean (Ho et al. 2020).

        cond: (B, 3, H, W) structure for a conditional model; each sample's condition is replaced by the
        null condition with probability drop_rate (classifier-free training). Timesteps and noise are
        drawn from `generator` on its own device (a CUDA generator keeps them on the GPU).
        """
        b = x0.shape[0]
        dev = x0.device
        gdev = generator.device if generator is not None else dev  # draw where the generator lives
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=gdev).to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(dev, x0.dtype)
        if cond is not None and drop_rate > 0:
            drop = (torch.rand((b,), generator=generator, device=gdev) < drop_rate).to(dev)
            cond = torch.where(drop[:, None, None, None], null_condition(cond), cond)
        pred = model(self.q_sample(x0, t, noise), t, cond)
        if min_snr_gamma <= 0:
            return F.mse_loss(pred.float(), noise.float())
        per_sample = (pred.float() - noise.float()).pow(2).mean((1, 2, 3))
        return (self.min_snr_weights(t, min_snr_gamma) * per_sample).mean()

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t for integer timesteps t (B,): float32 (B,) in (0, 1]."""
        abar = self.alphas_cumprod.to(t.device)[t]
        snr = abar / (1 - abar)
        return (snr.clamp(max=gamma) / snr).float()


def prepare_condition(cond: torch.Tensor, w: float, max_bytes: int) -> ConditionMaps:
    """The model input of guided_eps for a condition (B, 3, H, W) that stays the same over a sampling run:
    the batched [y, null] (y alone when w = 0) as :class:`engine.unet.ConditionMaps`, which keep the SPADE
    modulation (up to ``max_bytes``) from the first step for the later ones."""
    return ConditionMaps(cond if w == 0 else torch.cat([cond, null_condition(cond)]), max_bytes)


def guided_eps(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | ConditionMaps | None,
    w: float,
) -> torch.Tensor:
    """Noise prediction with classifier-free guidance, paper eq. 6.

    eps = (w + 1) * eps(x, t, y) - w * eps(x, t, null); the conditional and the unconditional pass run
    as one batched forward. w = 0 (or an unconditional model, cond=None) is a single plain pass.
    cond: the structure (B, 3, H, W), or :func:`prepare_condition` of it with the same w.
    """
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if cond is None or w == 0:
        return model(x, t, cond)
    pair = cond if isinstance(cond, ConditionMaps) else torch.cat([cond, null_condition(cond)])
    both = model(torch.cat([x, x]), torch.cat([t, t]), pair)
    eps_c, eps_u = both.chunk(2)
    return (w + 1) * eps_c - w * eps_u
