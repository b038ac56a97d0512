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

from diffusion.files import atomic_write_text, make_dirs

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


def read_rows(path: Path) -> List[Dict[str, str]]:
    """Rows of a results CSV; a torn last line (a crash mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        log.warning("%s: dropping an incomplete last line (interrupted write)", path)
        lines = lines[:-1]
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    return [r for r in rows if r.get(COLUMNS[-1]) is not None]


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
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


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
