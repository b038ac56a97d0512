"""Images a person looks at: PNGs of originals, counterfactuals and side-by-side pairs, and the teaching views made
from them (a flicker GIF, a difference map, an interpolation strip whose captions the pages write in HTML).

The teaching views read PNGs back from disk and never touch a model, so they can be remade for any finished run
(``diffusion.views.gallery.write_views``). Every file is written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from diffusion.files import atomic_save

# The difference map's colour scale, inferno-like: (position in [0, 1], RGB). The gallery draws its legend from it.
DIFF_COLORMAP: Tuple[Tuple[float, Tuple[int, int, int]], ...] = (
    (0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)), (1.0, (252, 255, 164)),
)
DIFF_PERCENTILE = 99.0  # the map's full scale: a robust maximum, so a few extreme pixels don't wash the rest out


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    arr = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_pil(image: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Save a PIL image atomically; the format follows the file's extension."""
    return atomic_save(path, lambda tmp: image.save(tmp, format=_format_of(path), **save_kwargs))


def _format_of(path: str | Path) -> str:
    """PIL's format name for a file name's extension (the temporary file's name must not decide it)."""
    ext = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats:
        raise ValueError(f"{path}: no image format for the extension '{ext}'")
    return formats[ext]


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) [0, 1] tensor as PNG, atomically (temporary file, then rename)."""
    return save_pil(to_pil(image), path)


def save_pair(original: torch.Tensor, counterfactual: torch.Tensor, path: str | Path, gap: int = 4) -> Path:
    """Original | counterfactual side by side with a white gap."""
    c, h, _ = original.shape
    spacer = torch.ones(c, h, gap)
    return save_image(torch.cat([original.cpu(), spacer, counterfactual.cpu()], dim=2), path)


def load_rgb(path: str | Path) -> Image.Image:
    """A saved view image as RGB (fully read, so the file is closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _same_size(original: Image.Image, other: Image.Image) -> Image.Image:
    return other if other.size == original.size else other.resize(original.size, Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------------------------
# Flicker GIF
# --------------------------------------------------------------------------------------------------------------------
def save_flicker_gif(original: Image.Image, counterfactual: Image.Image, path: str | Path, frame_ms: int) -> Path:
    """A looping two-frame GIF, original <-> counterfactual, each shown ``frame_ms`` milliseconds.

    Both frames share one palette (quantised from the two images together): with a palette per frame, pixels the edit
    left alone would change colour between frames and flicker too, hiding the real change.
    """
    counterfactual = _same_size(original, counterfactual)
    w, h = original.size
    both = Image.new("RGB", (w, 2 * h))
    both.paste(original, (0, 0))
    both.paste(counterfactual, (0, h))
    palette = both.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in (original, counterfactual)]
    return save_pil(frames[0], path, save_all=True, append_images=frames[1:], duration=int(frame_ms), loop=0,
                    optimize=False)


# --------------------------------------------------------------------------------------------------------------------
# Difference map
# --------------------------------------------------------------------------------------------------------------------
def change_magnitude(original: Image.Image, counterfactual: Image.Image) -> np.ndarray:
    """Per-pixel RMS change over the RGB channels, (H, W) in [0, 1] (the pixel version of the run's ``l2``)."""
    a = np.asarray(original, dtype=np.float32) / 255.0
    b = np.asarray(_same_size(original, counterfactual), dtype=np.float32) / 255.0
    return np.sqrt(((b - a) ** 2).mean(axis=2))


def apply_colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) float RGB in [0, 255] through :data:`DIFF_COLORMAP`."""
    stops = np.array([s for s, _ in DIFF_COLORMAP])
    colours = np.array([c for _, c in DIFF_COLORMAP], dtype=np.float32)
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, stops, colours[:, ch]) for ch in range(3)], axis=-1)


def difference_map(original: Image.Image, counterfactual: Image.Image) -> Tuple[Image.Image, float]:
    """The change colour-mapped over a dimmed grey copy of the original; returns (map, full-scale change).

    The change m = per-pixel RMS (:func:`change_magnitude`) is divided by its 99th percentile ``scale`` (the image's
    own robust maximum, so a small edit is as visible as a large one; the legend prints the scale) and shown with
    opacity m / scale: unchanged pixels keep the grey original, changed ones glow from purple to yellow.
    """
    magnitude = change_magnitude(original, counterfactual)
    scale = max(float(np.percentile(magnitude, DIFF_PERCENTILE)), 1.0 / 255.0)
    level = np.clip(magnitude / scale, 0.0, 1.0)
    grey = np.asarray(original.convert("L"), dtype=np.float32)[..., None]
    base = 40.0 + 0.45 * grey  # dimmed, so the colours stand out; still shows where things are
    alpha = np.sqrt(level)[..., None]  # lift faint changes: the eye should find them
    out = base * (1.0 - alpha) + apply_colormap(level) * alpha
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8)), scale


def save_difference_map(original: Image.Image, counterfactual: Image.Image, path: str | Path) -> float:
    """Write :func:`difference_map` as PNG; returns its full-scale change (for the legend)."""
    image, scale = difference_map(original, counterfactual)
    save_pil(image, path)
    return scale


# --------------------------------------------------------------------------------------------------------------------
# Interpolation strip
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StripFrame:
    """One tile of a strip: the image, its caption ("original", "eta 1.5") and the oracle's target probability (the
    page shows both under the frame)."""

    image: Image.Image
    caption: str
    target_prob: Optional[float] = None


def _tile_size(width: int, smallest: int = 128, largest: int = 256) -> int:
    """Tile width: small images are enlarged by a whole factor (crisp pixels), large ones shrunk to ``largest``."""
    if width < smallest:
        return width * math.ceil(smallest / width)
    return min(width, largest)


def compose_strip(frames: Sequence[StripFrame], gap: Optional[int] = None) -> Image.Image:
    """The frames side by side on white, no text (the pages caption each frame in HTML, readable at any width; a
    caption drawn into pixels shrinks with the image). Tiles follow :func:`_tile_size`: small images are enlarged by
    a whole factor with crisp pixels."""
    if not frames:
        raise ValueError("compose_strip needs at least one frame")
    w0, h0 = frames[0].image.size
    tile_w = _tile_size(w0)
    tile_h = round(h0 * tile_w / w0)
    gap = max(4, tile_w // 32) if gap is None else gap
    canvas = Image.new("RGB", (len(frames) * tile_w + (len(frames) - 1) * gap, tile_h), "white")
    resample = Image.Resampling.NEAREST if tile_w >= w0 else Image.Resampling.LANCZOS
    for k, frame in enumerate(frames):
        canvas.paste(frame.image.convert("RGB").resize((tile_w, tile_h), resample), (k * (tile_w + gap), 0))
    return canvas


def save_strip(frames: Sequence[StripFrame], path: str | Path) -> Image.Image:
    """Write :func:`compose_strip` as PNG; returns the strip."""
    strip = compose_strip(frames)
    save_pil(strip, path)
    return strip


def strip_frames(image_dir: Path, frames: List[dict], original: Optional[Image.Image],
                 original_prob: Optional[float]) -> List[StripFrame]:
    """StripFrames from a strip.json's ``frames`` (paths relative to ``image_dir``), the original first when given."""
    out = [StripFrame(original, "original", original_prob)] if original is not None else []
    for f in frames:
        out.append(StripFrame(load_rgb(image_dir / f["path"]), f"eta {float(f['eta']):g}", f.get("target_prob")))
    return out
