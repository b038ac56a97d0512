"""LoRA domain tuning of the Kandinsky 2.2 decoder UNet: the objective, the data order, checkpoints, resume, validation.

The recipe (METHOD.md, "Domain tuning"): a PEFT LoRA adapter on the UNet's attention projections, MoVQ and the CLIP
image encoder frozen; for a training image x with latent w_0 = MoVQ(x) and embedding e = CLIP(x),

    t ~ U{0 .. T_train - 1},  eps ~ N(0, I),  w_t = sqrt(a_t) w_0 + sqrt(1 - a_t) eps   (DDPMScheduler.add_noise)
    loss = || eps_theta(w_t, t, e)[:, :C] - eps ||^2                                    (C = latent channels)

AdamW, constant LR after an optional linear warmup, real gradient clipping. Data-parallel under
``accelerate launch`` / ``torchrun`` (the LoRA-wrapped UNet goes through ``accelerator.prepare``).

Determinism: every random draw of a step (noise, timesteps, flips) comes from a generator seeded by (seed, micro-step,
process), and the data order is a seeded per-epoch permutation indexed by the global sample position. A run resumed
from a checkpoint therefore continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from datasets.folder import DatasetLayoutError, ImageRecord, ImageRecordDataset, collate_skip_bad
from diffusion.config import ConfigError, DType, LoraTrainConfig, atomic_write_text, stamp_run_dir, to_yaml
from diffusion.data import dataset_classes, make_loader, split_records
from diffusion.editing import ddpm_schedule
from diffusion.inversion import cfg_eps, sample
from diffusion.lora import WEIGHTS_NAME, add_lora, restore_lora_weights, save_lora
from diffusion.models import (
    Decoder, ImageEncoder, check_embed_dim, load_decoder, load_image_encoder, optimize_unet, resolve_device,
    resolve_dtype,
)
from diffusion.train_cache import Features, load_or_build_features

log = logging.getLogger(__name__)

STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FORMAT = 1
# Keys that may change between a run and its resumption: they steer the run, not what it computes.
RUN_CONTROL_KEYS = {
    "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
    "num_validation_images", "validation_inference_steps", "validation_guidance_scale", "report_to", "cache_dir",
    "gradient_checkpointing", "allow_tf32", "data.num_workers", "model.device", "model.channels_last",
    "model.compile",
}
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A checkpoint or adapter could not be written; the message says which, why, and what is still intact."""


@dataclass
class TrainResult:
    """What a training run produced (on every process; ``losses`` are the means over processes)."""

    output_dir: Path
    adapter: Path  # output_dir/pytorch_lora_weights.safetensors
    global_step: int
    losses: List[float] = field(default_factory=list)  # one per optimizer step run by this call
    resumed_from: Optional[Path] = None
    stopped_early: bool = False  # a SIGINT / SIGTERM ended the run (after a checkpoint) before max_train_steps
    decoder: Optional[Decoder] = None  # with the trained adapter attached, in eval mode: for in-process use


# --------------------------------------------------------------------------------------------------------------------
# Seeds and the data order
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------------------------
def unet_eps(model: torch.nn.Module, w_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
             latent_channels: int) -> torch.Tensor:
    """eps_theta(w_t, t, e) through a (possibly DDP-wrapped) UNet, like :meth:`Decoder.eps` but without casting the
    inputs to the weights' dtype (autocast does that under mixed precision): (B, C, h, w) float32."""
    out = model(sample=w_t, timestep=t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}).sample
    return out[:, :latent_channels].float()


def diffusion_loss(model: torch.nn.Module, scheduler, w0: torch.Tensor, embeds: torch.Tensor,
                   generator: torch.Generator, latent_channels: int) -> torch.Tensor:
    """The epsilon MSE of one batch: w0 (B, C, h, w) float32, embeds (B, D); noise and t from ``generator``."""
    noise = torch.randn(w0.shape, generator=generator, device=generator.device, dtype=torch.float32)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (w0.shape[0],), generator=generator,
                      device=generator.device)
    w_t = scheduler.add_noise(w0.to(noise.device), noise, t)
    eps = unet_eps(model, w_t, t, embeds.to(noise.device), latent_channels)
    return F.mse_loss(eps, noise)


