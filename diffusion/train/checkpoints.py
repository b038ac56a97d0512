"""Checkpoints of a LoRA run: written atomically, pruned, found and restored exactly (no pickle anywhere).

``output_dir/checkpoint-<step>/`` holds the adapter (``pytorch_lora_weights.safetensors``, loadable by
``unet.load_lora_adapter``), the optimizer state (safetensors + JSON), the LR schedule, the grad scaler, every
process's RNG state and the step (``training_state.json``, written last: it marks the folder complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from diffusion.config import LoraTrainConfig, config_dict, result_keys_changed
from diffusion.errors import ArtefactError, CheckpointError, ConfigError
from diffusion.files import fsync_files, load_tensors, read_json
from diffusion.lora import WEIGHTS_NAME, restore_lora_weights, save_lora

log = logging.getLogger(__name__)

STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FORMAT = 1


def list_checkpoints(output_dir: str | Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>/`` with its training state), oldest first."""
    base = Path(output_dir)
    found = []
    for p in base.iterdir() if base.is_dir() else ():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from (a damaged or foreign file), or None when it is intact."""
    from diffusion.files import read_json, tensors_metadata

    try:
        state = read_json(folder / STATE_NAME, "")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "global_step" not in state:
            return f"{folder / STATE_NAME} is not a training state of format {STATE_FORMAT}"
        for name in (WEIGHTS_NAME, OPTIMIZER_NAME):
            tensors_metadata(folder / name, "")
        for rng in folder.glob("rng_state_*.safetensors"):
            tensors_metadata(rng, "")
    except ArtefactError as err:
        return str(err).split(". ")[0].strip()
    return None


def resolve_resume(cfg: LoraTrainConfig) -> Optional[Path]:
    """The checkpoint to continue from: for ``latest`` the newest intact one (a damaged newer one is skipped with a
    warning; None when there is none yet), or the given path.

    Raises ConfigError for a path that is not a complete, intact checkpoint, and when output_dir holds checkpoints
    but resume_from_checkpoint is null (a fresh run would overwrite and prune them).
    """
    existing = list_checkpoints(cfg.output_dir)
    if cfg.resume_from_checkpoint is None:
        if existing:
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds checkpoints ({', '.join(p.name for _, p in existing[-3:])}"
                "). Set resume_from_checkpoint=latest to continue that run, or use a new output_dir.",
                key="resume_from_checkpoint")
        return None
    if cfg.resume_from_checkpoint == "latest":
        if not existing:
            log.info("resume_from_checkpoint: latest, but %s holds no checkpoint yet: starting a new run",
                     cfg.output_dir)
            return None
        for step, path in reversed(existing):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("%s is damaged (%s): resuming from the previous complete checkpoint instead", path.name,
                        problem)
        raise ConfigError(f"every checkpoint in {cfg.output_dir} is damaged ({', '.join(p.name for _, p in existing)}"
                          "): delete them to start over, or use a new output_dir", key="resume_from_checkpoint")
    path = Path(cfg.resume_from_checkpoint)
    if not (path / STATE_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {STATE_NAME})"
        raise ConfigError(
            f"resume_from_checkpoint: {path} {what}. Complete checkpoints in {cfg.output_dir}: "
            f"{', '.join(p.name for _, p in existing) or '(none)'}; or use resume_from_checkpoint=latest.",
            key="resume_from_checkpoint")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint: {path} is damaged ({problem}). Resume from an earlier one, or use "
                          "resume_from_checkpoint=latest, which skips damaged checkpoints", key="resume_from_checkpoint")
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
            fsync_files(tmp)
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


def read_training_state(folder: Path, cfg: LoraTrainConfig) -> dict:
    """The checkpoint's training state, checked against ``cfg`` before any model loads: only run-control keys
    (LoraTrainConfig.RUN_CONTROL_KEYS) may differ, or the resumed run would not continue the same computation."""
    state = read_json(folder / STATE_NAME, "Resume from another checkpoint (resume_from_checkpoint=latest skips "
                                           "damaged ones).")
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{folder}: training state format {state.get('format')} is not {STATE_FORMAT}")
    changed = result_keys_changed(LoraTrainConfig, state["config"], config_dict(cfg))
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
    fix = "Resume from another checkpoint (resume_from_checkpoint=latest skips damaged ones)."
    restore_lora_weights(accelerator.unwrap_model(unet), folder / WEIGHTS_NAME)
    optimizer.load_state_dict(_optimizer_state(load_tensors(folder / OPTIMIZER_NAME, fix), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng = folder / f"rng_state_{accelerator.process_index}.safetensors"
    if rng.is_file():
        _set_rng_state(load_tensors(rng, fix))
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
