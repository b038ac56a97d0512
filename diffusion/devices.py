"""The one place where a configured device and dtype become torch objects."""

from __future__ import annotations

import torch

from diffusion.config import DType
from diffusion.errors import ConfigError

DTYPES = {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given, checked to exist (the error names ``key``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = '{name}' but CUDA is not available here; use {key}=cpu or auto", key=key)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})", key=key)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} = 'mps' but MPS is not available here; use {key}=cpu or auto", key=key)
    return dev


def resolve_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 elsewhere."""
    dtype = DType(dtype)
    if dtype == DType.auto:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
