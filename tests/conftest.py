"""Shared fixtures: a tiny random Kandinsky-shaped model and small generated image folders (offline, seconds)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def sigint_not_ignored():
    """Tests that stop a subprocess with SIGINT need it to reach the child. A shell without job control starts a
    background job (the suite run as ``pytest &``, as some CI runners do) with SIGINT ignored, and an ignored signal
    stays ignored across exec, so the child would never see it. Giving this process Python's usual handler for the
    session makes every child start with SIGINT's default action (exec resets handled signals to it)."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a module of many small-op trainings: results do not depend on the machine's core count,
    and on a shared 2-core CPU extra threads only spin on OpenMP barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A freshly built tiny model folder (decoder/, prior/), made through the same code as the shipped one."""
    from diffusion.demo.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


def write_blob_images(root: Path, split: str, cls: str, n: int, size: int = 24, seed: int = 0) -> list:
    """n RGB PNGs of a coloured disc (class-dependent colour) at random places."""
    rng = np.random.default_rng(seed + zlib.crc32(f"{split}/{cls}".encode()) % 1000)  # stable across runs
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    colour = np.array([230, 60, 40]) if cls.endswith("a") else np.array([40, 80, 230])
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(6, size - 6, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 30)
        img = np.full((size, size, 3), 245, np.uint8)
        img[mask] = colour
        path = folder / f"{i:03d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def blob_data(tmp_path) -> Path:
    """root/{train,test}/{class_a,class_b}: 6 train and 3 test images per class."""
    root = tmp_path / "data"
    for cls in ("class_a", "class_b"):
        write_blob_images(root, "train", cls, 6)
        write_blob_images(root, "test", cls, 3, seed=1)
    return root
