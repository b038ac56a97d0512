"""The named datasets: the paper's six domains, a generic folder, and scikit-learn digits for the offline demo.

Each entry says which class folders it uses and how the data must sit on disk; every one is read through the same
``root/<split>/<class>/<files>`` code in :mod:`datasets.folder`. Importing this module loads only the standard
library (configs import it to validate dataset names before anything heavy loads).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset.

    Attributes:
        name: the registry key.
        classes: the class folder names, in label order; empty = the sorted subfolders of the train split.
        layout: for people -- the expected on-disk layout and where to get (or how to build) the data.
        extensions: the file extensions to read (lower-case, with the dot); None = every supported image type.
    """

    name: str
    classes: Tuple[str, ...]
    layout: str
    extensions: Optional[Tuple[str, ...]] = None


class UnknownDatasetError(KeyError):
    """A dataset name that is not in :data:`DATASETS`; the message suggests close names and lists the known ones."""

    def __str__(self) -> str:  # KeyError would show the message in quotes, as if it were a key
        return str(self.args[0])


_SPECS = (
    DatasetSpec(
        name="folder",
        classes=(),
        layout=(
            "Any images as root/<split>/<class>/<files>, e.g. root/train/cat/001.png and root/test/cat/101.png. "
            "The classes are the sorted subfolder names of the train split unless listed explicitly. Split names are "
            "used exactly as they are on disk."
        ),
    ),
    DatasetSpec(
        name="butterfly",
        classes=("Monarch", "Viceroy"),
        layout=(
            "Monarch (Danaus plexippus) and Viceroy (Limenitis archippus) photos from iNaturalist observations, "
            "downloaded by the user, as root/train/{Monarch,Viceroy}/*.jpg and root/test/{Monarch,Viceroy}/*.jpg."
        ),
    ),
    DatasetSpec(
        name="kermany",
        classes=("DRUSEN", "NORMAL"),
        layout=(
            "Retinal OCT scans of Kermany et al. (2018), the 'OCT2017' release (Mendeley Data 'Large Dataset of "
            "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images'; also mirrored on Kaggle). Unpack it "
            "so that root/train/{CNV,DME,DRUSEN,NORMAL}/*.jpeg and root/test/... exist; DRUSEN and NORMAL are used."
        ),
    ),
    DatasetSpec(
        name="afhq",
        classes=("dog", "cat"),
        layout=(
            "AFHQ (Animal Faces-HQ, from the StarGAN v2 release) as root/train/{cat,dog,wild}/*.jpg and "
            "root/val/{cat,dog,wild}/*.jpg. AFHQ has no 'test' folder: set the evaluation split to 'val' "
            "(eval_split: val) -- split names are never remapped."
        ),
    ),
    DatasetSpec(
        name="kikibouba",
        classes=("kiki", "bouba"),
        layout=(
            "Images of spiky ('kiki') and rounded ('bouba') shapes as root/train/{kiki,bouba}/*.png and "
            "root/test/{kiki,bouba}/*.png (the paper's KikiBouba domain; obtain it from the paper's data release)."
        ),
    ),
    DatasetSpec(
        name="mad_sane",
        classes=("MAD", "SANE"),
        layout=(
            "Black-hole accretion simulation images, magnetically arrested disk (MAD) vs standard and normal "
            "evolution (SANE), stored as .npy arrays (H, W) or (H, W, 1|3) or (1|3, H, W) as "
            "root/train/{MAD,SANE}/*.npy and root/test/{MAD,SANE}/*.npy; each array is min-max scaled per image. "
            "Obtain them from the paper's data release."
        ),
        extensions=(".npy",),
    ),
    DatasetSpec(
        name="celebahq",
        classes=("serious", "smiling"),
        layout=(
            "CelebA-HQ faces split by the 'Smiling' attribute as root/{train,test}/{serious,smiling}/. Build it from "
            "CelebAMask-HQ (the CelebA-HQ-img folder and CelebAMask-HQ-attribute-anno.txt) with "
            "datasets.celebahq.prepare_celebahq(image_dir, attribute_file, root)."
        ),
    ),
    DatasetSpec(
        name="digits",
        classes=tuple(str(d) for d in range(10)),
        layout=(
            "scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, no download), upsampled and written "
            "as grey PNGs root/{train,test}/<digit>/<index>.png by datasets.digits.export_digits(root). For the "
            "offline demo; pick two of the ten classes to edit between."
        ),
        extensions=(".png",),
    ),
)

DATASETS: Dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry called ``name``.

    Raises:
        UnknownDatasetError (a KeyError): no such entry; the message suggests close names and lists all of them.
    """
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, list(DATASETS), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownDatasetError(f"Unknown dataset {name!r}.{hint} Known datasets: {', '.join(DATASETS)}.")


def resolve_classes(
    spec: DatasetSpec, root: PathLike, split: str, classes: Optional[Sequence[str]] = None
) -> List[str]:
    """The class names to use, in label order: ``classes`` when given and non-empty, else the entry's classes, else
    the sorted subfolders of ``root/<split>``. At least one class comes back; editing needs two, which is for the
    caller to check.

    Raises:
        ValueError: ``classes`` has duplicates.
        DatasetLayoutError (a FileNotFoundError): classes had to be discovered and ``root/<split>`` is missing or
            has no subfolders.
    """
    if classes:
        chosen = list(classes)
        duplicates = sorted({c for c in chosen if chosen.count(c) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, got duplicates {duplicates} in {chosen}")
        return chosen
    if spec.classes:
        return list(spec.classes)
    from .folder import DatasetLayoutError, discover_classes  # here, so importing the registry stays torch-free

    found = discover_classes(root, split)
    if not found:
        raise DatasetLayoutError(
            f"No class folders under {os.path.join(root, split)} to take the classes of dataset {spec.name!r} "
            f"from. Create one subfolder per class (root/<split>/<class>/<images>) or list the classes explicitly."
        )
    return found
