"""Shared fixtures: procedural labeled data, tiny test-preset checkpoints (trained once per session), a
launched studio per test module, and a PNG decompression bomb."""

from __future__ import annotations

import socket
import struct
import zlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints() -> tuple[Path, Path]:
    """(structure, image) checkpoints of the 'test' preset (32 px), trained once on procedural tiles and
    cached by engine.demo (a few seconds the first time on a machine)."""
    from engine.demo import standin_checkpoints

    return standin_checkpoints()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the tests of a module, set back when the module ends so that no later module
    runs on a setting it did not ask for: for small models (threads cost more than they give) and around
    in-process calls of bench scripts, whose main sets the process's threads. A leaked count changes fp32
    bits: test_conditioning compares its own process's images with the studio worker's, bit for bit."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def labeled_folder(tmp_path_factory) -> Path:
    """A folder of 3 procedural 64x64 labeled tiles (images/ + labels/)."""
    from engine.synthetic import write_folder

    return write_folder(tmp_path_factory.mktemp("labeled") / "data", n_images=3, size=64, seed=0)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(request, tmp_path_factory, tiny_checkpoints):
    """A studio launched on a free local port with the tiny models and a fixed 4 GiB memory budget
    (whatever this machine's RAM), one per test module: (demo, url, work folder). It samples in the precision
    a module names in STUDIO_PRECISION (default "auto"): "fp32" where a test compares its samples bit for bit
    with another route's (bf16 kernels may round differently across processes and batch shapes)."""
    from nudiff_app import build_app, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("studio")
    demo = build_app(work, structure_checkpoint=tiny_checkpoints[0], image_checkpoint=tiny_checkpoints[1],
                     max_memory_gb=4, precision=getattr(request.module, "STUDIO_PRECISION", "auto"))
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/", work
    finally:
        demo.nudiff.close()  # the worker process too
        demo.close()


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit greyscale PNG of width x height zeros: a few hundred kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
