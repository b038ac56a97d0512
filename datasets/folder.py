"""The on-disk layout ``root/<split>/<class>/<files>``: listing files, labelled records, and a torch Dataset.

Split names (train, test, val, ...) are whatever the caller passes; nothing here maps one onto another.
Every listing is sorted by file name, so the same folder always gives the same records in the same order,
and a per-class cap (``num_samples``) always keeps the same files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Literal, Mapping, Optional, Sequence

from torch.utils.data import Dataset, default_collate

from .images import IMAGE_EXTENSIONS, BadImageError, PathLike, load_image, resize

logger = logging.getLogger(__name__)

OnBadFile = Literal["error", "skip"]
_SHOW = 8  # how many names an error message lists before "... and N more"


class DatasetLayoutError(FileNotFoundError):
    """A folder or file that the ``root/<split>/<class>/<files>`` layout needs is missing or empty.

    The message says what was expected, what was found instead, and what to do.
    """


class FileListError(ValueError):
    """A line of a file list that cannot name an image of the class folder; the message names the list and line."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image file: ``label`` is the index of ``class_name`` in the class list it was built with."""

    path: Path
    label: int
    class_name: str


def discover_classes(root: PathLike, split: str) -> List[str]:
    """The class names of ``root/<split>``: its subfolder names, sorted, hidden ones (``.name``) left out.

    Raises:
        DatasetLayoutError: ``root`` or ``root/<split>`` does not exist.
    """
    return sorted(p.name for p in _visible(_split_dir(root, split)) if p.is_dir())


def list_class_files(
    root: PathLike,
    split: str,
    class_name: str,
    num_samples: Optional[int] = None,
    file_list: Optional[PathLike] = None,
    *,
    extensions: Optional[Iterable[str]] = None,
) -> List[Path]:
    """The image files of ``root/<split>/<class_name>``, in a deterministic order, capped at ``num_samples``.

    Without ``file_list``: every visible file whose extension is in ``extensions`` (default
    :data:`~datasets.images.IMAGE_EXTENSIONS`, case-insensitive), sorted by file name. With ``file_list``: the files
    named in that text file, in its order -- one bare file name per line (relative to the class folder), blank lines
    and lines starting with ``#`` ignored; a repeated name is kept once. The first ``num_samples`` are returned (all
    when None or when fewer exist).

    Raises:
        DatasetLayoutError: the split or class folder is missing or holds no image files, or the file list or
            some of the names in it do not exist (the message lists them).
        ValueError: ``num_samples`` < 1.
        FileListError: a file list line is not a bare image file name.
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples}")
    class_dir = _class_dir(root, split, class_name)
    allowed = _normalise_extensions(extensions)
    if file_list is not None:
        files = _files_from_list(Path(file_list), class_dir, allowed)
    else:
        files = sorted((p for p in _visible(class_dir) if p.is_file() and p.suffix.lower() in allowed),
                       key=lambda p: p.name)
        if not files:
            raise DatasetLayoutError(_empty_class_message(class_dir, allowed))
    if num_samples is not None and num_samples > len(files):
        logger.warning("%s: asked for %d images, only %d available; using all of them", class_dir, num_samples,
                       len(files))
    return files[:num_samples]


def build_records(
    root: PathLike,
    split: str,
    classes: Sequence[str],
    num_samples: Optional[int] = None,
    file_lists: Optional[Mapping[str, PathLike]] = None,
    *,
    extensions: Optional[Iterable[str]] = None,
) -> List[ImageRecord]:
    """Labelled records for ``classes`` (label = index in ``classes``), class by class, each list as
    :func:`list_class_files` gives it. ``num_samples`` caps each class; ``file_lists`` maps a class name to its
    file list (classes without one use their whole folder). Any number of classes (one or more) works.

    Raises:
        ValueError: ``classes`` is empty or has duplicates, or ``file_lists`` names a class not in ``classes``.
        DatasetLayoutError: as :func:`list_class_files`.
    """
    classes = list(classes)
    if not classes:
        raise ValueError(f"build_records needs at least one class name for {Path(root) / split}")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"class names must be unique, got duplicates {duplicates} in {classes}")
    file_lists = dict(file_lists or {})
    unknown = sorted(set(file_lists) - set(classes))
    if unknown:
        raise ValueError(f"file_lists names classes {unknown} that are not among the classes {classes}")
    records = []
    for label, class_name in enumerate(classes):
        files = list_class_files(root, split, class_name, num_samples, file_lists.get(class_name),
                                 extensions=extensions)
        records.extend(ImageRecord(path=p, label=label, class_name=class_name) for p in files)
    return records


class ImageRecordDataset(Dataset):
    """Records -> dicts of ``pixel_values`` (3, size, size) float32 in [0, 1], ``label``, ``index``, ``path``.

    Each image is loaded with :func:`~datasets.images.load_image` (transparency over ``background``) and squeezed
    to ``size`` x ``size`` with :func:`~datasets.images.resize`. ``index`` is the position in ``records``, so
    results can be matched back to files. With ``on_bad_file="skip"`` a file that cannot be read gives None (and a
    warning naming it): use :func:`collate_skip_bad` as the DataLoader's ``collate_fn``. With ``"error"`` the
    :class:`~datasets.images.BadImageError` propagates.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        size: int,
        background: Sequence[int] = (255, 255, 255),
        on_bad_file: OnBadFile = "error",
    ) -> None:
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.records = list(records)
        self.size = int(size)
        self.background = tuple(int(v) for v in background)
        self.skip_bad_files = on_bad_file == "skip"  # also true for a str-valued enum member "skip"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        record = self.records[index]
        try:
            image = load_image(record.path, background=self.background)
        except BadImageError as err:
            if not self.skip_bad_files:
                raise
            logger.warning("Skipping bad image %s: %s", record.path, err)
            return None
        return {
            "pixel_values": resize(image, self.size),  # (3, size, size)
            "label": record.label,
            "index": index,
            "path": str(record.path),
        }


