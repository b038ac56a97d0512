"""The LoRA training run (kandinsky_lora_train.py): setup, resume, one optimizer step, checkpoints, validation.

The recipe (docs/method.md, "Domain tuning"): a PEFT LoRA adapter on the UNet's attention projections, MoVQ and the
CLIP image encoder frozen, the epsilon objective of :mod:`diffusion.train.objective`; AdamW, constant LR after an
optional linear warmup, real gradient clipping. Data-parallel under ``accelerate launch`` / ``torchrun`` (the
LoRA-wrapped UNet goes through ``accelerator.prepare``). :class:`LoraTrainer` reads top to bottom in the order the
run happens: :meth:`~LoraTrainer.setup`, :meth:`~LoraTrainer.resume`, then :meth:`~LoraTrainer.step` /
:meth:`~LoraTrainer.checkpoint` / :meth:`~LoraTrainer.validate` in :meth:`~LoraTrainer.run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from diffusion.config import DType, LoraTrainConfig, MixedPrecision, ReportTo, config_dict
from diffusion.data import dataset_classes, held_out_paths, split_records
from diffusion.devices import dtype_name, resolve_device, resolve_dtype
from diffusion.errors import CheckpointError, ConfigError, RunInterrupted
from diffusion.files import run_lock
from diffusion.lora import WEIGHTS_NAME, add_lora, save_lora
from diffusion.models import Decoder, check_embed_dim, load_decoder, load_image_encoder, optimize_unet
from diffusion.runinfo import stamp_run_dir
from diffusion.train.cache import load_or_build_features
from diffusion.train.checkpoints import (
    list_checkpoints, load_checkpoint, prune_checkpoints, read_training_state, resolve_resume, save_checkpoint,
)
from diffusion.train.data import BatchOrder, CachedBatches, LiveBatches, derive_seed
from diffusion.train.objective import constant_with_warmup, diffusion_loss
from diffusion.train.validation import Validator, validation_records

log = logging.getLogger(__name__)

PRECISION_DTYPES = {MixedPrecision.no: torch.float32, MixedPrecision.fp16: torch.float16,
                    MixedPrecision.bf16: torch.bfloat16}


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
# Stopping cleanly on SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGINT / SIGTERM while training: the loop finishes its step, writes a checkpoint and stops.
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
# Checks that need no model
# --------------------------------------------------------------------------------------------------------------------
def check_report_to(report_to: ReportTo) -> None:
    """Fail before anything loads when the chosen tracker's package is missing (none is a dependency)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to == ReportTo.tensorboard and not is_tensorboard_available():
        raise ConfigError("report_to: tensorboard needs the tensorboard package, which is not installed here: "
                          "pip install tensorboard, or set report_to=none (validation grids are saved as PNGs in "
                          "output_dir/validation either way)", key="report_to")
    if report_to == ReportTo.wandb and not is_wandb_available():
        raise ConfigError("report_to: wandb needs the wandb package, which is not installed here: pip install wandb, "
                          "or set report_to=none", key="report_to")


def make_accelerator(cfg: LoraTrainConfig):
    """The Accelerator for this config: device from model.device (cpu forces the CPU), mixed precision, gradient
    accumulation and the tracker."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    device = resolve_device(cfg.model.device)  # checks that the device exists
    if cfg.mixed_precision == MixedPrecision.fp16 and device.type != "cuda":
        raise ConfigError(f"mixed_precision: fp16 needs a CUDA GPU (model.device resolves to {device}); "
                          "use mixed_precision=bf16 or no here", key="mixed_precision")
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device.index)  # single process: accelerate uses the current CUDA device
    out = Path(cfg.output_dir)
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision.value,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == ReportTo.none else cfg.report_to.value,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def weight_dtype(cfg: LoraTrainConfig, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: model.dtype when set, else the mixed-precision dtype (float32 for no)."""
    if cfg.model.dtype == DType.auto:
        return PRECISION_DTYPES[cfg.mixed_precision]
    return resolve_dtype(cfg.model.dtype, device)


def check_batch(n: int, cfg: LoraTrainConfig, world: int, where: str) -> None:
    if n < cfg.train_batch_size * world:
        raise ConfigError(
            f"only {n} training images ({where}) but one batch takes train_batch_size {cfg.train_batch_size} x "
            f"{world} process(es) = {cfg.train_batch_size * world}: lower train_batch_size or add images",
            key="train_batch_size")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
