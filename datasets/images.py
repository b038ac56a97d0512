"""Open one image file (any common PIL mode) or ``.npy`` array as an RGB float tensor in [0, 1], and resize it.

Every way a file can fail to load (missing, corrupt, truncated, an array of the wrong shape) ends in one
:class:`BadImageError` that names the file, so callers can either stop or skip it with a single ``except``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

NPY_EXTENSION = ".npy"
# Compared lower-cased, so IMG_1.JPG and scan.Tiff count too.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", NPY_EXTENSION}
)

# PIL modes that carry an alpha channel (lower-case 'a' = premultiplied alpha).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class BadImageError(ValueError):
    """A file that cannot be turned into an image: missing, corrupt, truncated, or an array of the wrong shape.

    ``str(err)`` names the file and says what to do; ``err.path`` is the file (None when rebuilt from a message
    alone, as torch's DataLoader does when it re-raises an error from a worker).
    """

    def __init__(self, message: str, path: Optional[PathLike] = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    @classmethod
    def for_file(cls, path: PathLike, reason: str) -> "BadImageError":
        """The error for ``path``, with ``reason`` (what was wrong) and the ways out."""
        return cls(
            f"Cannot read image {path}: {reason}. Replace the file (re-download or re-export it) or delete it; "
            f"to leave bad files out with a warning instead of stopping, set on_bad_file to skip (in a run's config: "
            f"data.on_bad_file=skip; a rerun then resumes).",
            path,
        )

    def __reduce__(self):  # keep `path` through pickling (multiprocessing)
        return (type(self), (str(self), self.path))


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: PathLike, background: Sequence[int] = (255, 255, 255)) -> torch.Tensor:
    """Load an image file or ``.npy`` array as a float32 RGB tensor of shape (3, H, W) with values in [0, 1].

    Image files (PIL): the EXIF orientation is applied first, so a phone photo comes out the way it is shown.
    Transparent pixels (RGBA, LA, PA, and P or RGB/L with a transparency key) are alpha-composited over
    ``background`` (RGB, 0..255): ``out = alpha * pixel + (1 - alpha) * background``. 16- and 32-bit greyscale
    (I;16, I;16B, I) is divided by its integer type's maximum (65535 for 16-bit), not clipped at 255.
    Float images (F) already inside [0, 1] are kept as they are; otherwise they are min-max scaled like arrays.
    Greyscale, 1-bit, palette and CMYK images become RGB. Multi-frame files (GIF, TIFF) give their first frame.

    ``.npy`` arrays (the paper's MAD/SANE black-hole format): any integer or float dtype, shape (H, W), (H, W, 1),
    (H, W, 3), (1, H, W) or (3, H, W) -- channels-last wins when both readings fit. Each array is min-max scaled
    to [0, 1] over all its values (a constant array gives zeros); one channel is repeated to three.

    Raises:
        BadImageError: the file is missing, unreadable, corrupt or truncated, or the array has an unusable
            shape, dtype or non-finite values. The message names the file.
        ValueError: ``background`` is not three integers in 0..255.
    """
    path = Path(path)
    _check_background(background)
    if not path.is_file():
        raise BadImageError.for_file(path, "no such file")
    if path.suffix.lower() == NPY_EXTENSION:
        hwc = _npy_to_rgb(_read_npy(path), path)
    else:
        hwc = _pil_to_rgb(_read_pil(path), background, path)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32))  # (3, H, W)


def pil_to_tensor(img: Image.Image, background: Sequence[int] = (255, 255, 255)) -> torch.Tensor:
    """An in-memory PIL image of any mode -> (3, H, W) float32 in [0, 1], exactly as :func:`load_image` converts a
    file (EXIF orientation is not applied: the image is taken as it is in memory)."""
    _check_background(background)
    hwc = _pil_to_rgb(img, background, Path("<PIL image>"))
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32))


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (C, H, W) image in [0, 1] to (C, size, size): bilinear with antialiasing, no crop, clamped to [0, 1].

    The aspect ratio is not kept: the whole image is squeezed into the square, so nothing is cut away.
    """
    if img.ndim != 3:
        raise ValueError(f"resize expects one (C, H, W) image, got shape {tuple(img.shape)}")
    if size < 1:
        raise ValueError(f"resize needs a positive size, got {size}")
    out = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)  # bilinear with antialias can overshoot slightly at sharp edges


def _check_background(background: Sequence[int]) -> None:
    if len(background) != 3 or not all(0 <= int(v) <= 255 for v in background):
        raise ValueError(f"background must be three integers in 0..255 (RGB), got {list(background)}")


def _read_pil(path: Path) -> Image.Image:
    """Open, fully decode and orient one image file; any failure becomes a BadImageError."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Image.open is lazy, and a truncated file only fails here
            decoded = img.copy()  # outlives the closed file
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad bytes
        raise BadImageError.for_file(path, f"not a readable image ({type(err).__name__}: {err})") from err
    try:
        return ImageOps.exif_transpose(decoded)
    except Exception as err:  # broken EXIF around good pixels: keep the pixels as stored
        logger.warning("%s: cannot read its EXIF orientation (%s); using the image as stored", path, err)
        return decoded


def _pil_to_rgb(img: Image.Image, background: Sequence[int], path: Path) -> np.ndarray:
    """A decoded PIL image of any mode -> (H, W, 3) float32 in [0, 1]."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        raw = np.asarray(img)  # uint16 (any byte order) or int32
        grey = np.clip(raw.astype(np.float64) / np.iinfo(raw.dtype).max, 0.0, 1.0)
        return _grey_to_rgb(grey)
    if img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if not np.isfinite(grey).all():
            raise BadImageError.for_file(path, "float image holds NaN or infinite values")
        if grey.min() < 0.0 or grey.max() > 1.0:
            logger.debug("%s: float image outside [0, 1], min-max scaling it", path)
            grey = _min_max(grey)
        return _grey_to_rgb(grey)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        bg = np.asarray(background, dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + bg * (1.0 - alpha)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_npy(path: Path) -> np.ndarray:
    """np.load without pickles; anything that is not a plain numeric array becomes a BadImageError."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # ValueError (bad header, pickled objects), OSError, EOFError (truncated), ...
        raise BadImageError.for_file(path, f"not a readable .npy array ({type(err).__name__}: {err})") from err
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for .npz archives
        raise BadImageError.for_file(path, "holds an .npz archive, not a single .npy array")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise BadImageError.for_file(path, f"array dtype {arr.dtype} is not an integer or float type")
    return arr


def _npy_to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W), (H, W, 1|3) or (1|3, H, W) numeric array -> (H, W, 3) float32, min-max scaled to [0, 1]."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3) and arr.shape[0] in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # channels-first -> channels-last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or arr.size == 0:
        raise BadImageError.for_file(
            path, f"array shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3), (1, H, W) or (3, H, W)"
        )
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise BadImageError.for_file(path, "array holds NaN or infinite values")
    values = _min_max(values)
    return _grey_to_rgb(values) if values.ndim == 2 else values.astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the whole array; a constant array becomes zeros (there is no contrast to keep)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) float32, the grey value in every channel."""
    return np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)