def constant_with_warmup(warmup_steps: int):
    """LR factor at optimizer step s: (s + 1) / warmup during the warmup, then 1."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>/`` with its training state), oldest first."""
    base = Path(output_dir)
    found = []
    for p in base.iterdir() if base.is_dir() else ():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(cfg: LoraTrainConfig) -> Optional[Path]:
    """The checkpoint to continue from: the newest one for ``latest`` (None when there is none yet), or the path.

    Raises ConfigError for a path that is not a complete checkpoint, and when output_dir holds checkpoints but
    resume_from_checkpoint is null (a fresh run would overwrite and prune them).
    """
    existing = list_checkpoints(cfg.output_dir)
    if cfg.resume_from_checkpoint is None:
        if existing:
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds checkpoints ({', '.join(p.name for _, p in existing[-3:])}"
                "). Set resume_from_checkpoint=latest to continue that run, or use a new output_dir."
            )
        return None
    if cfg.resume_from_checkpoint == "latest":
        if not existing:
            log.info("resume_from_checkpoint: latest, but %s holds no checkpoint yet: starting a new run",
                     cfg.output_dir)
            return None
        return existing[-1][1]
    path = Path(cfg.resume_from_checkpoint)
    if not (path / STATE_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {STATE_NAME})"
        raise ConfigError(
            f"resume_from_checkpoint: {path} {what}. Complete checkpoints in {cfg.output_dir}: "
            f"{', '.join(p.name for _, p in existing) or '(none)'}; or use resume_from_checkpoint=latest."
        )
    return path


def _optimizer_tensors(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON-able rest (no pickle anywhere)."""
    tensors: Dict[str, torch.Tensor] = {}
    rest: Dict[str, dict] = {}
    for pid, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(pid), {})[name] = value
    return tensors, {"scalars": rest, "param_groups": state_dict["param_groups"]}


def _optimizer_state(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> Dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def files_digest(files: Sequence[str]) -> str:
    """A short hash of the training images' list, stored in checkpoints to notice a changed dataset on resume."""
    return hashlib.sha256(json.dumps(list(files)).encode()).hexdigest()[:16]


def config_dict(cfg: LoraTrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))  # type: ignore[return-value]


