"""Checkpoint files: safetensors + JSON, atomic, verified, readable errors, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import checkpoint_paths, export_inference, load_checkpoint, save_checkpoint
from engine.config import DiffusionConfig, preset
from engine.errors import CheckpointError
from engine.pipeline import load_model
from engine.unet import UNet


def _save(path, kind="structure"):
    cfg = preset("test", kind)
    m = UNet(cfg)
    return save_checkpoint(path, {f"model.{k}": v for k, v in m.state_dict().items()}, kind=kind, model=cfg,
                           diffusion=DiffusionConfig(), step=7), m


def test_round_trip_and_paths(tmp_path):
    rec, m = _save(tmp_path / "a")
    w, j = checkpoint_paths(tmp_path / "a.json")
    assert rec == j and w.exists() and w.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    for p in (tmp_path / "a", tmp_path / "a.json", tmp_path / "a.safetensors"):
        ck = load_checkpoint(p)
        assert ck.step == 7 and ck.kind == "structure" and ck.model_config == m.cfg
    loaded = load_model(tmp_path / "a")
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_wrong_kind_missing_and_corrupt(tmp_path):
    _save(tmp_path / "s")
    with pytest.raises(CheckpointError, match="structure model, but an image model"):
        load_checkpoint(tmp_path / "s", kind="image")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    w, j = checkpoint_paths(tmp_path / "s")
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or replaced"):
        load_checkpoint(tmp_path / "s")
    j.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "s")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a NuDiff checkpoint"):
        load_checkpoint(tmp_path / "x")


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path / "c")
    before = load_checkpoint(tmp_path / "c").sha256
    import engine.checkpoint as ckmod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "safetensors_bytes", boom)
    with pytest.raises(OSError):
        _save(tmp_path / "c")
    assert load_checkpoint(tmp_path / "c").sha256 == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_record_readers(tmp_path):
    from engine.checkpoint import read_record, recommended_w, sample_size

    _save(tmp_path / "c")
    _, record = read_record(tmp_path / "c")
    assert sample_size(record) == record["model"]["image_size"] == 32
    assert sample_size({**record, "sample_size": 96}) == 96
    assert recommended_w(record) is None
    assert recommended_w({**record, "guidance": {"w": 1.25}}) == 1.25
    assert recommended_w({**record, "guidance": {"w": 51}}) is None  # out of range: not trusted
    assert recommended_w({**record, "guidance": {"w": "x"}}) is None


def test_export_inference_half(tmp_path):
    _save(tmp_path / "full")
    out = export_inference(tmp_path / "full", tmp_path / "small", half=True, extra={"sample_size": 64})
    ck = load_checkpoint(out)
    assert all(v.dtype == torch.float16 for v in ck.tensors.values())
    assert ck.record["sample_size"] == 64
    assert load_model(out).image_size == 64
