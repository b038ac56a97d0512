"""Choosing t_skip: the flip criterion, the search state machines and the cost-weighted bisect plan.

Pure Python over tensors of probabilities: no model here. An attempt *meets the criterion* when the oracle's
probability of the target class on the edit is convincing enough (:class:`FlipCriterion`); the searches look for the
mildest t_skip (the smallest edit) that meets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from diffusion.config import FlipAgreement, SearchMode


@dataclass(frozen=True)
class FlipCriterion:
    """When an edit counts as having reached the target class.

    ``threshold`` None: the oracle's argmax is the target (the paper's rule). A number p in (0, 1): the ensemble's
    probability of the target class is at least p. ``agreement`` all: every member must meet the same rule too, so
    an edit that convinces one weak member and not the others does not count. Non-finite probabilities never meet
    it (a NaN edit is not a flip).
    """

    threshold: Optional[float] = None
    agreement: FlipAgreement = FlipAgreement.mean

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"flip_threshold must lie strictly between 0 and 1, got {self.threshold}")

    @property
    def needs_members(self) -> bool:
        return self.agreement == FlipAgreement.all

    def _meets(self, probs: torch.Tensor, target: int) -> torch.Tensor:
        """probs (..., K) -> (...) bool."""
        if self.threshold is None:
            ok = probs.argmax(-1) == target
        else:
            ok = probs[..., target] >= self.threshold
        return ok & torch.isfinite(probs).all(-1)

    def met(self, probs: torch.Tensor, target: int, member_probs: Optional[torch.Tensor] = None) -> bool:
        """Whether an edit with ensemble probabilities ``probs`` (K,) and per-member ``member_probs`` (M, K) meets
        the criterion for class index ``target``."""
        ok = bool(self._meets(probs, target))
        if self.needs_members:
            if member_probs is None:
                raise ValueError("flip_agreement: all needs the oracle's per-member probabilities")
            ok = ok and bool(self._meets(member_probs, target).all())
        return ok

    def describe(self) -> str:
        rule = "argmax" if self.threshold is None else f"p>={self.threshold:g}"
        return rule + (" (all members)" if self.needs_members else "")


def bisect_plan(depths: Sequence[int], sample_cost: int = 2,
                invert_cost: int = 1) -> Tuple[Dict[Tuple[int, int], int], int, float]:
    """The binary search over ordered t_skips that spends the fewest UNet evaluations on average.

    ``depths[k]`` is the number of denoising steps of the k-th t_skip (mildest first, non-decreasing). An attempt at k
    costs ``sample_cost * depths[k]`` (two branches with guidance) plus the inversion steps not computed yet
    (``invert_cost`` per step, see :class:`Inversion`). While no attempt has flipped, the inversion is as deep as the
    strongest attempt so far, the one just below the open interval; once one has flipped, every candidate left is
    milder and its inversion is paid for.

    Among all binary search trees over the list (every one of them finds the first flipping index when flipping is
    monotone) it picks the one with the least mean cost over the n + 1 possible answers (first flip at 0..n-1, or
    none), each counted once, ties broken by the smaller worst case; the plain midpoint search is one of those trees,
    so the mean is never above the midpoint's. When deeper edits cost more, the splits lean towards the cheap mild end
    (on the demo's list an image that flips at the mildest t_skip costs one attempt, as with first_flip, instead of
    three); with equal costs it is the midpoint search. Exact dynamic programme, O(n^3) once per run.

    Returns ({(lo, hi): index to try} for every open interval [lo, hi] (hi = n: no flip seen yet), worst-case
    evaluations, mean evaluations).
    """
    n = len(depths)
    if any(b < a for a, b in zip(depths, depths[1:])) or any(d < 0 for d in depths):
        raise ValueError(f"depths must be non-negative and non-decreasing (mildest first), got {list(depths)}")
    best: Dict[Tuple[int, int], Tuple[int, int]] = {(k, k): (0, 0) for k in range(n + 1)}  # (total, worst)
    split: Dict[Tuple[int, int], int] = {}
    for size in range(1, n + 1):
        for lo in range(0, n + 1 - size):
            hi = lo + size
            base = depths[lo - 1] if lo > 0 else 0  # the inversion depth while nothing has flipped
            choice = None
            for m in range(lo, hi):
                cost = sample_cost * depths[m] + (invert_cost * max(0, depths[m] - base) if hi == n else 0)
                (tot_l, worst_l), (tot_r, worst_r) = best[(lo, m)], best[(m + 1, hi)]
                key = (cost * (hi - lo + 1) + tot_l + tot_r, cost + max(worst_l, worst_r))  # answers: lo..hi
                if choice is None or key < choice[0]:
                    choice = (key, m)
            best[(lo, hi)], split[(lo, hi)] = choice
    total, worst = best[(0, n)]
    return split, worst, total / (n + 1)


class Search:
    """Which t_skip to try next for one (image, eta), given what was tried; ``t_skips`` ordered mildest first.

    first_flip: linear, stop at the first flip (the paper's). bisect: binary search for the first flipping index,
    valid when flipping is monotone in edit strength; ``plan`` (from :func:`bisect_plan`) picks each split by UNet
    cost, else the midpoint.
    """

    def __init__(self, mode: SearchMode, n: int, plan: Optional[Dict[Tuple[int, int], int]] = None):
        self.mode, self.n, self.plan = mode, n, plan
        self.lo, self.hi = 0, n  # the first flipping index lies in [lo, hi]; hi = n: none known yet
        self.tried: Dict[int, bool] = {}

    def next(self) -> Optional[int]:
        if self.mode == SearchMode.first_flip:
            if any(self.tried.values()) or len(self.tried) == self.n:
                return None
            return len(self.tried)
        if self.lo >= self.hi:
            return None
        if self.plan is not None:
            return self.plan[(self.lo, self.hi)]
        return (self.lo + self.hi) // 2

    def record(self, index: int, flipped: bool) -> None:
        self.tried[index] = flipped
        if flipped:
            self.hi = index
        else:
            self.lo = index + 1

    def chosen(self) -> int:
        """The first flipping index found, else the strongest edit tried."""
        flips = [i for i, f in self.tried.items() if f]
        return min(flips) if flips else max(self.tried)