def differing_keys(a: object, b: object, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(k for key in set(a) | set(b) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}."))
    return [] if a == b else [prefix.rstrip(".")]


def save_checkpoint(accelerator, unet, optimizer, lr_scheduler, step: int, cfg: LoraTrainConfig,
                    data_files: Sequence[str]) -> Path:
    """Write output_dir/checkpoint-<step>/: the adapter (loadable by ``unet.load_lora_adapter``), the optimizer state
    (safetensors + JSON), LR schedule, grad scaler, every process's RNG state and the step.

    Everything goes to checkpoint-<step>.tmp first, which is renamed once complete: a crash, a full disk or an
    interruption never leaves a half checkpoint under the final name, and the older checkpoints are not touched.
    """
    out = Path(cfg.output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_file(_rng_state(), str(tmp / f"rng_state_{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(unet), tmp)
            tensors, optim_meta = _optimizer_tensors(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_NAME))
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            state = {
                "format": STATE_FORMAT, "global_step": step, "num_processes": accelerator.num_processes,
                "train_batch_size": cfg.train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "optimizer": optim_meta, "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler,
                "data_files": files_digest(data_files),
                "config": config_dict(cfg),
            }
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))  # last: marks the folder complete
            _fsync_tree(tmp)
            if final.exists():  # an older run's checkpoint of the same step (resumed from an earlier one)
                trash = out / f".{final.name}.replaced"
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(out)
        raise CheckpointError(
            f"could not write checkpoint {final} ({err.strerror or err}). Nothing was left half-written; the "
            f"checkpoints already on disk are intact ({', '.join(p.name for _, p in kept) or 'none yet'}). Free disk "
            "space (or fix the permissions) and rerun with resume_from_checkpoint=latest."
        ) from err
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush the files of a folder to disk before it is renamed into place (a power cut then keeps it whole)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def read_training_state(folder: Path, cfg: LoraTrainConfig) -> dict:
    """The checkpoint's training state, checked against ``cfg`` before any model loads: only run-control keys
    (RUN_CONTROL_KEYS) may differ, or the resumed run would not continue the same computation."""
    state = json.loads((folder / STATE_NAME).read_text())
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{folder}: training state format {state.get('format')} is not {STATE_FORMAT}")
    changed = [k for k in differing_keys(state["config"], config_dict(cfg)) if k not in RUN_CONTROL_KEYS
               and k != "output_dir"]
    if changed:
        raise ConfigError(
            f"resume_from_checkpoint {folder}: the checkpoint was trained with other values of {', '.join(changed)}. "
            "Resume with the config it was made with (see its training_state.json), or start a new output_dir."
        )
    return state


def load_checkpoint(folder: Path, state: dict, accelerator, unet, optimizer, lr_scheduler, cfg: LoraTrainConfig,
                    data_files: Sequence[str]) -> int:
    """Restore everything :func:`save_checkpoint` wrote (``state``: :func:`read_training_state`); returns the global
    step to continue from."""
    if state["num_processes"] * state["train_batch_size"] != accelerator.num_processes * cfg.train_batch_size:
        log.warning("resuming with %d processes x batch %d where the checkpoint had %d x %d: the data order differs "
                    "from an uninterrupted run", accelerator.num_processes, cfg.train_batch_size,
                    state["num_processes"], state["train_batch_size"])
    if state["data_files"] != files_digest(data_files):
        log.warning("the training images differ from those of checkpoint %s: the run continues on the current ones",
                    folder)
    restore_lora_weights(accelerator.unwrap_model(unet), folder / WEIGHTS_NAME)
    optimizer.load_state_dict(_optimizer_state(load_file(str(folder / OPTIMIZER_NAME)), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng = folder / f"rng_state_{accelerator.process_index}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)))
    return int(state["global_step"])


def prune_checkpoints(output_dir: str | Path, keep: Optional[int]) -> List[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (each renamed away first, so an interrupted delete
    never leaves a half checkpoint under a checkpoint name); also removes stale ``.tmp`` folders. Returns the
    deleted checkpoints."""
    base = Path(output_dir)
    for stale in base.glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return []
    removed = []
    for _, path in list_checkpoints(base)[:-keep]:
        doomed = path.with_name(f".{path.name}.deleting")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("checkpoints_total_limit %d: removed %s", keep, ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------------------------------------------------
# Validation: held-out images regenerated from noise with their own embedding
# --------------------------------------------------------------------------------------------------------------------
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
    cond = embeds.to(dev).float()
    c0 = null_embed.to(dev).float().reshape(1, -1)

    def eps_fn(w: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = schedule.timesteps[steps].to(dev)
        k = len(rows)
        eps = decoder.eps(torch.cat([w, w]), torch.cat([t, t]), torch.cat([c0.expand(k, -1), cond[rows.to(dev)]]))
        return cfg_eps(eps[:k], eps[k:], guidance_scale)

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
        from diffusion.views import save_image, to_pil

        path = save_image(grid, self.folder / f"step-{step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None].numpy()}, step=step, dataformats="NCHW")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [to_pil(grid)]}, step=step)
        return path


# --------------------------------------------------------------------------------------------------------------------
# Stopping cleanly on SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGINT / SIGTERM while training: the loop finishes its step, writes a checkpoint and returns.
    A second signal stops at once (KeyboardInterrupt), which is safe too: checkpoints are renamed into place."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: stopping after this step (with a checkpoint); send it again to stop at once", signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
def check_report_to(report_to: str) -> None:
    """Fail before anything loads when the chosen tracker's package is missing (none is a dependency)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to == "tensorboard" and not is_tensorboard_available():
        raise ConfigError("report_to: tensorboard needs the tensorboard package, which is not installed here: "
                          "pip install tensorboard, or set report_to: none (validation grids are saved as PNGs in "
                          "output_dir/validation either way)")
    if report_to == "wandb" and not is_wandb_available():
        raise ConfigError("report_to: wandb needs the wandb package, which is not installed here: pip install wandb, "
                          "or set report_to: none")


def make_accelerator(cfg: LoraTrainConfig):
    """The Accelerator for this config: device from model.device (cpu forces the CPU), mixed precision, gradient
    accumulation and the tracker."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    device = resolve_device(cfg.model.device)  # checks that the device exists
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"mixed_precision: fp16 needs a CUDA GPU (model.device resolves to {device}); "
                          "use bf16 or no here")
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device.index)  # single process: accelerate uses the current CUDA device
    out = Path(cfg.output_dir)
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def _stamp(cfg: LoraTrainConfig) -> None:
    """stamp_run_dir, after accepting changes of run-control keys (max_train_steps, resume_from_checkpoint, ...)
    in an existing config.yaml: a resumed run may steer differently but must compute the same thing."""
    cfg_file = Path(cfg.output_dir) / "config.yaml"
    if cfg_file.is_file():
        old = OmegaConf.to_container(OmegaConf.load(cfg_file))
        changed = differing_keys(old, config_dict(cfg))
        if changed and set(changed) <= RUN_CONTROL_KEYS:
            log.info("config.yaml: run-control keys changed since the last run: %s", ", ".join(changed))
            atomic_write_text(cfg_file, to_yaml(cfg))
    stamp_run_dir(cfg)


def _weight_dtype(cfg: LoraTrainConfig, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: model.dtype when set, else the mixed-precision dtype (float32 for no)."""
    if cfg.model.dtype == DType.auto:
        return PRECISION_DTYPES[cfg.mixed_precision]
    return resolve_dtype(cfg.model.dtype, device)


def _check_batch(n: int, cfg: LoraTrainConfig, world: int, where: str) -> None:
    if n < cfg.train_batch_size * world:
        raise ConfigError(
            f"only {n} training images ({where}) but one batch takes train_batch_size {cfg.train_batch_size} x "
            f"{world} process(es) = {cfg.train_batch_size * world}: lower train_batch_size or add images"
        )


def train_lora(cfg: LoraTrainConfig) -> TrainResult:
    """The whole run: data and resume checks, models, feature cache, LoRA, the loop, checkpoints, the adapter."""
    from accelerate.utils import set_seed

    check_report_to(cfg.report_to)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    classes = dataset_classes(cfg.data)
    records = split_records(cfg.data, cfg.data.train_split, classes)  # listed and checked before any model loads
    where = f"{cfg.data.root}/{cfg.data.train_split}, classes {classes}"
    _check_batch(len(records), cfg, world, where)
    val_records = validation_records(cfg, classes) if cfg.validation_steps else []
    resume = resolve_resume(cfg)
    resume_state = read_training_state(resume, cfg) if resume is not None else None
    if accelerator.is_main_process:
        _stamp(cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    device = accelerator.device
    dtype = _weight_dtype(cfg, device)
    decoder = load_decoder(cfg.model, device, dtype)
    encoder = load_image_encoder(cfg.model, device, dtype)
    check_embed_dim(decoder, encoder)
    kinds = ["embeds", "embeds_flip"] if cfg.augment_flip else ["latents", "embeds"]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
    features = load_or_build_features(decoder, encoder, records, Path(cfg.data.root), cfg.data, cache_dir, kinds,
                                      cfg.train_batch_size, accelerator)
    _check_batch(len(features), cfg, world, where + ", readable ones")
    validator = Validator(cfg, decoder, encoder, val_records) if val_records and accelerator.is_main_process else None

    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
    add_lora(decoder.unet, cfg.rank, cfg.alpha, cfg.target_modules)
    unet = decoder.unet
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in float32 whatever the frozen weights' dtype
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimize_unet(decoder, cfg.model)  # model.channels_last / model.compile, with the adapter in place
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_with_warmup(cfg.lr_warmup_steps))
    model, optimizer = accelerator.prepare(unet, optimizer)

    global_step = 0
    if resume is not None:
        global_step = load_checkpoint(resume, resume_state, accelerator, model, optimizer, lr_scheduler, cfg,
                                      features.files)
        log.info("resumed from %s at step %d", resume, global_step)
        if global_step >= cfg.max_train_steps:
            log.info("already at step %d >= max_train_steps %d: nothing to train (raise max_train_steps to go on)",
                     global_step, cfg.max_train_steps)
    accum = cfg.gradient_accumulation_steps
    order = BatchOrder(len(features), cfg.train_batch_size, world, rank, cfg.seed)
    if cfg.augment_flip:
        kept = [records[i] for i in features.indices]
        batches = LiveBatches(kept, order, decoder, encoder, cfg, start=global_step * accum,
                              stop=cfg.max_train_steps * accum, embeds=features.embeds,
                              embeds_flip=features.embeds_flip)
    else:
        batches = CachedBatches(features, order, device)

    trainable = sum(p.numel() for p in params)
    total_batch = cfg.train_batch_size * world * accum
    log.info(
        "LoRA training: %d images (%s); batch %d x %d process(es) x %d accumulation = %d; steps %d -> %d "
        "(%.1f epochs in all); LR %g (warmup %d); %d trainable parameters (rank %d, alpha %g, %d modules); "
        "device %s, frozen weights %s, mixed precision %s, gradient checkpointing %s; latents %s",
        len(features), ", ".join(classes), cfg.train_batch_size, world, accum, total_batch, global_step,
        cfg.max_train_steps, cfg.max_train_steps * total_batch / len(features), cfg.learning_rate,
        cfg.lr_warmup_steps, trainable, cfg.rank, cfg.alpha, len(cfg.target_modules), device,
        str(dtype).replace("torch.", ""), cfg.mixed_precision, cfg.gradient_checkpointing,
        "computed every step (augment_flip)" if cfg.augment_flip else f"cached in {cache_dir}",
    )
    if accelerator.is_main_process and cfg.report_to != "none":
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in _flatten(config_dict(cfg)).items()}
        accelerator.init_trackers("lora", config=flat)

    result = TrainResult(output_dir=Path(cfg.output_dir), adapter=Path(cfg.output_dir) / WEIGHTS_NAME,
                         global_step=global_step, resumed_from=resume)
    if validator is not None and global_step == 0:
        validator(0, accelerator)
    bar = tqdm(total=cfg.max_train_steps, initial=global_step, desc="lora", unit="step",
               disable=not accelerator.is_local_main_process)
    with stop_on_signals() as stop:
        while global_step < cfg.max_train_steps:
            step_loss = torch.zeros((), device=device)
            grad_norm = None
            for a in range(accum):
                micro = global_step * accum + a
                w0, e = batches.get(micro)
                gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "noise", micro, rank))
                with accelerator.accumulate(model):
                    loss = diffusion_loss(model, decoder.scheduler, w0, e, gen, decoder.latent_channels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach() / accum
            lr_scheduler.step()
            global_step += 1
            mean_loss = float(accelerator.reduce(step_loss, "mean")) if world > 1 else float(step_loss)
            result.losses.append(mean_loss)
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            logs = {"loss": mean_loss, "lr": lr}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=global_step)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at step {global_step}: lower learning_rate, or use "
                                         "mixed_precision bf16 / no; the checkpoints written so far are intact")
            stopping = _stop_requested(stop, accelerator)
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps or stopping:
                path = save_checkpoint(accelerator, model, optimizer, lr_scheduler, global_step, cfg, features.files)
                if accelerator.is_main_process:
                    prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
                    bar.write(f"step {global_step}: checkpoint {path}")
            if validator is not None and (global_step % cfg.validation_steps == 0
                                          or global_step == cfg.max_train_steps):
                validator(global_step, accelerator)
            accelerator.wait_for_everyone()
            if stopping:
                result.stopped_early = True
                log.warning("stopped at step %d (checkpoint-%d written); resume with resume_from_checkpoint=latest",
                            global_step, global_step)
                break
    bar.close()
    result.global_step = global_step
    result.decoder = decoder
    unet.eval()
    if accelerator.is_main_process:
        _save_final_adapter(accelerator.unwrap_model(model), Path(cfg.output_dir))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _stop_requested(stop: StopFlag, accelerator) -> bool:
    """Whether any process got a stop signal (all processes must agree to checkpoint and stop at the same step)."""
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def _save_final_adapter(unet, output_dir: Path) -> None:
    try:
        path = save_lora(unet, output_dir)
    except OSError as err:
        raise CheckpointError(f"could not write the final adapter to {output_dir} ({err.strerror or err}); the "
                              "last checkpoint holds the same weights (lora.step in the edit config)") from err
    log.info("adapter written to %s (edit with lora.path: %s)", path, output_dir)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
