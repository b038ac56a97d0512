"""The training data of a LoRA run: seeds, the data order, and the (w_0, e) batches of each micro-step.

Determinism: every random draw of a step (noise, timesteps, flips) comes from a generator seeded by (seed, purpose,
micro-step, process), and the data order is a seeded per-epoch permutation indexed by the global sample position, so
a run resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from datasets.folder import ImageRecord, ImageRecordDataset, collate_skip_bad
from diffusion.config import LoraTrainConfig
from diffusion.models import Decoder, ImageEncoder
from diffusion.train.cache import Features


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose and position, e.g. derive_seed(seed, "noise", micro_step, rank)."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BatchOrder:
    """Which images each process trains on at each micro-step: a seeded permutation per epoch, read as one stream.

    Global sample position p = (micro_step * num_processes + rank) * batch_size + j belongs to epoch p // N and is
    image perm_epoch[p % N]. Stateless, so resuming at any micro-step continues the same order, and the images of a
    global batch do not depend on how it is split across processes (for a fixed total batch).
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, rank: int, seed: int):
        self.n, self.batch_size, self.world, self.rank, self.seed = num_items, batch_size, num_processes, rank, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, micro_step: int) -> List[int]:
        start = (micro_step * self.world + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]


# --------------------------------------------------------------------------------------------------------------------
# Batches: cached features, or images encoded every step
# --------------------------------------------------------------------------------------------------------------------
class CachedBatches:
    """(w_0, e) of a micro-step from the feature cache: a step runs only the UNet."""

    def __init__(self, features: Features, order: BatchOrder, device: torch.device):
        assert features.latents is not None
        self.features, self.order, self.device = features, order, device

    def get(self, micro_step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(self.order.indices(micro_step))
        return self.features.latents[idx].to(self.device), self.features.embeds[idx].to(self.device)


class _OrderSampler:
    """A DataLoader batch sampler yielding BatchOrder's indices from ``start`` on (workers may read ahead)."""

    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[List[int]]:
        return (self.order.indices(m) for m in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class LiveBatches:
    """(w_0, e) of a micro-step computed from the images: MoVQ every step (flips make latents vary); CLIP embeddings
    from a table of both orientations when given (``embeds``, ``embeds_flip``), else computed every step too."""

    def __init__(self, records: Sequence[ImageRecord], order: BatchOrder, decoder: Decoder, encoder: ImageEncoder,
                 cfg: LoraTrainConfig, start: int, stop: int, embeds: Optional[torch.Tensor] = None,
                 embeds_flip: Optional[torch.Tensor] = None):
        self.decoder, self.encoder, self.cfg, self.order = decoder, encoder, cfg, order
        self.embeds, self.embeds_flip = embeds, embeds_flip
        dataset = ImageRecordDataset(list(records), size=decoder.image_size, background=tuple(cfg.data.background),
                                     on_bad_file="error")
        self.loader = DataLoader(dataset, batch_sampler=_OrderSampler(order, start, stop),
                                 num_workers=cfg.data.num_workers, collate_fn=collate_skip_bad)
        self._iter = iter(self.loader)
        self._next_micro = start

    def flips(self, micro_step: int) -> torch.Tensor:
        """(B,) bool: which images of the micro-step are mirrored (always False without augment_flip)."""
        if not self.cfg.augment_flip:
            return torch.zeros(self.order.batch_size, dtype=torch.bool)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "flip", micro_step, self.order.rank))
        return torch.rand(self.order.batch_size, generator=g) < 0.5

    @torch.no_grad()
    def get(self, micro_step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if micro_step != self._next_micro:
            raise RuntimeError(f"LiveBatches reads micro-steps in order: expected {self._next_micro}, got {micro_step}")
        self._next_micro += 1
        batch = next(self._iter)
        x = batch["pixel_values"]  # (B, 3, H, W) in [0, 1]
        flip = self.flips(micro_step)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        w0 = self.decoder.encode(x)  # (B, C, h, w) float32
        if self.embeds is not None:
            idx = batch["index"]
            table = self.embeds_flip if self.embeds_flip is not None else self.embeds
            e = torch.where(flip.view(-1, 1), table[idx], self.embeds[idx])
        else:
            e = self.encoder.embed(x).clone()  # clone: out of inference mode, usable by autograd
        return w0, e.to(w0.device)