def collate_skip_bad(batch: Sequence[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """DataLoader ``collate_fn`` for :class:`ImageRecordDataset` with ``on_bad_file="skip"``: drops the None items
    left by bad files and stacks the rest (``pixel_values`` (B, 3, size, size), ``label`` and ``index`` (B,) int64,
    ``path`` a list of str). Returns None when every item of the batch was bad, so loops must skip None batches.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


@contextlib.contextmanager
def staging_directory(out_root: PathLike) -> Iterator[Path]:
    """Build a folder tree in a fresh temporary folder beside ``out_root`` and rename it to ``out_root`` on success.

    A crash or an exception inside the ``with`` block removes the temporary folder, so ``out_root`` either does
    not exist or is complete. The final rename fails with ``OSError`` if ``out_root`` exists by then (for example
    another process finished first); the temporary folder is removed in that case too.
    """
    out_root = Path(out_root)
    out_root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.partial-", dir=out_root.parent))
    try:
        yield staging
        os.rename(staging, out_root)  # atomic on one filesystem; refuses to replace a non-empty folder
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _visible(folder: Path) -> List[Path]:
    """Entries of ``folder`` whose names do not start with a dot (dotfiles, macOS ``._x`` forks, ``.ipynb_checkpoints``)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _split_dir(root: PathLike, split: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"Dataset root {root} is not a folder. Point the data root at the folder that holds the split folders "
            f"(root/<split>/<class>/<images>)."
        )
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in _visible(root) if p.is_dir())
        raise DatasetLayoutError(
            f"No split folder {split_dir}. Split folders found under {root}: {_listing(found)}. "
            f"Split names are used exactly as given (nothing maps 'test' to 'val'): pass one of the folders found, "
            f"or arrange the data as root/<split>/<class>/<images>."
        )
    return split_dir


def _class_dir(root: PathLike, split: str, class_name: str) -> Path:
    split_dir = _split_dir(root, split)
    class_dir = split_dir / class_name
    if not class_dir.is_dir():
        found = sorted(p.name for p in _visible(split_dir) if p.is_dir())
        raise DatasetLayoutError(
            f"No class folder {class_dir}. Class folders found under {split_dir}: {_listing(found)}. "
            f"Class names are case-sensitive folder names: fix the class list or add the folder."
        )
    return class_dir


def _empty_class_message(class_dir: Path, allowed: frozenset[str]) -> str:
    entries = sorted(p.name for p in _visible(class_dir))
    suffixes = sorted({Path(n).suffix.lower() or "(none)" for n in entries if (class_dir / n).is_file()})
    subfolders = [n for n in entries if (class_dir / n).is_dir()]
    return (
        f"Class folder {class_dir} holds no image files: found {len(entries)} visible entries "
        f"({len(subfolders)} subfolders{', e.g. ' + _listing(subfolders) if subfolders else ''}; "
        f"file extensions {_listing(suffixes)}). Images must sit directly in the class folder with one of the "
        f"extensions {_listing(sorted(allowed))}; broken symbolic links count as missing."
    )


def _files_from_list(list_path: Path, class_dir: Path, allowed: frozenset[str]) -> List[Path]:
    """The files a file list names, in its order, checked to exist in ``class_dir``."""
    if not list_path.is_file():
        raise DatasetLayoutError(f"File list {list_path} does not exist. Fix the path, or drop it to use every "
                                 f"image in {class_dir}.")
    names: List[str] = []
    for line_number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        where = f"{list_path}, line {line_number}: {name!r}"
        if "/" in name or "\\" in name or name in (".", ".."):
            raise FileListError(f"{where} is not a bare file name. A file list names files inside the class folder "
                             f"{class_dir}, one name per line, without folders.")
        if Path(name).suffix.lower() not in allowed:
            raise FileListError(f"{where} does not end in an image extension ({_listing(sorted(allowed))}).")
        if name in names:
            logger.warning("%s repeats an earlier line; keeping the first", where)
            continue
        names.append(name)
    if not names:
        raise DatasetLayoutError(f"File list {list_path} names no files (only blank lines or # comments). "
                                 f"Add one file name per line, or drop the list to use every image in {class_dir}.")
    missing = [n for n in names if not (class_dir / n).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"File list {list_path} names {len(missing)} of {len(names)} files that are not in {class_dir}: "
            f"{_listing(missing)}. Fix the names (they are case-sensitive, relative to the class folder) or the "
            f"list's split/class."
        )
    return [class_dir / n for n in names]


def _normalise_extensions(extensions: Optional[Iterable[str]]) -> frozenset[str]:
    """Lower-cased extensions with a leading dot; None -> every supported image extension."""
    if extensions is None:
        return IMAGE_EXTENSIONS
    normalised = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not normalised:
        raise ValueError("extensions must name at least one file extension, or be None for all image types")
    return normalised


def _listing(names: Sequence[str]) -> str:
    """'[a, b, c]' for short lists, '[a, ..., h] ... and 12 more' for long ones, '(none)' for empty ones."""
    if not names:
        return "(none)"
    shown = ", ".join(names[:_SHOW])
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f"[{shown}]{more}"
