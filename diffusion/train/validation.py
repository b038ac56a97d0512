"""Validation of a LoRA run: fixed held-out images regenerated from noise with their own embedding, saved as PNG
grids (top row the originals, bottom row the samples) and handed to the trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from datasets.folder import DatasetLayoutError, ImageRecord
from diffusion.config import LoraTrainConfig
from diffusion.data import make_loader, split_records
from diffusion.inversion import ddpm_schedule, sample
from diffusion.models import Decoder, ImageEncoder
from diffusion.train.data import derive_seed


def validation_records(cfg: LoraTrainConfig, classes: List[str]) -> List[ImageRecord]:
    """The first ``num_validation_images`` of data.eval_split, taking the classes in turn (fixed for the run)."""
    records = split_records(cfg.data, cfg.data.eval_split, classes)
    rank_in_class: Dict[int, int] = {}
    keyed = []
    for r in records:
        rank_in_class[r.label] = rank_in_class.get(r.label, -1) + 1
        keyed.append((rank_in_class[r.label], r.label, r))
    return [r for _, _, r in sorted(keyed, key=lambda k: (k[0], k[1]))][: cfg.num_validation_images]


@torch.inference_mode()
def sample_from_noise(decoder: Decoder, embeds: torch.Tensor, null_embed: torch.Tensor, num_steps: int,
                      guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] drawn from pure noise with DDPM (T = num_steps) conditioned on ``embeds`` (B, D),
    classifier-free guidance against the null embedding: the decoder's reconstruction of an image from e alone."""
    schedule = ddpm_schedule(decoder.scheduler, num_steps)
    n, dev = embeds.shape[0], decoder.device
    shape = (decoder.latent_channels, decoder.latent_size, decoder.latent_size)
    w_T = torch.randn((1, n, *shape), generator=generator).to(dev)  # (1, B, C, h, w)
    zs = torch.randn((schedule.T, n, *shape), generator=generator).to(dev)  # fresh noise for every step
    eps_fn = decoder.eps_fn(schedule.timesteps, embeds.to(dev).float(), null_embed.to(dev).float(), guidance_scale)
    latents = sample(w_T, zs, schedule, torch.zeros(n, dtype=torch.long), eps_fn)
    return decoder.decode(latents)


def image_grid(rows: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Rows of images (each (B, 3, H, W)) -> one (3, H_total, W_total) grid on white."""
    from torchvision.utils import make_grid

    stacked = torch.cat([r.float().cpu() for r in rows])
    return make_grid(stacked, nrow=rows[0].shape[0], padding=gap, pad_value=1.0)


class Validator:
    """Regenerates the fixed validation images from their embeddings; saves output_dir/validation/step-<n>.png
    (top row the originals, bottom row the samples) and hands the grid to the trackers."""

    def __init__(self, cfg: LoraTrainConfig, decoder: Decoder, encoder: ImageEncoder, records: List[ImageRecord]):
        self.cfg, self.decoder = cfg, decoder
        batch = next(iter(make_loader(records, cfg.data, decoder.image_size, len(records))))
        if batch is None:
            raise DatasetLayoutError(f"none of the validation images of {cfg.data.eval_split} could be read")
        self.images = batch["pixel_values"]  # (n, 3, H, W)
        self.embeds = encoder.embed(self.images).clone()
        self.null = encoder.null_embedding().clone()
        self.folder = Path(cfg.output_dir) / "validation"

    def __call__(self, step: int, accelerator) -> Path:
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "validation"))  # same noise every time
        unet = self.decoder.unet
        unet.eval()
        with accelerator.autocast():
            samples = sample_from_noise(self.decoder, self.embeds, self.null, self.cfg.validation_inference_steps,
                                        self.cfg.validation_guidance_scale, generator)
        unet.train()
        grid = image_grid([self.images, samples])
        from diffusion.views.images import save_image, to_pil

        path = save_image(grid, self.folder / f"step-{step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None].numpy()}, step=step, dataformats="NCHW")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [to_pil(grid)]}, step=step)
        return path