class LoraTrainer:
    """One LoRA training run; see the module docstring for the order of its parts."""

    def __init__(self, cfg: LoraTrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.global_step = 0
        self._lock = None

    def close(self) -> None:
        """Release the output folder's lock (a no-op on other processes and when setup never took it)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    # --- setup: data and resume checks first (seconds), then the models ---------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_report_to(cfg.report_to)
        self.accelerator = acc = make_accelerator(cfg)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.classes = dataset_classes(cfg.data)
        self.records = split_records(cfg.data, cfg.data.train_split, self.classes)  # listed before any model loads
        if cfg.holdout_per_class:  # calibrate.py's validation images stay unseen
            held = set(held_out_paths(cfg.data, self.classes, cfg.holdout_per_class, cfg.holdout_seed))
            kept = [r for r in self.records if str(r.path) not in held]
            log.info("%d train images held out for scripts/calibrate.py (holdout_per_class %d, seed %d)",
                     len(self.records) - len(kept), cfg.holdout_per_class, cfg.holdout_seed)
            self.records = kept
        self.where = f"{cfg.data.root}/{cfg.data.train_split}, classes {self.classes}"
        check_batch(len(self.records), cfg, self.world, self.where)
        self.val_records = validation_records(cfg, self.classes) if cfg.validation_steps else []
        self.resume_from = resolve_resume(cfg)
        self.resume_state = read_training_state(self.resume_from, cfg) if self.resume_from is not None else None
        if acc.is_main_process:
            self._lock = run_lock(self.out)  # one run per folder; released by close()
            self._lock.__enter__()
            stamp_run_dir(cfg, has_results=lambda out: bool(list_checkpoints(out)),
                          resolved={"weights_dtype": dtype_name(weight_dtype(cfg, acc.device))})
        acc.wait_for_everyone()
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._load_models()
        self._attach_lora()

    def _load_models(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.device = acc.device
        self.dtype = weight_dtype(cfg, self.device)
        self.decoder = load_decoder(cfg.model, self.device, self.dtype)
        self.encoder = load_image_encoder(cfg.model, self.device, self.dtype)
        check_embed_dim(self.decoder, self.encoder)
        kinds = ["embeds", "embeds_flip"] if cfg.augment_flip else ["latents", "embeds"]
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self.features = load_or_build_features(self.decoder, self.encoder, self.records, Path(cfg.data.root),
                                               cfg.data, self.cache_dir, kinds, cfg.train_batch_size, acc)
        check_batch(len(self.features), cfg, self.world, self.where + ", readable ones")
        self.validator = (Validator(cfg, self.decoder, self.encoder, self.val_records)
                          if self.val_records and acc.is_main_process else None)

    def _attach_lora(self) -> None:
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
        add_lora(self.decoder.unet, cfg.rank, cfg.alpha, cfg.target_modules)
        unet = self.decoder.unet
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in float32 whatever the frozen weights' dtype
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimize_unet(self.decoder, cfg.model)  # model.channels_last / model.compile, with the adapter in place
        unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_with_warmup(cfg.lr_warmup_steps))
        self.model, self.optimizer = self.accelerator.prepare(unet, optimizer)

    # --- resume: the exact state of the checkpoint, then the batches from that step on ------------------------------
    def resume(self) -> None:
        cfg = self.cfg
        if self.resume_from is not None:
            self.global_step = load_checkpoint(self.resume_from, self.resume_state, self.accelerator, self.model,
                                               self.optimizer, self.lr_scheduler, cfg, self.features.files)
            log.info("resumed from %s at step %d", self.resume_from, self.global_step)
            if self.global_step >= cfg.max_train_steps:
                log.info("already at step %d >= max_train_steps %d: nothing to train (raise max_train_steps to go "
                         "on)", self.global_step, cfg.max_train_steps)
        accum = cfg.gradient_accumulation_steps
        order = BatchOrder(len(self.features), cfg.train_batch_size, self.world, self.rank, cfg.seed)
        if cfg.augment_flip:
            kept = [self.records[i] for i in self.features.indices]
            self.batches = LiveBatches(kept, order, self.decoder, self.encoder, cfg, start=self.global_step * accum,
                                       stop=cfg.max_train_steps * accum, embeds=self.features.embeds,
                                       embeds_flip=self.features.embeds_flip)
        else:
            self.batches = CachedBatches(self.features, order, self.device)

    def log_header(self) -> None:
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        total_batch = cfg.train_batch_size * self.world * accum
        log.info(
            "LoRA training: %d images (%s); batch %d x %d process(es) x %d accumulation = %d; steps %d -> %d "
            "(%.1f epochs in all); LR %g (warmup %d); %d trainable parameters (rank %d, alpha %g, %d modules); "
            "device %s, frozen weights %s, mixed precision %s, gradient checkpointing %s; latents %s",
            len(self.features), ", ".join(self.classes), cfg.train_batch_size, self.world, accum, total_batch,
            self.global_step, cfg.max_train_steps, cfg.max_train_steps * total_batch / len(self.features),
            cfg.learning_rate, cfg.lr_warmup_steps, sum(p.numel() for p in self.params), cfg.rank, cfg.alpha,
            len(cfg.target_modules), self.device, str(self.dtype).replace("torch.", ""), cfg.mixed_precision.value,
            cfg.gradient_checkpointing,
            "computed every step (augment_flip)" if cfg.augment_flip else f"cached in {self.cache_dir}",
        )
        if self.accelerator.is_main_process and cfg.report_to != ReportTo.none:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in _flatten(config_dict(cfg)).items()}
            self.accelerator.init_trackers("lora", config=flat)

    # --- one optimizer step ------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """Accumulate ``gradient_accumulation_steps`` micro-batches, clip, update; returns the step's logs."""
        cfg, acc = self.cfg, self.accelerator
        accum = cfg.gradient_accumulation_steps
        step_loss = torch.zeros((), device=self.device)
        grad_norm = None
        for a in range(accum):
            micro = self.global_step * accum + a
            w0, e = self.batches.get(micro)
            gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, "noise", micro, self.rank))
            with acc.accumulate(self.model):
                loss = diffusion_loss(self.model, self.decoder.scheduler, w0, e, gen, self.decoder.latent_channels)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        self.lr_scheduler.step()
        self.global_step += 1
        mean_loss = float(acc.reduce(step_loss, "mean")) if self.world > 1 else float(step_loss)
        logs = {"loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        acc.log(logs, step=self.global_step)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {self.global_step}: lower learning_rate, or use "
                                     "mixed_precision bf16 / no; the checkpoints written so far are intact")
        return logs

    # --- checkpoints and validation ----------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        path = save_checkpoint(self.accelerator, self.model, self.optimizer, self.lr_scheduler, self.global_step,
                               self.cfg, self.features.files)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.cfg.output_dir, self.cfg.checkpoints_total_limit)
        return path

    def validate(self) -> None:
        if self.validator is not None:
            self.validator(self.global_step, self.accelerator)

    def _stop_requested(self, stop: StopFlag) -> bool:
        """Whether any process got a stop signal (all processes must checkpoint and stop at the same step)."""
        if self.world == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # --- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(output_dir=self.out, adapter=self.out / WEIGHTS_NAME, global_step=self.global_step,
                             resumed_from=self.resume_from)
        if self.global_step == 0 and cfg.validation_steps:
            self.validate()
        bar = tqdm(total=cfg.max_train_steps, initial=self.global_step, desc="lora", unit="step",
                   disable=not acc.is_local_main_process)
        with stop_on_signals() as stop:
            while self.global_step < cfg.max_train_steps:
                logs = self.step()
                result.losses.append(logs["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                stopping = self._stop_requested(stop)
                if (self.global_step % cfg.checkpointing_steps == 0 or self.global_step == cfg.max_train_steps
                        or stopping):
                    bar.write(f"step {self.global_step}: checkpoint {self.checkpoint()}")
                if cfg.validation_steps and (self.global_step % cfg.validation_steps == 0
                                             or self.global_step == cfg.max_train_steps):
                    self.validate()
                acc.wait_for_everyone()
                if stopping:
                    result.stopped_early = True
                    break
        bar.close()
        result.global_step = self.global_step
        result.decoder = self.decoder
        self.decoder.unet.eval()
        if not result.stopped_early and acc.is_main_process:
            self._save_final_adapter()
        acc.wait_for_everyone()
        acc.end_training()
        return result

    def _save_final_adapter(self) -> None:
        try:
            path = save_lora(self.accelerator.unwrap_model(self.model), self.out)
        except OSError as err:
            raise CheckpointError(f"could not write the final adapter to {self.out} ({err}); the last checkpoint "
                                  "holds the same weights (lora.step in the edit config)") from err
        log.info("adapter written to %s (edit with lora.path: %s)", path, self.out)


def train_lora(cfg: LoraTrainConfig, interrupt: bool = True) -> TrainResult:
    """The whole run: setup, resume, the loop, the final adapter.

    A SIGINT / SIGTERM finishes the step, writes a checkpoint and stops without writing the final adapter (the run
    is not finished). With ``interrupt`` (the command line), that stop then raises :class:`RunInterrupted`, so the
    command exits 130 and ``train && eval`` does not go on with a partial adapter; in-process callers may pass False
    and read ``TrainResult.stopped_early``.
    """
    trainer = LoraTrainer(cfg)
    try:
        trainer.setup()
        trainer.resume()
        trainer.log_header()
        result = trainer.run()
    finally:
        trainer.close()
    if result.stopped_early and interrupt:
        raise RunInterrupted(
            f"stopped at step {result.global_step} of {cfg.max_train_steps}: checkpoint-{result.global_step} is in "
            f"{cfg.output_dir}; the final adapter was not written. Rerun the same command (resume_from_checkpoint="
            "latest) to continue.")
    return result
