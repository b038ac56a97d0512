"""Small helpers shared by the benchmark scripts (timing, model folders). Benchmarks print figures; they are not
tests and assert nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls (seconds), after ``warmup`` untimed ones: the least disturbed figure."""
    import torch

    def sync() -> None:  # CUDA calls return before the work is done
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def weights_bytes(folder: Path) -> int:
    """Bytes of every .safetensors file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def default_model() -> Path:
    """The shipped demo model (assets/mini_digits)."""
    return REPO / "assets" / "mini_digits"


def search_outcomes(mode: str, depths, invert_cost: int = 1, weighted: bool = True):
    """For every possible first flipping index of an ordered t_skip list (mildest first), and none: the attempts a
    ``mode`` search makes and the UNet evaluations it spends, with the run's cost rule (2 evaluations per guided
    sampling step; each inversion step paid once, when an attempt first needs it). ``depths[k]`` = denoising steps of
    the k-th t_skip; ``weighted=False`` gives bisect the plain midpoint splits. Returns a list of (first flip or None,
    attempted indices, evaluations)."""
    from diffusion.config import SearchMode
    from diffusion.edit.search import Search, bisect_plan

    plan = bisect_plan(depths, 2, invert_cost)[0] if mode == "bisect" and weighted else None
    out = []
    for first in [*range(len(depths)), None]:
        s, cost, inverted = Search(SearchMode(mode), len(depths), plan), 0, 0
        while (k := s.next()) is not None:
            cost += 2 * depths[k] + invert_cost * max(0, depths[k] - inverted)
            inverted = max(inverted, depths[k])
            s.record(k, first is not None and k >= first)
        out.append((first, sorted(s.tried), cost))
    return out
