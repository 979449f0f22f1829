"""U-Net shapes, presets, conditioning and the null condition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import PRESETS, DiffusionConfig, UNetConfig, preset
from engine.diffusion import NoiseSchedule, guided_eps
from engine.structure import instances_to_structure
from engine.synthetic import make_tile
from engine.unet import UNet, count_parameters, null_condition


@pytest.mark.parametrize("kind", ["structure", "image"])
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes(kind, size):
    cfg = preset("test", kind, image_size=size)
    m = UNet(cfg)
    x = torch.randn(2, 3, size, size)
    cond = torch.rand(2, 3, size, size) * 2 - 1 if kind == "image" else None
    out = m(x, torch.tensor([0, 999]), cond)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_cpu_preset_sizes_and_parameter_counts():
    for size in (64, 128, 256):
        m = UNet(preset("cpu", "image", image_size=size))
        assert m(torch.randn(1, 3, size, size), torch.tensor([10]), torch.zeros(1, 3, size, size)).shape[-1] == size
    n = count_parameters(UNet(preset("cpu", "structure")))
    assert 1e6 < n < 1e7  # "a few million"
    paper = PRESETS["paper"]
    assert paper["channels"] == (256, 256, 512, 512, 1024, 1024) and paper["num_res_blocks"] == 2
    assert paper["attention_levels"] == (3, 4, 5) and paper["image_size"] == 256


def test_spade_condition_changes_output_and_structure_model_ignores_it():
    torch.manual_seed(0)
    m = UNet(preset("test", "image"))
    for p in m.parameters():  # leave the zero-initialised output convs non-zero
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([500])
    c = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not torch.allclose(m(x, t, c), m(x, t, null_condition(c)))
    # the condition may come at another resolution: it is resized per level
    assert m(x, t, torch.rand(1, 3, 64, 64)).shape == x.shape
    with pytest.raises(ValueError):
        m(x, t, None)
    s = UNet(preset("test", "structure"))
    assert torch.equal(s(x, t, c), s(x, t, None))


def test_guidance_drops_to_the_null_condition_the_model_was_trained_with():
    """Classifier-free guidance is right only if its unconditional pass gives the model exactly what training
    gave it for a dropped structure; and that null condition must be no real structure, not even the
    structure of a tile without nuclei (else "no condition" would mean "draw no nuclei")."""
    torch.manual_seed(0)
    model = UNet(preset("test", "image"))
    seen: list[torch.Tensor] = []

    def spy(x, t, cond):
        seen.append(cond.clone())
        return model(x, t, cond)

    structure = torch.from_numpy(instances_to_structure(make_tile(32, seed=1)[1])).permute(2, 0, 1)
    c = structure[None].repeat(2, 1, 1, 1)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    schedule = NoiseSchedule(DiffusionConfig(num_timesteps=10))
    schedule.loss(spy, x0, c, drop_rate=0.0)
    assert torch.equal(seen.pop(), c)  # kept conditions reach the model unchanged
    schedule.loss(spy, x0, c, drop_rate=1.0)
    trained_null = seen.pop()
    guided_eps(spy, torch.randn(2, 3, 32, 32), torch.tensor(5), c, w=2.0)
    cond_pass, uncond_pass = seen.pop().chunk(2)
    assert torch.equal(cond_pass, c) and torch.equal(uncond_pass, trained_null)
    empty = torch.from_numpy(instances_to_structure(np.zeros((32, 32), np.int32))).permute(2, 0, 1)
    assert not torch.equal(trained_null[0], structure) and not torch.equal(trained_null[0], empty)


def test_config_validation_and_round_trip():
    cfg = preset("cpu", "image")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        UNetConfig(channels=(30, 64))  # not divisible by groups
    with pytest.raises(ValueError):
        UNetConfig(image_size=100, channels=(32, 64, 128, 128))  # 100 not divisible by 8
    with pytest.raises(ValueError):
        preset("huge", "image")


def test_channels_last_weights_take_channels_last_inputs_and_give_the_same_prediction():
    torch.manual_seed(0)
    m = UNet(preset("test", "image")).eval()
    x, t, c = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.rand(2, 3, 32, 32) * 2 - 1
    assert not m.channels_last()
    seen = []
    m.inp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last) and not args[0].is_contiguous()))
    with torch.no_grad():
        before = m(x, t, c)
        m.to(memory_format=torch.channels_last)
        assert m.channels_last()
        after = m(x, t, c)
    assert seen == [False, True]  # the first convolution is given its weights' layout
    assert torch.allclose(before, after, atol=1e-5)
