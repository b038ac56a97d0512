"""The editing engine: images through encode -> invert -> t_skip search -> decode, batched.

Vocabulary: an *image* is a source picture (it is encoded and inverted once); an *item* is (image, target class);
an *attempt* is (item, eta, t_skip): one sampled and decoded edit. For every item and eta:

  1. w_0 = MoVQ(x); ws, zs = edit-friendly inversion of its image (lazy, shared by all its items, etas, attempts);
  2. e' = ||e|| (e/||e|| + eta (mu_t - mu_s));
  3. for the t_skips the search picks: sample from ws[T_skip] with zs and CFG g between c_0 and e'; decode.

Attempts of different images, items, etas and t_skips share one UNet batch. :class:`Inversion` is plain data (it can
be saved and reloaded); the network work happens in :class:`Editor`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from diffusion.config import SEARCHES, InversionCond, SearchMode
from diffusion.edit.search import FlipCriterion, Search, bisect_plan
from diffusion.embeddings import edit_embedding
from diffusion.errors import ArtefactError
from diffusion.inversion import (
    Schedule, ddpm_schedule, draw_forward_noise, edit_friendly_noise_maps, forward_noise, sample, step_index,
)
from diffusion.models import Decoder

log = logging.getLogger(__name__)

INVERSION_FORMAT = "diffusion-inversion/1"


class Oracle(Protocol):
    """Anything that maps images to class probabilities; ``classes`` names the columns. Oracles that can also say
    what each member thinks (``member_probs``: (B, M, K)) support ``flip_agreement: all``."""

    classes: Sequence[str]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, len(classes)) probabilities."""
        ...


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Inversion:
    """Edit-friendly inversion of U images, computed lazily: sampling from schedule index s needs the noise maps of
    steps s..T-1 only, so :meth:`Editor.ensure` computes them the first time an attempt starts that deep. A search
    that stops at a mild t_skip never pays for the strong ones; the maps it does compute are the ones a full
    inversion would give (each z_t depends on its own w_t alone).

    Save it with :meth:`save` (one safetensors file) and edit it again later, from another process, with the same
    decoder: the file records which decoder made it and is refused by another.
    """

    ws: torch.Tensor  # (T + 1, U, C, h, w) float64: ws[i] = w at schedule index i, ws[T] = w_0
    zs: torch.Tensor  # (T, U, C, h, w); valid for steps >= ready[u]
    ready: torch.Tensor  # (U,) long: noise maps of image u are computed for schedule indices >= ready[u]
    counter: torch.Tensor  # (U,) long: UNet evaluations spent on each image's inversion so far
    embeds: torch.Tensor  # (U, D) float32: each image's own CLIP embedding e
    timesteps: torch.Tensor  # (T,) long, the schedule's timesteps
    mode: InversionCond = InversionCond.null  # the inversion's conditioning c_inv
    guidance: float = 1.0  # its guidance (mode source only)
    images: Optional[torch.Tensor] = None  # (U, 3, H, W) in [0, 1]: the originals as the model saw them
    decoder_id: str = ""  # fingerprint of the decoder weights that made it (see Editor.decoder_id)

    @property
    def T(self) -> int:
        return int(self.timesteps.numel())

    @property
    def num_images(self) -> int:
        return int(self.ws.shape[1])

    def select(self, images: Sequence[int]) -> "Inversion":
        """The inversion of a subset of the images (copies)."""
        idx = torch.as_tensor(list(images), dtype=torch.long)
        return Inversion(
            ws=self.ws[:, idx].clone(), zs=self.zs[:, idx].clone(), ready=self.ready[idx].clone(),
            counter=self.counter[idx].clone(), embeds=self.embeds[idx].clone(), timesteps=self.timesteps.clone(),
            mode=self.mode, guidance=self.guidance, decoder_id=self.decoder_id,
            images=self.images[idx].clone() if self.images is not None else None)

    def save(self, path: str | Path) -> Path:
        """Write every tensor (what is computed so far included) to one safetensors file, atomically."""
        from safetensors.torch import save_file

        from diffusion.files import atomic_save

        tensors = {"ws": self.ws, "zs": self.zs, "ready": self.ready, "counter": self.counter, "embeds": self.embeds,
                   "timesteps": self.timesteps}
        if self.images is not None:
            tensors["images"] = self.images
        meta = {"format": INVERSION_FORMAT, "mode": InversionCond(self.mode).value, "guidance": repr(self.guidance),
                "decoder_id": self.decoder_id}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        """Read a file written by :meth:`save`; a damaged or foreign file is an ArtefactError naming it."""
        from diffusion.files import load_tensors, tensors_metadata

        fix = "Invert the images again (pipe.invert) and save the result."
        meta = tensors_metadata(path, fix)
        if meta.get("format") != INVERSION_FORMAT:
            raise ArtefactError(f"{path} is not an inversion file (format {meta.get('format')!r}, expected "
                                f"{INVERSION_FORMAT!r}). {fix}")
        t = load_tensors(path, fix)
        missing = sorted({"ws", "zs", "ready", "counter", "embeds", "timesteps"} - set(t))
        if missing:
            raise ArtefactError(f"{path} lacks the tensors {missing}. {fix}")
        T, U = int(t["timesteps"].numel()), int(t["ws"].shape[1])
        if t["ws"].shape[0] != T + 1 or t["zs"].shape[:2] != (T, U) or t["embeds"].shape[0] != U:
            raise ArtefactError(f"{path}: its tensors do not fit together (ws {tuple(t['ws'].shape)}, zs "
                                f"{tuple(t['zs'].shape)}, {T} timesteps). {fix}")
        return cls(ws=t["ws"], zs=t["zs"], ready=t["ready"].long(), counter=t["counter"].long(), embeds=t["embeds"],
                   timesteps=t["timesteps"].long(), mode=InversionCond(meta.get("mode", "null")),
                   guidance=float(meta.get("guidance", "1.0")), images=t.get("images"),
                   decoder_id=meta.get("decoder_id", ""))


