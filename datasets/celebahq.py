"""Build the ``celebahq`` domain (serious vs smiling faces) from CelebA-HQ images and their attribute file.

The attribute file is CelebAMask-HQ's ``CelebAMask-HQ-attribute-anno.txt``: line 1 the number of images, line 2 the
attribute names, then one line per image, ``<file name> <v1> <v2> ...`` with values 1 (has it) or -1 (has not).
"""

from __future__ import annotations

import difflib
import logging
import shutil
from pathlib import Path
from typing import Dict, List

from .folder import staging_directory
from .images import PathLike

logger = logging.getLogger(__name__)

SMILING_COLUMN = "Smiling"
CLASS_BY_VALUE = {-1: "serious", 1: "smiling"}
_SHOW = 5  # missing image names listed in an error before "... and N more"


def read_attribute_column(attribute_file: PathLike, column: str) -> Dict[str, int]:
    """``{image file name: value}`` (1 or -1) of one attribute column of a CelebA(-HQ) attribute file.

    Raises:
        FileNotFoundError: the attribute file does not exist.
        ValueError: the file is malformed (the message names the line), or has no column ``column`` (the message
            lists the columns it has).
    """
    attribute_file = Path(attribute_file)
    if not attribute_file.is_file():
        raise FileNotFoundError(f"Attribute file {attribute_file} does not exist. Pass the path of "
                                f"CelebAMask-HQ-attribute-anno.txt from the CelebAMask-HQ download.")
    lines = attribute_file.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{attribute_file} is not a CelebA attribute file: line 1 must be the number of images "
                         f"and line 2 the attribute names.")
    names = lines[1].split()
    if column not in names:
        close = difflib.get_close_matches(column, names, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"{attribute_file} has no {column!r} column{hint}. Its columns (line 2): {', '.join(names)}.")
    position = names.index(column)
    values: Dict[str, int] = {}
    for line_number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise ValueError(f"{attribute_file}, line {line_number}: expected a file name and {len(names)} values, "
                             f"got {len(fields)} fields. The file may be damaged; download it again.")
        image_name, value = fields[0], fields[1 + position]
        if value not in ("1", "-1"):
            raise ValueError(f"{attribute_file}, line {line_number}: {column} = {value!r}, expected 1 or -1.")
        if image_name in values:
            raise ValueError(f"{attribute_file}, line {line_number}: {image_name} is listed twice.")
        values[image_name] = int(value)
    expected = int(lines[0])
    if len(values) != expected:
        raise ValueError(f"{attribute_file} announces {expected} images on line 1 but lists {len(values)}. "
                         f"The file may be truncated; download it again.")
    return values


def prepare_celebahq(
    image_dir: PathLike,
    attribute_file: PathLike,
    out_root: PathLike,
    test_fraction: float = 0.1,
    link: bool = True,
) -> Path:
    """Write ``out_root/{train,test}/{serious,smiling}/<image>`` from the attribute file's ``Smiling`` column.

    Within each class the images are sorted by file name (string order) and the last ``test_fraction`` of them (at
    least one) go to ``test``, so the split is the same on every machine. Files are symbolic links to the images
    (absolute paths) with ``link=True``, copies otherwise. The tree is built in a temporary folder and renamed into
    place, so an interrupted run leaves nothing behind; if ``out_root`` already holds exactly this split, nothing
    is done. Returns ``out_root``.

    Raises:
        ValueError: ``test_fraction`` is not in (0, 1), a class has fewer than two images, or the attribute file is
            malformed or lacks the ``Smiling`` column.
        FileNotFoundError: ``image_dir``, the attribute file or some of the images it lists are missing.
        FileExistsError: ``out_root`` exists and holds something other than this split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    image_dir, out_root = Path(image_dir), Path(out_root)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"CelebA-HQ image folder {image_dir} does not exist. Pass the CelebA-HQ-img folder "
                                f"of the CelebAMask-HQ download.")
    smiling = read_attribute_column(attribute_file, SMILING_COLUMN)
    _check_images_exist(image_dir, sorted(smiling), attribute_file)
    plan = _plan_split(smiling, test_fraction)  # relative output path -> image name
    if _is_complete(out_root, plan):
        logger.info("%s already holds the CelebA-HQ serious/smiling split; nothing to do", out_root)
        return out_root
    if out_root.exists() and any(out_root.iterdir()):
        raise FileExistsError(f"{out_root} exists but does not hold this split (test_fraction={test_fraction}). "
                              f"Delete it, or choose another output folder.")
    with staging_directory(out_root) as staging:
        for relative, image_name in plan.items():
            _place(image_dir.resolve() / image_name, staging / relative, link)
    logger.info("Wrote %d CelebA-HQ images (%s) to %s", len(plan), "links" if link else "copies", out_root)
    return out_root


def _check_images_exist(image_dir: Path, names: List[str], attribute_file: PathLike) -> None:
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:_SHOW]) + (f" ... and {len(missing) - _SHOW} more" if len(missing) > _SHOW else "")
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} images listed in {attribute_file} are not in {image_dir}: {shown}. "
            f"Check that the image folder is the complete CelebA-HQ-img folder matching this attribute file."
        )


def _plan_split(labels: Dict[str, int], test_fraction: float) -> Dict[str, str]:
    """``{"<split>/<class>/<name>": name}``: per class, the last ``test_fraction`` of the sorted names are test."""
    plan: Dict[str, str] = {}
    for value, class_name in CLASS_BY_VALUE.items():
        names = sorted(n for n, v in labels.items() if v == value)
        if len(names) < 2:
            raise ValueError(f"Class {class_name!r} ({SMILING_COLUMN} = {value}) has {len(names)} images; a train "
                             f"and a test split need at least two.")
        num_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
        for index, name in enumerate(names):
            split = "test" if index >= len(names) - num_test else "train"
            plan[f"{split}/{class_name}/{name}"] = name
    return plan


def _is_complete(out_root: Path, plan: Dict[str, str]) -> bool:
    return out_root.is_dir() and all((out_root / relative).is_file() for relative in plan)


def _place(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not link:
        shutil.copy2(source, target)
        return
    try:
        target.symlink_to(source)
    except OSError as err:
        raise OSError(f"Cannot create the symbolic link {target} -> {source} ({err}). On file systems without "
                      f"symbolic links, call prepare_celebahq(..., link=False) to copy the images.") from err
