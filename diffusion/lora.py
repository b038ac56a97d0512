"""LoRA adapters on the decoder UNet: one format, diffusers' ``save_lora_adapter`` / ``load_lora_adapter`` with
safetensors (``pytorch_lora_weights.safetensors`` in a folder, the LoraConfig in its metadata). Training attaches and
writes it (:func:`add_lora`, :func:`save_lora`), editing loads it (:func:`load_lora`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from diffusion.errors import ConfigError
from diffusion.files import make_dirs, output_error

log = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "domain"


def lora_config(rank: int, alpha: float, target_modules: Sequence[str]) -> LoraConfig:
    """The paper's adapter: LoRA of rank r, scaling alpha/r, gaussian init, on the UNet's attention projections."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, target_modules: Sequence[str]) -> List[str]:
    """Freeze ``unet`` and attach a fresh trainable adapter (PEFT ``LoraConfig`` through ``unet.add_adapter``).

    Returns the names of the trainable parameters. A target module name that matches no layer of this UNet is a
    ConfigError (PEFT would otherwise train the layers the other names match and say nothing).
    """
    module_names = [name for name, _ in unet.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        leaves = sorted({leaf for leaf in (n.rsplit(".", 1)[-1] for n in module_names)
                         if leaf.startswith(("to_", "add_"))})
        raise ConfigError(
            f"target_modules {missing} match no layer of this decoder UNet; its attention projections are "
            f"{', '.join(leaves) or '(none)'} (the output projection is to_out.0)"
        )
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, target_modules), adapter_name=ADAPTER_NAME)
    return [n for n, p in unet.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def _quiet_diffusers_dtype_warning() -> Iterator[None]:
    """``save_lora_adapter`` calls ``unet.to(dtype=None)``, which logs a float32-modules warning on every save."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_lora(unet: UNet2DConditionModel, folder: str | Path) -> Path:
    """Write the UNet's adapter as ``folder/pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_adapter``).

    Atomic: written into a temporary folder beside it, then renamed over the old file, so a crash or a full disk
    never leaves a half-written adapter. ``unet`` must be unwrapped (``accelerator.unwrap_model``).
    """
    folder = make_dirs(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    except OSError as err:
        raise output_error(folder, err, "write into") from err
    try:
        with _quiet_diffusers_dtype_warning():
            unet.save_lora_adapter(str(tmp), adapter_name=ADAPTER_NAME, safe_serialization=True)
        os.replace(tmp / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    except OSError as err:
        raise output_error(folder / WEIGHTS_NAME, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHTS_NAME


def lora_state_dict(unet: UNet2DConditionModel) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under the keys the adapter file uses (no adapter name in them)."""
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def restore_lora_weights(unet: UNet2DConditionModel, file: str | Path) -> None:
    """Copy the tensors of an adapter file into the adapter already attached by :func:`add_lora` (exactly: resume).

    Raises ConfigError when the file's tensors and the attached adapter's do not match one to one.
    """
    from diffusion.files import load_tensors

    state = load_tensors(file, "Resume from another checkpoint (resume_from_checkpoint=latest skips damaged ones).")
    own = lora_state_dict(unet)
    extra, lacking = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if extra or lacking or wrong:
        raise ConfigError(
            f"{file}: the saved adapter does not match the one configured (rank, alpha, target_modules): "
            f"{len(extra)} unknown tensors (e.g. {extra[:2]}), {len(lacking)} missing (e.g. {lacking[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]}). Resume with the config the checkpoint was made with."
        )
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)


def adapter_dir(path: str | Path, step: Optional[int] = None) -> Path:
    """The folder holding the adapter: ``path`` itself, or ``path/checkpoint-<step>``; errors list what exists."""
    base = Path(path)
    folder = base / f"checkpoint-{step}" if step is not None else base
    if (folder / WEIGHTS_NAME).is_file():
        from diffusion.files import tensors_metadata

        tensors_metadata(folder / WEIGHTS_NAME, "Retrain it, or use another checkpoint (lora.step).")
    else:
        found = sorted(p.name for p in base.glob("checkpoint-*") if (p / WEIGHTS_NAME).is_file())
        raise ConfigError(
            f"lora: no {WEIGHTS_NAME} in {folder}. "
            + (f"Checkpoints found in {base}: {', '.join(found)} (set lora.step to one of their numbers)."
               if found else f"{base} holds no checkpoint-<step> folders; train one with kandinsky_lora_train.py.")
        )
    return folder


def _file_keys(file: Path) -> List[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def load_lora(unet: UNet2DConditionModel, path: str | Path, step: Optional[int] = None, scale: float = 1.0) -> Path:
    """Load the adapter of ``path`` (or its checkpoint ``step``) into ``unet`` as the active adapter at ``scale``.

    An adapter whose target modules or rank do not fit this UNet raises a ConfigError naming the folder: tensors of
    another shape, or tensors for layers this UNet does not have (diffusers would only warn and load the rest).
    """
    folder = adapter_dir(path, step)
    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise ConfigError(f"lora: this UNet already holds an adapter named '{ADAPTER_NAME}'; load into a fresh one")
    try:
        unet.load_lora_adapter(str(folder), prefix=None, use_safetensors=True, adapter_name=ADAPTER_NAME)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln or "not found" in ln), lines[0] if lines else "")
        raise ConfigError(
            f"lora: the adapter in {folder} does not fit this decoder UNet ({detail[:300]}). "
            "It was trained for another model (model.decoder) or with other target modules / rank."
        ) from err
    unloaded = sorted(set(_file_keys(folder / WEIGHTS_NAME)) - set(lora_state_dict(unet)))
    if unloaded:
        unet.delete_adapters(ADAPTER_NAME)
        raise ConfigError(
            f"lora: the adapter in {folder} has {len(unloaded)} tensors for layers this decoder UNet does not have "
            f"(e.g. {unloaded[0]}). It was trained for another model (model.decoder) or with other target modules."
        )
    unet.set_adapters([ADAPTER_NAME], weights=[scale])
    log.info("LoRA adapter loaded from %s (scale %g)", folder, scale)
    return folder
