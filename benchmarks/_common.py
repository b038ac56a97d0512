"""Small helpers shared by the benchmark scripts (timing, model folders). Benchmarks print figures; they are not
tests and assert nothing."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls (seconds), after ``warmup`` untimed ones: the least disturbed figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weights_bytes(folder: Path) -> int:
    """Bytes of every .safetensors file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def default_model() -> Path:
    """The shipped demo model (assets/mini_digits)."""
    return REPO / "assets" / "mini_digits"