@dataclass
class Attempt:
    """One sampled edit: item ``item`` (an index into the call's items) at ``eta`` and ``t_skip``."""

    item: int
    eta: float
    t_skip: float
    latent: Optional[torch.Tensor] = None  # (C, h, w)
    picture: Optional[torch.Tensor] = None  # decoded, (3, H, W) in [0, 1]
    probs: Optional[torch.Tensor] = None  # oracle probabilities (K,)
    member_probs: Optional[torch.Tensor] = None  # per member (M, K), when the criterion needs them
    evals: int = 0  # UNet evaluations of its sampling (2 per guided step)
    met: Optional[bool] = None  # whether it meets the flip criterion (None without an oracle)


@dataclass
class EditOutcome:
    """The chosen edit of one (item, eta), with every attempt that led to it.

    ``chosen`` is None for an item whose image the oracle already assigns to the target class (``already_target``):
    such an item is not searched and never counts as a flip."""

    item: int
    eta: float
    chosen: Optional[Attempt]
    attempts: List[Attempt] = field(default_factory=list)
    flipped: Optional[bool] = None  # the chosen edit meets the criterion (None without an oracle)
    already_target: bool = False

    @property
    def sampling_evals(self) -> int:
        return sum(a.evals for a in self.attempts)


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------
class Editor:
    """The decoder and c_0; inverts images and runs attempts and searches on them (judged by the oracle a call
    passes, if any)."""

    def __init__(self, decoder: Decoder, null_embed: torch.Tensor, batch_size: int = 4, decoder_id: str = ""):
        self.decoder, self.batch_size, self.decoder_id = decoder, int(batch_size), decoder_id
        self.c0 = null_embed.float().reshape(1, -1)
        self._schedules: Dict[int, Schedule] = {}

    def schedule(self, num_inference_steps: int) -> Schedule:
        if num_inference_steps not in self._schedules:
            self._schedules[num_inference_steps] = ddpm_schedule(self.decoder.scheduler, num_inference_steps)
        return self._schedules[num_inference_steps]

    # --- inversion ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def invert(self, images: torch.Tensor, embeds: torch.Tensor, generators: Sequence[torch.Generator],
               num_inference_steps: int, mode: InversionCond = InversionCond.null,
               guidance: float = 1.0) -> Inversion:
        """The (lazy) edit-friendly inversion of U images (U, 3, H, W) in [0, 1] with their embeddings (U, D):
        independent forward noise for every step, image u's drawn from ``generators[u]`` alone (the same noise
        whether it is inverted alone or in a batch). No noise map is computed yet."""
        schedule = self.schedule(num_inference_steps)
        w0 = self.decoder.encode(images)
        U, T = w0.shape[0], schedule.T
        if len(generators) != U or embeds.shape[0] != U:
            raise ValueError(f"{U} images need {U} generators and embeddings, got {len(generators)} and "
                             f"{embeds.shape[0]}")
        noise = draw_forward_noise(w0.shape[1:], T, generators, device=w0.device)
        ws = forward_noise(w0, schedule, noise)
        return Inversion(ws=ws, zs=torch.zeros_like(ws[:T]), ready=torch.full((U,), T, dtype=torch.long),
                         counter=torch.zeros(U, dtype=torch.long), embeds=embeds.float().cpu(),
                         timesteps=schedule.timesteps.clone(), mode=InversionCond(mode), guidance=float(guidance),
                         images=images.float().cpu(), decoder_id=self.decoder_id)

    def _check(self, inv: Inversion) -> Schedule:
        if self.decoder_id and inv.decoder_id and inv.decoder_id != self.decoder_id:
            raise ArtefactError(f"this inversion was made by another decoder (weights {inv.decoder_id}, this one "
                                f"{self.decoder_id}; a LoRA adapter counts): invert the images again with this "
                                "pipeline")
        schedule = self.schedule(inv.T)
        if not torch.equal(schedule.timesteps, inv.timesteps.cpu()):
            raise ArtefactError("this inversion's timesteps are not this decoder scheduler's: invert again")
        return schedule

    @torch.inference_mode()
    def ensure(self, inv: Inversion, starts: torch.Tensor, image_of_row: torch.Tensor) -> None:
        """Compute the noise maps that sampling rows starting at ``starts`` (A,) of images ``image_of_row`` (A,)
        need, with the inversion's own conditioning; fills ``inv`` in place."""
        schedule = self._check(inv)
        need = inv.ready.clone()
        for s, b in zip(starts.tolist(), image_of_row.tolist()):
            need[b] = min(int(need[b]), int(s))
        todo = [(i, b) for b in range(len(need)) for i in range(int(need[b]), int(inv.ready[b]))]
        if not todo:
            return
        todo.sort(key=lambda p: (-p[0], p[1]))  # mildest steps first, images side by side in one batch
        U = inv.num_images
        if inv.mode == InversionCond.null:
            fn = self.decoder.eps_fn(schedule.timesteps, self.c0.expand(U, -1), counter=inv.counter)
        else:
            fn = self.decoder.eps_fn(schedule.timesteps, inv.embeds, self.c0, inv.guidance, counter=inv.counter)
        edit_friendly_noise_maps(inv.ws, schedule, fn, chunk_size=max(1, 2 * self.batch_size), steps=todo, zs=inv.zs)
        inv.ready = torch.minimum(inv.ready, need)

    # --- attempts -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_attempts(self, inv: Inversion, attempts: List[Attempt], e_edit: torch.Tensor,
                     image_of_item: torch.Tensor, guidance_scale: float, oracle: Optional[Oracle] = None,
                     criterion: Optional[FlipCriterion] = None, target_of_item: Optional[Sequence[int]] = None) -> None:
        """Sample, decode and (with an oracle) classify attempts in one batch, filling them in place. ``e_edit``
        (A, D) is each attempt's edited embedding; ``image_of_item`` maps items to inverted images."""
        schedule = self._check(inv)
        starts = torch.tensor([step_index(schedule, a.t_skip) for a in attempts])
        image_of_row = image_of_item[torch.tensor([a.item for a in attempts])]
        self.ensure(inv, starts, image_of_row)
        counter = torch.zeros(len(attempts), dtype=torch.long)
        fn = self.decoder.eps_fn(schedule.timesteps, e_edit, self.c0, guidance_scale, counter=counter)
        latents = sample(inv.ws, inv.zs, schedule, starts, fn, image_of_row=image_of_row)
        pictures = self.decode(latents)
        probs, members = classify(oracle, pictures, criterion is not None and criterion.needs_members)
        for k, a in enumerate(attempts):
            a.latent, a.picture, a.evals = latents[k].float(), pictures[k], int(counter[k])
            if probs is not None:
                a.probs = probs[k]
                a.member_probs = members[k] if members is not None else None
                if criterion is not None and target_of_item is not None:
                    a.met = criterion.met(a.probs, int(target_of_item[a.item]), a.member_probs)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = [self.decoder.decode(latents[i:i + self.batch_size]).cpu()
               for i in range(0, len(latents), self.batch_size)]
        return torch.cat(out)

    # --- the search -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def edit(self, inv: Inversion, mu_src: torch.Tensor, mu_tgt: torch.Tensor, etas: Sequence[float],
             search: SearchMode, t_skips: Sequence[float], guidance_scale: float,
             image_of_item: Optional[Sequence[int]] = None, oracle: Optional[Oracle] = None,
             target_index: Optional[Sequence[int]] = None,
             criterion: Optional[FlipCriterion] = None, pred_before: Optional[torch.Tensor] = None,
             plan: Optional[Dict[Tuple[int, int], int]] = None) -> List[EditOutcome]:
        """Edit B items of the inverted images: one outcome per (item, eta), items outermost.

        mu_src / mu_tgt (B, D) are each item's class means; ``image_of_item`` (B) its image in ``inv`` (default:
        item b is image b). ``t_skips``: ``fixed`` uses the first, ``sweep`` every one (one outcome per t_skip),
        ``first_flip`` / ``bisect`` search them mildest first. With an oracle, ``target_index`` (B) is each item's
        target column and ``criterion`` says when an edit counts (default: the argmax); an item whose original is
        already predicted as its target (``pred_before``, (B,) argmax) is not searched (``already_target``).
        """
        B = mu_src.shape[0]
        image_of = torch.arange(B) if image_of_item is None else torch.as_tensor(list(image_of_item), dtype=torch.long)
        if image_of.numel() != B or (B and (image_of.min() < 0 or image_of.max() >= inv.num_images)):
            raise ValueError(f"image_of_item must give each of the {B} items an image in 0..{inv.num_images - 1}")
        criterion = criterion or FlipCriterion()
        judged = oracle is not None and target_index is not None
        if search in SEARCHES and not judged:
            raise ValueError(f"search: {search.value} needs an oracle (set oracle_dir) or use search: fixed")
        order = sorted(t_skips, reverse=True)  # mildest first
        tasks = [(b, float(eta)) for b in range(B) for eta in etas]
        e_src = inv.embeds[image_of]
        e_edit = {(b, eta): edit_embedding(e_src[b:b + 1], mu_src[b], mu_tgt[b], eta)[0] for b, eta in tasks}
        already = {b for b in range(B) if judged and pred_before is not None
                   and int(pred_before[b]) == int(target_index[b])}  # type: ignore[index]

        def run(attempts: List[Attempt]) -> None:
            if attempts:
                self.run_attempts(inv, attempts, torch.stack([e_edit[(a.item, a.eta)] for a in attempts]), image_of,
                                  guidance_scale, oracle, criterion if judged else None, target_index)

        if search in (SearchMode.fixed, SearchMode.sweep):  # everything known up front: one batch of attempts
            plan_t = [order[0]] if search == SearchMode.fixed else order
            attempts = [Attempt(b, eta, t) for (b, eta) in tasks for t in plan_t]
            run(attempts)
            return [EditOutcome(a.item, a.eta, chosen=a, attempts=[a], already_target=a.item in already,
                                flipped=None if a.met is None else (a.met and a.item not in already))
                    for a in attempts]
        searching = {task: Search(search, len(order), plan) for task in tasks if task[0] not in already}
        tried: Dict[tuple, Dict[int, Attempt]] = {task: {} for task in searching}
        while True:
            round_ = [(task, s.next()) for task, s in searching.items() if s.next() is not None]
            if not round_:
                break
            attempts = [Attempt(b, eta, order[k]) for (b, eta), k in round_]
            run(attempts)
            for (task, k), a in zip(round_, attempts):
                tried[task][k] = a
                searching[task].record(k, bool(a.met))
        outcomes = []
        for task in tasks:
            if task not in searching:
                outcomes.append(EditOutcome(task[0], task[1], chosen=None, flipped=False, already_target=True))
                continue
            chosen = tried[task][searching[task].chosen()]
            outcomes.append(EditOutcome(task[0], task[1], chosen=chosen, attempts=list(tried[task].values()),
                                        flipped=bool(chosen.met)))
        return outcomes

    def plan_for(self, search: SearchMode, t_skips: Sequence[float], num_inference_steps: int,
                 inversion: InversionCond, guidance_scale: float = 4.0,
                 inversion_guidance: float = 1.0) -> Optional[Dict[Tuple[int, int], int]]:
        """The cost-weighted splits of ``search: bisect`` (None for the other searches), the same for every batch.
        A guided step costs 2 UNet evaluations, an unguided one (g = 1, or the null inversion) 1."""
        if search != SearchMode.bisect:
            return None
        schedule = self.schedule(num_inference_steps)
        depths = [schedule.T - step_index(schedule, t) for t in sorted(t_skips, reverse=True)]
        invert_cost = 1 if inversion == InversionCond.null or inversion_guidance == 1.0 else 2
        return bisect_plan(depths, 1 if guidance_scale == 1.0 else 2, invert_cost)[0]

    @torch.inference_mode()
    def interpolate(self, inv: Inversion, mu_src: torch.Tensor, mu_tgt: torch.Tensor, etas: Sequence[float],
                    t_skip: float, guidance_scale: float, image_of_item: Optional[Sequence[int]] = None,
                    oracle: Optional[Oracle] = None) -> List[Attempt]:
        """An interpolation strip per item: e' at every eta in ``etas`` (eta 0 = the image re-sampled, negative =
        away from the target), all at one t_skip, reusing the inversion, all items and etas in one batch."""
        B = mu_src.shape[0]
        image_of = torch.arange(B) if image_of_item is None else torch.as_tensor(list(image_of_item), dtype=torch.long)
        e_src = inv.embeds[image_of]
        attempts = [Attempt(b, float(eta), t_skip) for b in range(B) for eta in etas]
        cond = torch.stack([edit_embedding(e_src[a.item:a.item + 1], mu_src[a.item], mu_tgt[a.item], a.eta)[0]
                            for a in attempts])
        self.run_attempts(inv, attempts, cond, image_of, guidance_scale, oracle)
        return attempts


def classify(oracle: Optional[Oracle], pictures: torch.Tensor,
             members: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(ensemble probabilities (N, K), per-member probabilities (N, M, K) or None) of ``oracle``, on the CPU; (None,
    None) without one."""
    if oracle is None:
        return None, None
    with torch.inference_mode():
        if members:
            if not hasattr(oracle, "member_probs"):
                raise ValueError("flip_agreement: all needs an oracle that reports its members (an oracle_dir)")
            per_member = oracle.member_probs(pictures).float().cpu()  # type: ignore[attr-defined]
            return per_member.mean(dim=1), per_member
        return oracle(pictures).float().cpu(), None
