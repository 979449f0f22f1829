"""Denoising U-Net with timestep embedding, self-attention and an optional SPADE-conditioned decoder.

Unconditional (structure model, ``cond_channels=0``): an encoder and decoder of ResBlocks
(GroupNorm-SiLU-Conv twice, timestep scale-shift). Conditional (image model, ``cond_channels=3``): the
decoder blocks are CondResBlocks (SPADE-SiLU-Conv twice), whose parameter-free GroupNorm is modulated by
gamma/beta predicted from the nuclei structure resized to the block's resolution, so the structure
enters at every decoder scale. The *null condition* of classifier-free guidance is the all-zeros
structure (:func:`null_condition`): a real structure has semantic channel +-1, never 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import UNetConfig

__all__ = ["UNet", "ConditionMaps", "null_condition", "count_parameters"]


def null_condition(like: torch.Tensor) -> torch.Tensor:
    """The 'no structure' condition used for dropping in training and the unguided pass: zeros."""
    return torch.zeros_like(like)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: GroupNorm without affine, modulated by the structure.

    Custom: no library has SPADE (diffusers' nearest SpatialNorm is 1x1 convs over an affine GroupNorm)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.SiLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def modulation(self, cond: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each (B, channels, *size), of a structure (B, cond_channels, H, W)."""
        if cond.shape[-2:] != size:
            cond = F.interpolate(cond, size=size, mode="bilinear", align_corners=False, antialias=True)
        h = self.shared(cond)
        return self.gamma(h), self.beta(h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | ConditionMaps) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        gamma, beta = cond.modulation(self, size) if isinstance(cond, ConditionMaps) else self.modulation(cond, size)
        return self.norm(x) * (1 + gamma) + beta


class ConditionMaps:
    """A condition (B, cond_channels, H, W) that keeps each SPADE layer's (gamma, beta) after its first use.

    They depend on the condition alone, and sampling passes the same condition at every step, so the decoder's
    SPADE convolutions need to run once per sampling run rather than once per step: the same numbers, an
    image-model forward about 1.6x as fast (docs/benchmarks.md §3). Maps are kept while their bytes stay
    within ``max_bytes``; a layer beyond that is computed at every use, as without the cache. Use one
    object with one model, under one autocast setting, for forwards over batches of B.
    """

    def __init__(self, cond: torch.Tensor, max_bytes: int):
        self.cond, self.max_bytes, self.nbytes = cond, int(max_bytes), 0
        self._maps: dict[SPADE, tuple[torch.Tensor, torch.Tensor]] = {}

    def modulation(self, layer: SPADE, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self._maps.get(layer)
        if kept is not None and tuple(kept[0].shape[-2:]) == size:
            return kept
        gamma, beta = layer.modulation(self.cond, size)
        n = gamma.numel() * gamma.element_size() + beta.numel() * beta.element_size()
        if kept is None and self.nbytes + n <= self.max_bytes:
            self._maps[layer] = (gamma, beta)
            self.nbytes += n
        return gamma, beta


class ResBlock(nn.Module):
    """(Norm-SiLU-Conv) x2 with timestep scale-shift; Norm is GroupNorm, or SPADE when conditional."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, emb_dim: int, conditional: bool):
        super().__init__()
        self.conditional = conditional
        if conditional:
            self.norm1 = SPADE(in_ch, cfg.cond_channels, cfg.spade_hidden, cfg.groups)
            self.norm2 = SPADE(out_ch, cfg.cond_channels, cfg.spade_hidden, cfg.groups)
        else:
            self.norm1 = nn.GroupNorm(cfg.groups, in_ch)
            self.norm2 = nn.GroupNorm(cfg.groups, out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _norm(self, norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return norm(x, cond) if self.conditional else norm(x)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, cond)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self._norm(self.norm2, h, cond) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all pixels (torch scaled_dot_product_attention), residual."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One ResBlock (+ optional attention) of the encoder or decoder."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb, cond):
        x = self.res(x, emb, cond)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """Epsilon-prediction U-Net.

    forward(x, t, cond=None):
        x: (B, in_channels, S, S) float, noisy sample (data range [-1, 1] plus noise).
        t: (B,) int or float timesteps in [0, T).
        cond: (B, cond_channels, S', S') nuclei structure in [-1, 1] (any S'; resized per level), or the
            null condition (zeros); required iff cfg.cond_channels > 0.
        returns: (B, out_channels, S, S) predicted noise.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.channels[0]
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        conditional = cfg.cond_channels > 0

        def attn(level: int, ch: int):
            return AttnBlock(ch, cfg.head_channels, cfg.groups) if level in cfg.attention_levels else None

        self.down = nn.ModuleList()
        skips = [ch0]
        ch = ch0
        n_levels = len(cfg.channels)
        for level, out_ch in enumerate(cfg.channels):
            for _ in range(cfg.num_res_blocks):
                self.down.append(_Level(ResBlock(cfg, ch, out_ch, emb_dim, False), attn(level, out_ch)))
                ch = out_ch
                skips.append(ch)
            if level < n_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.mid1 = ResBlock(cfg, ch, ch, emb_dim, conditional)
        self.mid_attn = AttnBlock(ch, cfg.head_channels, cfg.groups)
        self.mid2 = ResBlock(cfg, ch, ch, emb_dim, conditional)

        self.up = nn.ModuleList()
        for level in reversed(range(n_levels)):
            out_ch = cfg.channels[level]
            for i in range(cfg.num_res_blocks + 1):
                block = ResBlock(cfg, ch + skips.pop(), out_ch, emb_dim, conditional)
                self.up.append(_Level(block, attn(level, out_ch)))
                ch = out_ch
            if level > 0:
                self.up.append(Upsample(ch))

        self.out_norm = nn.GroupNorm(cfg.groups, ch)
        self.out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def channels_last(self) -> bool:
        """Whether the convolutions' weights are channels-last (``model.to(memory_format=torch.channels_last)``:
        a pair 1.25-1.3x as fast on our CPU, but not the default, since GroupNorm in bf16 then makes a sample of
        a small model depend on its batch, docs/benchmarks.md §3); inputs are then given that layout too."""
        w = self.inp.weight
        return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor | ConditionMaps | None = None) -> torch.Tensor:
        if self.cfg.cond_channels > 0:
            if cond is None:
                raise ValueError("this model is conditional: pass a structure or null_condition()")
            if isinstance(cond, ConditionMaps):
                if cond.cond.shape[0] != x.shape[0]:
                    raise ValueError(f"condition maps of a batch of {cond.cond.shape[0]} for a batch of {x.shape[0]}")
            else:
                cond = cond.to(x.dtype)
        else:
            cond = None
        if self.channels_last():  # inputs in the weights' layout: no conversion inside every convolution
            x = x.contiguous(memory_format=torch.channels_last)
            if isinstance(cond, torch.Tensor):
                cond = cond.contiguous(memory_format=torch.channels_last)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels[0]).to(x.dtype))
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb, None)
            hs.append(h)
        h = self.mid1(h, emb, cond)
        h = self.mid_attn(h)
        h = self.mid2(h, emb, cond)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(F.silu(self.out_norm(h)))
