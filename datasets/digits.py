"""Write scikit-learn's 8x8 handwritten digits as a small ``root/{train,test}/<digit>/<index>.png`` dataset.

The digits ship inside scikit-learn, so this gives a real two-(or ten-)class image dataset with no download: the
offline demo and the tests run the whole pipeline on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from PIL import Image

from .folder import staging_directory
from .images import PathLike, resize

logger = logging.getLogger(__name__)

MANIFEST_NAME = "digits_export.json"  # written last into the export; records what was exported and how
SPLITS = ("train", "test")


def export_digits(out_root: PathLike, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Path:
    """Export the 1797 digits to ``out_root/{train,test}/<digit>/<index>.png`` and return ``out_root``.

    The split is stratified by digit and fixed by ``seed``; ``<index>`` is the digit's position in
    ``sklearn.datasets.load_digits`` (zero-padded, so file-name order is index order). Each 8x8 image (values 0..16)
    is scaled to [0, 1], upsampled bilinearly to ``size`` x ``size`` and saved as a greyscale PNG.

    Idempotent and atomic: the tree is built in a temporary folder and renamed into place, so ``out_root`` is either
    absent or complete; when it already holds a complete export with the same settings nothing is done (also when
    another process finished the same export first).

    Raises:
        ValueError: ``size`` < 1 or ``test_fraction`` not in (0, 1).
        FileExistsError: ``out_root`` holds something else (another export's settings, an incomplete export, or
            unrelated files).
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    out_root = Path(out_root)
    settings = {"size": size, "test_fraction": test_fraction, "seed": seed}
    if _existing_export_is_usable(out_root, settings):
        return out_root
    files = _render_digits(size, test_fraction, seed)  # relative path -> (size, size) uint8
    manifest = {**settings, "counts": _count_by_folder(files)}
    try:
        with staging_directory(out_root) as staging:
            for relative, pixels in files.items():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(staging / relative)  # 2-D uint8 -> mode L
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    except OSError:
        if _existing_export_is_usable(out_root, settings):  # another process won the rename with the same export
            return out_root
        raise
    logger.info("Wrote %d digit images (%dx%d) to %s", len(files), size, size, out_root)
    return out_root


def _render_digits(size: int, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """``{"<split>/<digit>/<index>.png": (size, size) uint8}`` for every digit, split stratified by label."""
    from sklearn.datasets import load_digits  # imported here: the rest of the data layer must not need sklearn
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
    # (N, 8, 8) read as N channels of one image: resize treats each channel on its own.
    images = resize(torch.from_numpy(digits.images / 16.0).float(), size)  # (N, size, size) in [0, 1]
    pixels = (images * 255.0).round().to(torch.uint8).numpy()
    width = len(str(len(labels) - 1))
    files: Dict[str, np.ndarray] = {}
    for split, split_indices in zip(SPLITS, (train_idx, test_idx)):
        for i in sorted(split_indices.tolist()):
            files[f"{split}/{labels[i]}/{i:0{width}d}.png"] = pixels[i]
    return files


def _count_by_folder(files: Dict[str, Any]) -> Dict[str, int]:
    """``{"<split>/<digit>": number of files}``."""
    counts: Dict[str, int] = {}
    for relative in files:
        folder = relative.rsplit("/", 1)[0]
        counts[folder] = counts.get(folder, 0) + 1
    return counts


def _existing_export_is_usable(out_root: Path, settings: Dict[str, Any]) -> bool:
    """True when ``out_root`` holds a complete export with ``settings``; False when it is absent or empty.

    Raises:
        FileExistsError: ``out_root`` holds anything else; the message says what and what to do.
    """
    if not out_root.exists() or (out_root.is_dir() and not any(out_root.iterdir())):
        return False
    manifest_path = out_root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileExistsError(f"{out_root} exists but is not a digits export (no {MANIFEST_NAME}). Choose an empty "
                              f"or new folder, or delete it.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    found = {key: manifest.get(key) for key in settings}
    if found != settings:
        raise FileExistsError(f"{out_root} holds a digits export made with {found}, not {settings}. Delete it or "
                              f"choose another folder to export with the new settings.")
    for folder, expected in manifest["counts"].items():
        present = len(list((out_root / folder).glob("*.png"))) if (out_root / folder).is_dir() else 0
        if present != expected:
            raise FileExistsError(f"{out_root / folder} holds {present} images, the export wrote {expected}: the "
                                  f"folder was changed after export. Delete {out_root} and export again.")
    logger.info("%s already holds the digits export %s; nothing to do", out_root, settings)
    return True
