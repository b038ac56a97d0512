"""LoRA adapters on the decoder UNet: one format, diffusers' ``save_lora_adapter`` / ``load_lora_adapter`` with
safetensors (``pytorch_lora_weights.safetensors`` in a folder). Training writes it, editing loads it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from diffusers import UNet2DConditionModel
from peft import LoraConfig

from diffusion.config import ConfigError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "domain"


def lora_config(rank: int, alpha: float, target_modules: Sequence[str]) -> LoraConfig:
    """The paper's adapter: LoRA of rank r, scaling alpha/r, gaussian init, on the UNet's attention projections."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))


def adapter_dir(path: str | Path, step: Optional[int] = None) -> Path:
    """The folder holding the adapter: ``path`` itself, or ``path/checkpoint-<step>``; errors list what exists."""
    base = Path(path)
    folder = base / f"checkpoint-{step}" if step is not None else base
    if not (folder / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in base.glob("checkpoint-*")) if base.is_dir() else []
        raise ConfigError(
            f"lora: no {WEIGHTS_NAME} in {folder}. "
            + (f"Checkpoints found in {base}: {', '.join(found)} (set lora.step to one of their numbers)."
               if found else f"{base} holds no checkpoint-<step> folders; train one with kandinsky_lora_train.py.")
        )
    return folder


def load_lora(unet: UNet2DConditionModel, path: str | Path, step: Optional[int] = None, scale: float = 1.0) -> Path:
    """Load the adapter of ``path`` (or its checkpoint ``step``) into ``unet`` as the active adapter at ``scale``.

    An adapter whose target modules or rank do not fit this UNet raises a ConfigError naming the folder.
    """
    folder = adapter_dir(path, step)
    try:
        unet.load_lora_adapter(str(folder), prefix=None, use_safetensors=True, adapter_name=ADAPTER_NAME)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(
            f"lora: the adapter in {folder} does not fit this decoder UNet ({str(err).splitlines()[0][:300]}). "
            "It was trained for another model (model.decoder) or with other target modules / rank."
        ) from err
    unet.set_adapters([ADAPTER_NAME], weights=[scale])
    log.info("LoRA adapter loaded from %s (scale %g)", folder, scale)
    return folder
