"""Typed configuration records and model presets.

Every checkpoint stores these records as JSON beside its weights, so a model can be rebuilt without the
code that trained it guessing anything. Records are plain dataclasses: `to_dict` / `from_dict` round-trip
through JSON (tuples become lists and back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PAPER_W = 2.0  # the paper's classifier-free guidance scale: the start for an image model never calibrated

KINDS: tuple[str, ...] = ("structure", "image")


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass `cls` from a dict, converting lists back to tuples and ignoring unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a denoising U-Net.

    channels: feature channels of each resolution level (len = number of levels; each level after the
        first halves the resolution). num_res_blocks: ResBlocks per encoder level (the decoder has one
        more, to consume the skip of the downsampling step). attention_levels: indices of levels with
        self-attention. cond_channels: 0 for an unconditional model, 3 for a model conditioned on a nuclei
        structure through SPADE in every decoder block.
    """

    image_size: int = 128
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128, 128)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (3,)
    head_channels: int = 32
    groups: int = 8
    dropout: float = 0.0
    cond_channels: int = 0
    spade_hidden: int = 32

    def __post_init__(self):
        n = len(self.channels)
        if n < 1:
            raise ValueError("channels must name at least one level")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every level's channels must be divisible by groups={self.groups}")
        if any(not 0 <= a < n for a in self.attention_levels):
            raise ValueError(f"attention_levels must index the {n} levels")
        if self.image_size % (2 ** (n - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by {2 ** (n - 1)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward noise process (Ho et al. 2020): T steps, linear betas, epsilon prediction."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionConfig":
        return _from_dict(cls, data)


# --- presets -----------------------------------------------------------------------------------------

#: name -> UNetConfig keyword arguments shared by the structure and the image model.
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: a training step in well under a second on a CPU; for tests and smoke runs.
    "test": dict(image_size=32, channels=(16, 32), num_res_blocks=1, attention_levels=(1,),
                 head_channels=16, groups=8, spade_hidden=16),
    # small: trains on 2 CPU cores in a couple of hours to a recognisable result; the embedded demo.
    "cpu": dict(image_size=128, channels=(32, 64, 128, 128), num_res_blocks=1,
                attention_levels=(3,), head_channels=32, groups=8, spade_hidden=32),
    # the paper's network (6 levels, 2 blocks per level, attention on the last 3), for a GPU.
    "paper": dict(image_size=256, channels=(256, 256, 512, 512, 1024, 1024), num_res_blocks=2,
                  attention_levels=(3, 4, 5), head_channels=64, groups=32, spade_hidden=128),
}


def preset_of(config: UNetConfig) -> str | None:
    """Name of the preset that `config` is (at its own image size), or None."""
    kind = "image" if config.cond_channels else "structure"
    for name in PRESETS:
        if preset(name, kind, config.image_size) == config:
            return name
    return None


def preset(name: str, kind: str, image_size: int | None = None) -> UNetConfig:
    """UNetConfig of preset `name` for model `kind` ('structure': unconditional, 'image': SPADE)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    kwargs = dict(PRESETS[name])
    if image_size is not None:
        kwargs["image_size"] = int(image_size)
    kwargs["cond_channels"] = 3 if kind == "image" else 0
    return UNetConfig(**kwargs)


@dataclass
class TrainConfig:
    """One training run of a structure or image model.

    The image model trains in two stages as in the paper: `steps` fully conditional (drop_rate 0, lr),
    then `finetune_steps` classifier-free (finetune_drop_rate, finetune_lr). The structure model ignores
    the finetune fields.
    """

    kind: str = "structure"
    preset: str = "cpu"
    image_size: int | None = None
    data: str = ""
    tile_stride: int | None = None
    fraction: float = 1.0
    steps: int = 2000
    finetune_steps: int = 0
    batch_size: int = 4
    lr: float = 1e-4
    finetune_lr: float = 2e-5
    drop_rate: float = 0.0
    finetune_drop_rate: float = 0.2
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    save_every: int = 500
    preview_every: int = 500
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 autocast on a GPU or a CPU with native bf16, else fp32
    init_from: str | None = None
    warmup_steps: int = 0  # learning rate rises linearly over the run's first steps (for init_from)
    # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), min(SNR, gamma) / SNR per sample, which turns down
    # the nearly clean steps (SNR > gamma); 0: plain MSE
    min_snr_gamma: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.finetune_steps if self.kind == "image" else 0)
