"""One batch of images through encode -> invert -> t_skip search -> decode, and the Oracle protocol.

For every image (with its source embedding e and the class means mu_s, mu_t) and every eta:
  1. w_0 = MoVQ(x); ws, zs = edit-friendly inversion (once per image, shared by all its attempts and etas);
  2. e' = ||e|| (e/||e|| + eta (mu_t - mu_s));
  3. for t_skip chosen by the search: sample from ws[T_skip] with zs and CFG g between c_0 and e'; decode.
Attempts of different images, etas and t_skips share one UNet batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from diffusion.config import EditConfig, InversionCond, SearchMode
from diffusion.embeddings import edit_embedding
from diffusion.inversion import (
    Schedule, cfg_eps, draw_forward_noise, edit_friendly_noise_maps, forward_noise, make_schedule, sample, step_index,
)
from diffusion.models import Decoder

log = logging.getLogger(__name__)


class Oracle(Protocol):
    """Anything that maps images to class probabilities; ``classes`` names the columns."""

    classes: Sequence[str]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, len(classes)) probabilities."""
        ...


def ddpm_schedule(scheduler, num_inference_steps: int) -> Schedule:
    """The decoder scheduler's T-step spacing (its own ``timestep_spacing`` / ``steps_offset``) and alphas_cumprod.

    After the last step a_{t'} = alphas_cumprod[0] (one more step down to t = 0): sigma stays > 0 there, so the
    stored noise maps reconstruct w_0 exactly.
    """
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    return make_schedule(sched.alphas_cumprod, sched.timesteps, final_alpha=float(sched.alphas_cumprod[0]))


@dataclass
class Inversion:
    """Edit-friendly inversion of a batch, computed lazily: sampling from schedule index s needs the noise maps of
    steps s..T-1 only, so :meth:`ensure` computes them the first time an attempt starts that deep. A search that stops
    at a mild t_skip never pays for the strong ones; the maps it does compute are the ones a full inversion would give
    (each z_t depends on its own w_t alone)."""

    ws: torch.Tensor  # (T + 1, U, C, h, w), U source images
    zs: torch.Tensor  # (T, U, C, h, w); valid for steps >= ready[u]
    ready: torch.Tensor  # (U,) long: the noise maps of image u are computed for schedule indices >= ready[u]
    counter: torch.Tensor  # (U,) long: UNet evaluations spent on each image's inversion so far
    compute: Optional[Callable[["Inversion", List[tuple[int, int]]], None]] = None  # fills zs for (step, image)
    source_of: Optional[torch.Tensor] = None  # (B,) long: the image of each edit item (None: item b is image b)

    @classmethod
    def complete(cls, ws: torch.Tensor, zs: torch.Tensor) -> "Inversion":
        """An inversion whose noise maps are all given (e.g. fresh noise for an SDEdit baseline)."""
        B = ws.shape[1]
        return cls(ws=ws, zs=zs, ready=torch.zeros(B, dtype=torch.long), counter=torch.zeros(B, dtype=torch.long))

    def images_of(self, items: torch.Tensor) -> torch.Tensor:
        """The inverted image (index into ws / zs) of each edit item."""
        items = items.long().cpu()
        return items if self.source_of is None else self.source_of[items]

    @property
    def evals(self) -> torch.Tensor:
        """UNet evaluations spent so far on the inversion of each item's image, (B,) (items of one image share it)."""
        items = torch.arange(len(self.counter) if self.source_of is None else len(self.source_of))
        return self.counter[self.images_of(items)].clone()

    def ensure(self, starts: torch.Tensor, image_of_row: torch.Tensor) -> None:
        """Compute the noise maps that sampling rows starting at ``starts`` (A,) of images ``image_of_row`` (indices
        into ws / zs, see :meth:`images_of`) need."""
        need = self.ready.clone()
        for s, b in zip(starts.tolist(), image_of_row.tolist()):
            need[b] = min(int(need[b]), int(s))
        todo = [(i, b) for b in range(len(need)) for i in range(int(need[b]), int(self.ready[b]))]
        if not todo:
            return
        if self.compute is None:
            raise ValueError("this inversion has no network to compute missing noise maps with")
        todo.sort(key=lambda p: (-p[0], p[1]))  # mildest steps first, images side by side in one batch
        self.compute(self, todo)
        self.ready = torch.minimum(self.ready, need)


