"""Images a person looks at: PNGs of originals, counterfactuals and side-by-side pairs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) [0, 1] tensor as PNG, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    to_pil(image).save(tmp)
    os.replace(tmp, path)
    return path


def save_pair(original: torch.Tensor, counterfactual: torch.Tensor, path: str | Path, gap: int = 4) -> Path:
    """Original | counterfactual side by side with a white gap."""
    c, h, _ = original.shape
    spacer = torch.ones(c, h, gap)
    return save_image(torch.cat([original.cpu(), spacer, counterfactual.cpu()], dim=2), path)
