"""The editing run's results: append-only per-process shards, merged into one ``results.csv``; resumable.

Each process appends finished rows to ``shards/results.<rank>.csv`` (whole lines, flushed and fsynced), so an
interruption loses at most the images in flight. On start, the keys found in every shard and in ``results.csv`` are
skipped. The main process merges all shards into ``results.csv`` (sorted, de-duplicated, written atomically).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from diffusion.errors import ArtefactError
from diffusion.files import atomic_write_text, make_dirs, output_error

log = logging.getLogger(__name__)

COLUMNS: Tuple[str, ...] = (
    "source_path", "source_class", "target_class", "search", "t_skip", "eta", "guidance_scale",
    "oracle_pred_before", "oracle_prob_before", "oracle_prob_after", "flipped", "already_target", "criterion",
    "judge_pred_before", "judge_prob_before", "judge_prob_after", "judge_flipped", "lpips", "l2", "unet_evals",
    "inversion_evals", "attempts", "seed", "seconds", "original_path", "counterfactual_path", "pair_path",
)


def row_key(row: Dict[str, object]) -> Tuple[str, ...]:
    """A row's identity: image, target, eta, and (sweep only) t_skip. Values are compared as their CSV strings."""
    sweep = str(row.get("search")) == "sweep"
    return (str(row["source_path"]), str(row["target_class"]), fmt(float(row["eta"])),
            fmt(float(row["t_skip"])) if sweep else "")


def fmt(value: object) -> str:
    """CSV text of a value: floats with 6 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# Columns without which a results file cannot be read (a row's identity and its verdict); the others may be absent
# in a file written by an older version and read as empty.
REQUIRED_COLUMNS: Tuple[str, ...] = ("source_path", "source_class", "target_class", "search", "t_skip", "eta",
                                     "flipped")
_FLAG_COLUMNS = ("flipped", "already_target", "judge_flipped")
_NUMBER_COLUMNS = ("t_skip", "eta", "guidance_scale", "oracle_prob_before", "oracle_prob_after", "judge_prob_before",
                   "judge_prob_after", "lpips", "l2", "unet_evals", "inversion_evals", "attempts", "seconds")


def read_rows(path: Path) -> List[Dict[str, str]]:
    """Rows of a results CSV (every column of COLUMNS present, missing optional ones as ""); [] for no file.

    A torn last line (no final newline: a crash mid-write) is the only row ever skipped, with a warning. Anything
    else wrong is an error naming the file (and the line): a header without the REQUIRED_COLUMNS, a row with the
    wrong number of cells, a flag that is not 0/1, a number that does not parse.

    Raises:
        ArtefactError: the file is not a readable results file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        log.warning("%s: skipping its last line %d, cut off by an interrupted write: %r", path,
                    text.count("\n") + 1, text[cut:cut + 60])
        text = text[:cut]
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ArtefactError(f"{path}: the header lacks the column(s) {', '.join(missing)} (it has "
                            f"{', '.join(header) or 'none'}); this is not a results.csv of kandinsky_eval.py, or it "
                            "was damaged: restore it or rerun into a fresh output_dir")
    rows = []
    for cells in reader:
        if not cells:
            continue  # a blank line
        if len(cells) != len(header):
            raise ArtefactError(f"{path}, line {reader.line_num}: {len(cells)} cells where the header has "
                                f"{len(header)}; fix or delete that line (a resumed run redoes missing rows)")
        row = {c: "" for c in COLUMNS}
        row.update(zip(header, cells))
        _check_cells(path, reader.line_num, row)
        rows.append(row)
    return rows


def _check_cells(path: Path, line: int, row: Dict[str, str]) -> None:
    for c in _FLAG_COLUMNS:
        if row[c] not in ("", "0", "1"):
            raise ArtefactError(f"{path}, line {line}: {c} = {row[c]!r}, expected 0, 1 or empty; fix or delete that "
                                "line (a resumed run redoes missing rows)")
    for c in _NUMBER_COLUMNS:
        if row[c] != "":
            try:
                float(row[c])
            except ValueError:
                raise ArtefactError(f"{path}, line {line}: {c} = {row[c]!r} is not a number; fix or delete that line "
                                    "(a resumed run redoes missing rows)") from None


class ResultsWriter:
    """Appends rows of one process to its shard; knows which keys are done across all shards."""

    def __init__(self, run_dir: str | Path, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.shard_dir = self.run_dir / "shards"
        make_dirs(self.shard_dir)
        self.path = self.shard_dir / f"results.{rank}.csv"
        self._repair(self.path)

    @staticmethod
    def _repair(path: Path) -> None:
        """Rewrite a shard without its torn last line, so appends start on a fresh line."""
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            rows = read_rows(path)
            _write_csv_atomic(path, rows)

    def done_keys(self) -> Set[Tuple[str, ...]]:
        return self.existing_keys(self.run_dir)

    @staticmethod
    def existing_keys(run_dir: str | Path) -> Set[Tuple[str, ...]]:
        """The keys of every row already in results.csv or a shard of ``run_dir`` (read-only)."""
        run_dir = Path(run_dir)
        keys = {row_key(r) for r in read_rows(run_dir / "results.csv")}
        for shard in sorted((run_dir / "shards").glob("results.*.csv")):
            keys |= {row_key(r) for r in read_rows(shard)}
        return keys

    def append(self, rows: Iterable[Dict[str, object]]) -> None:
        rows = list(rows)
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if not self.path.is_file() or self.path.stat().st_size == 0:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: fmt(row.get(c)) for c in COLUMNS})
        try:
            with open(self.path, "a", newline="") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a full disk or a read-only folder: the rows written before are intact
            raise output_error(self.path, err, "append results to") from err


def _write_csv_atomic(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: fmt(row.get(c)) for c in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def result_sources(run_dir: str | Path) -> List[Path]:
    """results.csv and every shard of a run folder (existing or not)."""
    run_dir = Path(run_dir)
    return [run_dir / "results.csv", *sorted((run_dir / "shards").glob("results.*.csv"))]


def collect_rows(run_dir: str | Path) -> List[Dict[str, str]]:
    """results.csv's rows + every shard's, one row per key, sorted by key (read-only)."""
    by_key: Dict[Tuple[str, ...], Dict[str, str]] = {}
    for source in result_sources(run_dir):
        for row in read_rows(source):
            by_key.setdefault(row_key(row), row)
    return [by_key[k] for k in sorted(by_key)]


def merge_shards(run_dir: str | Path) -> List[Dict[str, str]]:
    """results.csv <- :func:`collect_rows`, written atomically; returns the rows."""
    rows = collect_rows(run_dir)
    _write_csv_atomic(Path(run_dir) / "results.csv", rows)
    return rows