@dataclass
class Attempt:
    image: int  # the edit item's index in the batch (an image and a target class; see Editor.edit)
    eta: float
    t_skip: float
    latent: Optional[torch.Tensor] = None
    picture: Optional[torch.Tensor] = None  # decoded, (3, H, W) in [0, 1]
    probs: Optional[torch.Tensor] = None  # oracle probabilities (K,)
    evals: int = 0


@dataclass
class EditOutcome:
    """The chosen edit of one (image, eta), with every attempt that led to it."""

    image: int
    eta: float
    chosen: Attempt
    attempts: List[Attempt] = field(default_factory=list)
    flipped: Optional[bool] = None

    @property
    def sampling_evals(self) -> int:
        return sum(a.evals for a in self.attempts)


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


class Editor:
    """Holds the decoder, the schedule, c_0 and the oracle for a run; edits batches of images."""

    def __init__(self, decoder: Decoder, cfg: EditConfig, null_embed: torch.Tensor, oracle: Optional[Oracle] = None):
        self.decoder, self.cfg, self.oracle = decoder, cfg, oracle
        self.schedule = ddpm_schedule(decoder.scheduler, cfg.num_inference_steps)
        self.c0 = null_embed.float().reshape(1, -1)
        self.t_skips = sorted(cfg.t_skips, reverse=True)  # mildest first
        if list(cfg.t_skips) != self.t_skips:
            log.info("t_skips reordered mildest first: %s", self.t_skips)
        self.bisect_plan = None  # the cost-weighted splits of search: bisect, the same for every batch of the run
        if cfg.search == SearchMode.bisect:
            depths = [self.schedule.T - step_index(self.schedule, t) for t in self.t_skips]
            self.bisect_plan = bisect_plan(depths, 2, 1 if cfg.inversion == InversionCond.null else 2)[0]

    # --- network calls ------------------------------------------------------------------------------------------
    def _eps_fn(self, cond: torch.Tensor, guidance: Optional[float], counter: torch.Tensor):
        """eps_fn for inversion/sampling: ``cond`` (R, D) per row; CFG against c_0 when ``guidance`` is set.
        ``counter[r]`` accumulates the UNet evaluations spent on row r."""
        ts = self.schedule.timesteps

        def fn(w: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            t = ts[steps].to(self.decoder.device)
            if guidance is None:
                counter.index_add_(0, rows, torch.ones(len(rows), dtype=counter.dtype))
                return self.decoder.eps(w, t, cond[rows]).to(w.device)
            n = len(rows)
            counter.index_add_(0, rows, torch.full((n,), 2, dtype=counter.dtype))
            embeds = torch.cat([self.c0.expand(n, -1), cond[rows]])
            eps = self.decoder.eps(torch.cat([w, w]), torch.cat([t, t]), embeds).to(w.device)
            return cfg_eps(eps[:n], eps[n:], guidance)

        return fn

    def invert(self, w0: torch.Tensor, e_src: torch.Tensor, generators: Sequence[torch.Generator],
               source_of: Optional[torch.Tensor] = None) -> Inversion:
        """Edit-friendly inversion of a batch: independent forward noise per step (per-image generators); the noise
        maps under c_inv (null embedding, no CFG; or CFG on the image's own e at inversion_guidance) are computed on
        demand by :meth:`Inversion.ensure` (:meth:`run_attempts` calls it). w0 (U, C, h, w), e_src (U, D) and
        ``generators`` are per image; ``source_of`` maps edit items to images when an image has several targets."""
        B = w0.shape[0]
        noise = draw_forward_noise(w0.shape[1:], self.schedule.T, generators, device=w0.device)
        ws = forward_noise(w0, self.schedule, noise)
        counter = torch.zeros(B, dtype=torch.long)
        if self.cfg.inversion == InversionCond.null:
            fn = self._eps_fn(self.c0.expand(B, -1), None, counter)
        else:
            fn = self._eps_fn(e_src.float(), self.cfg.inversion_guidance, counter)
        chunk = max(1, self.cfg.batch_size * 2)

        def compute(inv: Inversion, steps: List[tuple[int, int]]) -> None:
            edit_friendly_noise_maps(inv.ws, self.schedule, fn, chunk_size=chunk, steps=steps, zs=inv.zs)

        T = self.schedule.T
        return Inversion(ws=ws, zs=torch.zeros_like(ws[:T]), ready=torch.full((B,), T, dtype=torch.long),
                         counter=counter, compute=compute, source_of=source_of)

    def run_attempts(self, inv: Inversion, attempts: List[Attempt], e_edit: torch.Tensor) -> None:
        """Sample, decode and (with an oracle) classify a list of attempts in one batch; fills them in place."""
        starts = torch.tensor([step_index(self.schedule, a.t_skip) for a in attempts])
        image_of_row = inv.images_of(torch.tensor([a.image for a in attempts]))
        inv.ensure(starts, image_of_row)
        counter = torch.zeros(len(attempts), dtype=torch.long)
        fn = self._eps_fn(e_edit, self.cfg.guidance_scale, counter)
        latents = sample(inv.ws, inv.zs, self.schedule, starts, fn, image_of_row=image_of_row)
        pictures = self.decode(latents)
        probs = self.oracle(pictures).float().cpu() if self.oracle is not None else None
        for k, a in enumerate(attempts):
            a.latent, a.picture, a.evals = latents[k], pictures[k], int(counter[k])
            a.probs = probs[k] if probs is not None else None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = [self.decoder.decode(latents[i:i + self.cfg.batch_size]).cpu()
               for i in range(0, len(latents), self.cfg.batch_size)]
        return torch.cat(out)

    # --- the search -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def edit(self, images: torch.Tensor, e_src: torch.Tensor, mu_src: torch.Tensor, mu_tgt: torch.Tensor,
             target_index: Sequence[int], generators: Sequence[torch.Generator],
             pred_before: Optional[torch.Tensor] = None,
             source_of: Optional[Sequence[int]] = None) -> tuple[Inversion, List[EditOutcome]]:
        """Edit a batch of B items (an image and a target class each) made of U distinct images.

        images (U, 3, H, W) in [0, 1] and ``generators`` (U) are per image; per item: e_src (B, D) the source
        embedding, mu_src / mu_tgt (B, D) the class means, ``target_index`` the oracle column of the target class,
        ``pred_before`` the oracle's argmax on the original; ``source_of`` (B) the image of each item (default: item b
        is image b, U = B). An image with several targets is encoded and inverted once for all of them. Returns the
        inversion and one outcome per (item, eta)."""
        U = images.shape[0]
        source = torch.arange(U) if source_of is None else torch.as_tensor(list(source_of), dtype=torch.long)
        if source.numel() != e_src.shape[0] or (source.numel() and (source.min() < 0 or source.max() >= U)):
            raise ValueError(f"source_of must give each of the {e_src.shape[0]} items an image in 0..{U - 1}")
        first_item = {int(u): b for b, u in reversed(list(enumerate(source.tolist())))}
        if len(first_item) != U:
            raise ValueError("every image must belong to at least one item")
        w0 = self.decoder.encode(images)
        inv = self.invert(w0, e_src[[first_item[u] for u in range(U)]], generators,
                          None if source_of is None else source)
        etas = list(self.cfg.eta)
        tasks = [(b, eta) for b in range(source.numel()) for eta in etas]
        e_edit = {(b, eta): edit_embedding(e_src[b:b + 1], mu_src[b], mu_tgt[b], eta)[0] for b, eta in tasks}
        mode = self.cfg.search
        if mode == SearchMode.fixed:
            plan = {task: [self.cfg.t_skip] for task in tasks}
        elif mode == SearchMode.sweep:
            plan = {task: list(self.t_skips) for task in tasks}
        else:
            plan = None
        outcomes: List[EditOutcome] = []
        if plan is not None:  # everything known up front: one batch of attempts
            attempts = [Attempt(b, eta, t) for (b, eta) in tasks for t in plan[(b, eta)]]
            self._run(inv, attempts, e_edit)
            for a in attempts:
                outcome = EditOutcome(a.image, a.eta, chosen=a, attempts=[a])
                outcome.flipped = self._flipped(a, target_index, pred_before)
                outcomes.append(outcome)
            return inv, outcomes
        if self.oracle is None:
            raise ValueError(f"search: {mode.value} needs an oracle (set oracle_dir) or use search: fixed")
        searches = {task: Search(mode, len(self.t_skips), self.bisect_plan) for task in tasks}
        tried: Dict[tuple, Dict[int, Attempt]] = {task: {} for task in tasks}
        while True:
            round_ = [(task, s.next()) for task, s in searches.items() if s.next() is not None]
            if not round_:
                break
            attempts = [Attempt(b, eta, self.t_skips[k]) for (b, eta), k in round_]
            self._run(inv, attempts, e_edit)
            for ((task, k), a) in zip(round_, attempts):
                tried[task][k] = a
                searches[task].record(k, self._differs(a, pred_before))
        for task in tasks:
            chosen = tried[task][searches[task].chosen()]
            outcome = EditOutcome(task[0], task[1], chosen=chosen, attempts=list(tried[task].values()))
            outcome.flipped = self._flipped(chosen, target_index, pred_before)
            outcomes.append(outcome)
        return inv, outcomes

    @torch.inference_mode()
    def interpolate(self, inv: Inversion, e_src: torch.Tensor, mu_src: torch.Tensor, mu_tgt: torch.Tensor,
                    etas: Sequence[float], t_skip: float) -> List[Attempt]:
        """An interpolation strip per image: e' at every eta in ``etas`` (eta 0 = the image re-sampled, negative =
        away from the target), all at one t_skip, reusing the inversion, all images and etas in one batch."""
        attempts = [Attempt(b, float(eta), t_skip) for b in range(e_src.shape[0]) for eta in etas]
        cond = torch.stack([edit_embedding(e_src[a.image:a.image + 1], mu_src[a.image], mu_tgt[a.image], a.eta)[0]
                            for a in attempts])
        self.run_attempts(inv, attempts, cond)
        return attempts

    def _run(self, inv: Inversion, attempts: List[Attempt], e_edit: Dict[tuple, torch.Tensor]) -> None:
        """All attempts of a round in one sampling batch (2 UNet rows each, for the two guidance branches)."""
        self.run_attempts(inv, attempts, torch.stack([e_edit[(a.image, a.eta)] for a in attempts]))

    @staticmethod
    def _differs(a: Attempt, pred_before: Optional[torch.Tensor]) -> bool:
        """The search's flip: the oracle's prediction on the edit differs from its prediction on the original."""
        return bool(int(a.probs.argmax()) != int(pred_before[a.image]))

    @staticmethod
    def _flipped(a: Attempt, target_index: Sequence[int], pred_before: Optional[torch.Tensor]) -> Optional[bool]:
        """The metric's flip: the oracle now predicts the target class (None without an oracle)."""
        if a.probs is None:
            return None
        return bool(int(a.probs.argmax()) == int(target_index[a.image]))
