"""DIFFusion: minimal, identity-preserving counterfactual edits between image classes with the Kandinsky 2.2 decoder,
for teaching people subtle visual differences (Chiquier et al., arXiv 2504.08046). The method: docs/method.md.

The public API (imported on first use, so ``import diffusion.config`` stays light and a bad config fails fast)::

    from diffusion import DIFFusionPipeline, ClassDirection, Inversion, load_oracle

Subpackages by program: ``edit`` (the engine and the editing run), ``train`` (LoRA domain tuning), ``oracle``
(classifier ensembles: train, save, load), ``views`` (images and pages for people), ``demo`` (the tiny test model and
the offline demo model). Shared modules: ``config`` (schemas), ``models`` (loading, MoVQ and CLIP steps),
``inversion`` (the pure math), ``embeddings`` (class means, e'), ``lora`` (the adapter format), ``metrics``,
``files`` (atomic writes, guarded reads), ``errors`` (what a user can act on).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "DIFFusionPipeline", "DIFFusionOutput", "ClassDirection", "Edit", "Inversion", "FlipCriterion", "load_oracle",
    "load_config", "EditConfig", "LoraTrainConfig", "EmbedsConfig", "ClassifierConfig", "ModelConfig", "DataConfig",
]

_WHERE = {
    "DIFFusionPipeline": "diffusion.pipeline", "DIFFusionOutput": "diffusion.pipeline",
    "ClassDirection": "diffusion.pipeline", "Edit": "diffusion.pipeline", "Inversion": "diffusion.edit.editor",
    "FlipCriterion": "diffusion.edit.search", "load_oracle": "diffusion.oracle.members",
    "load_config": "diffusion.config", "EditConfig": "diffusion.config", "LoraTrainConfig": "diffusion.config",
    "EmbedsConfig": "diffusion.config", "ClassifierConfig": "diffusion.config", "ModelConfig": "diffusion.config",
    "DataConfig": "diffusion.config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffusion' has no attribute '{name}'")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
