"""Glue between the typed ``DataConfig`` and the model-agnostic ``datasets`` package."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from datasets.folder import ImageRecord, ImageRecordDataset, build_records, collate_skip_bad
from datasets.registry import get_spec, resolve_classes
from diffusion.config import DataConfig
from diffusion.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_root(d: DataConfig) -> Path:
    """The dataset root; the ``digits`` entry writes scikit-learn's digits there on first use (offline, seconds)."""
    if d.name == "digits":
        _export_digits_once(str(Path(d.root).resolve()))
    return Path(d.root)


@functools.lru_cache(maxsize=None)
def _export_digits_once(root: str) -> None:
    from datasets.digits import export_digits

    export_digits(root)


def dataset_classes(d: DataConfig) -> List[str]:
    """Class names in label order: data.classes, else the registry entry's, else the sorted train-split folders."""
    return list(resolve_classes(get_spec(d.name), prepare_root(d), d.train_split, list(d.classes)))


def split_records(d: DataConfig, split: str, classes: Optional[List[str]] = None,
                  use_file_lists: bool = False) -> List[ImageRecord]:
    """Records of ``split`` (sorted, capped at data.num_samples per class); the per-class file lists of
    data.file_lists select the images when ``use_file_lists`` (the images to edit)."""
    classes = classes or dataset_classes(d)
    if use_file_lists:
        unknown = sorted(set(d.file_lists) - set(dataset_classes(d)))
        if unknown:
            raise ConfigError(f"data.file_lists names classes {unknown} that the dataset does not have (its classes: "
                              f"{dataset_classes(d)}); fix the class names (they are case-sensitive folder names)",
                              key="data.file_lists")
    lists = {c: d.file_lists[c] for c in classes if c in d.file_lists} if use_file_lists else None
    return build_records(prepare_root(d), split, classes, num_samples=d.num_samples, file_lists=lists,
                         extensions=get_spec(d.name).extensions)


def validation_split(d: DataConfig, classes: Sequence[str], per_class: int,
                     seed: int = 0) -> Tuple[Dict[str, List[ImageRecord]], Dict[str, List[ImageRecord]]]:
    """({class: validation records}, {class: the other train records}): a seeded share of each class's train split.
    scripts/calibrate.py edits these images; scripts/train_mini_model.py can leave the same ones out of training
    (``holdout_classes``, ``holdout_per_class``, ``holdout_seed``), so that the calibration sees unseen images."""
    val, rest = {}, {}
    for c in classes:
        records = split_records(d, d.train_split, [c])
        if len(records) < per_class + 2:
            raise ConfigError(f"class '{c}' has {len(records)} train images: too few to hold out {per_class} for "
                              "validation (hold out fewer: calibrate.py --images, or holdout_per_class)")
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        val[c] = [records[i] for i in sorted(order[:per_class])]
        rest[c] = [records[i] for i in sorted(order[per_class:])]
    return val, rest


def held_out_paths(d: DataConfig, classes: Sequence[str], per_class: int, seed: int) -> List[str]:
    """The paths of :func:`validation_split`'s validation images, drawn from the whole train split (data.num_samples
    does not cap it, as in scripts/calibrate.py), for a trainer to leave out."""
    if not per_class:
        return []
    val, _ = validation_split(dataclasses.replace(d, num_samples=None), classes, per_class, seed)
    return sorted(str(r.path) for c in classes for r in val[c])


def make_loader(records: List[ImageRecord], d: DataConfig, size: int, batch_size: int) -> DataLoader:
    """Ordered batches of dicts (pixel_values (B, 3, size, size) in [0, 1], label, index, path); unreadable files
    stop the run (on_bad_file: error) or are dropped with a warning (skip)."""
    dataset = ImageRecordDataset(records, size=size, background=tuple(d.background), on_bad_file=d.on_bad_file.value)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=d.num_workers,
                      collate_fn=collate_skip_bad)
