"""Class directions in CLIP image-embedding space, and the per-class embedding files they are computed from.

    mu_c = mean_i( e_i / ||e_i|| )                                   (train split of class c; not renormalised)
    e'   = ||e|| * ( e / ||e|| + eta * (mu_target - mu_source) )     (not renormalised)

Embedding files: ``<embeds_dir>/<class>.safetensors`` holds one tensor ``embeds`` (N, D) float32 with string metadata;
``<class>.json`` beside it holds the same metadata and the list of source files, row i <-> files[i].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from diffusion.errors import ArtefactError, EmbeddingsError
from diffusion.files import atomic_save, atomic_write_text, make_dirs

log = logging.getLogger(__name__)

EMBEDS_KEY = "embeds"
FORMAT_VERSION = "1"


def class_mean(embeds: torch.Tensor, num_images: Optional[int] = None) -> torch.Tensor:
    """mu = mean over the first ``num_images`` rows of e_i / ||e_i||: (N, D) -> (D,) float32 (not renormalised)."""
    if embeds.dim() != 2 or embeds.shape[0] == 0:
        raise EmbeddingsError(f"expected a non-empty (N, D) embedding matrix, got shape {tuple(embeds.shape)}")
    e = embeds[:num_images].float()
    return (e / e.norm(dim=1, keepdim=True)).mean(dim=0)


def edit_embedding(e: torch.Tensor, mu_source: torch.Tensor, mu_target: torch.Tensor,
                   eta: float | torch.Tensor) -> torch.Tensor:
    """e' = ||e|| (e/||e|| + eta (mu_target - mu_source)) for e: (B, D); eta a float or (B,). Returns (B, D) float32.

    eta = 0 returns e; eta > 0 moves towards the target class, eta < 0 away from it.
    """
    e = e.float()
    eta_t = torch.as_tensor(eta, dtype=torch.float32, device=e.device).reshape(-1, 1)
    norm = e.norm(dim=1, keepdim=True)
    direction = (mu_target - mu_source).float().to(e.device).reshape(1, -1)
    return norm * (e / norm + eta_t * direction)


def embeds_paths(embeds_dir: str | Path, class_name: str) -> Tuple[Path, Path]:
    base = Path(embeds_dir)
    return base / f"{class_name}.safetensors", base / f"{class_name}.json"


def save_class_embeds(embeds_dir: str | Path, class_name: str, embeds: torch.Tensor, files: Sequence[str],
                      meta: Dict[str, str], skipped: Sequence[str] = ()) -> Path:
    """Write ``<class>.safetensors`` and ``<class>.json`` atomically (temporary files, then rename; the JSON last,
    so a class counts as complete only when both exist)."""
    if embeds.shape[0] != len(files):
        raise EmbeddingsError(f"{class_name}: {embeds.shape[0]} embeddings for {len(files)} files")
    tensor_path, json_path = embeds_paths(embeds_dir, class_name)
    make_dirs(tensor_path.parent)
    meta = {**{k: str(v) for k, v in meta.items()}, "class_name": class_name, "num_images": str(len(files)),
            "embed_dim": str(embeds.shape[1]), "format_version": FORMAT_VERSION}
    tensors = {EMBEDS_KEY: embeds.float().contiguous().cpu()}
    atomic_save(tensor_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write_text(json_path, json.dumps({**meta, "files": list(files), "skipped": list(skipped)}, indent=1))
    return tensor_path


def caller_meta(meta: dict) -> Dict[str, str]:
    """The metadata a caller gave :func:`save_class_embeds`, from a sidecar: without the keys it adds itself."""
    own = ("class_name", "num_images", "embed_dim", "format_version", "files", "skipped")
    return {k: v for k, v in meta.items() if k not in own}


def read_class_meta(embeds_dir: str | Path, class_name: str) -> Optional[dict]:
    """The sidecar JSON of a complete class, or None when the class has not been written (completely) yet; a
    damaged sidecar is an ArtefactError naming it."""
    from diffusion.files import read_json

    tensor_path, json_path = embeds_paths(embeds_dir, class_name)
    if not (tensor_path.is_file() and json_path.is_file()):
        return None
    meta = read_json(json_path, f"Delete {json_path.name} and {tensor_path.name} and rerun scripts/save_embeds.py "
                                "(or the editing run with compute_missing_embeds=true).")
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), list):
        raise ArtefactError(f"{json_path} is not an embeddings sidecar (no 'files' list). Delete it and "
                            f"{tensor_path.name} and rerun scripts/save_embeds.py.")
    return meta


def tensor_rows(embeds_dir: str | Path, class_name: str) -> int:
    """The number of rows of a class's tensor file, read from its header (cheap); ArtefactError when damaged."""
    from diffusion.files import load_tensors

    tensor_path, _ = embeds_paths(embeds_dir, class_name)
    tensors = load_tensors(tensor_path, "Delete it and rerun scripts/save_embeds.py.")
    if EMBEDS_KEY not in tensors:
        raise ArtefactError(f"{tensor_path} holds no '{EMBEDS_KEY}' tensor: not an embeddings file. Delete it and "
                            "rerun scripts/save_embeds.py.")
    return int(tensors[EMBEDS_KEY].shape[0])


def load_class_embeds(embeds_dir: str | Path, class_name: str, expected_dim: Optional[int] = None,
                      expected_encoder: Optional[str] = None) -> Tuple[torch.Tensor, dict]:
    """(embeds (N, D) float32, sidecar metadata incl. ``files``). Clear errors when a file is missing or damaged,
    when the rows and the file list disagree, and when the embeddings were made by another image encoder: another
    width (``expected_dim``) or other weights (``expected_encoder``, the fingerprint of the run's encoder)."""
    from diffusion.files import load_tensors

    tensor_path, json_path = embeds_paths(embeds_dir, class_name)
    meta = read_class_meta(embeds_dir, class_name)
    redo = ("Recompute them: python scripts/save_embeds.py --config_path <embeds config> overwrite=true, or set "
            "compute_missing_embeds=true in the editing run after deleting the class's two files.")
    if meta is None:
        found = sorted(p.name for p in Path(embeds_dir).glob("*.safetensors")) if Path(embeds_dir).is_dir() else []
        raise EmbeddingsError(
            f"no complete embeddings for class '{class_name}' in {embeds_dir} (need {tensor_path.name} and "
            f"{json_path.name}; found {found or 'nothing'}). Run scripts/save_embeds.py for this dataset first, or "
            "set compute_missing_embeds=true."
        )
    tensors = load_tensors(tensor_path, redo)
    if EMBEDS_KEY not in tensors:
        raise ArtefactError(f"{tensor_path} holds no '{EMBEDS_KEY}' tensor. {redo}")
    embeds = tensors[EMBEDS_KEY].float()
    if embeds.dim() != 2 or embeds.shape[0] != len(meta["files"]):
        raise EmbeddingsError(f"{tensor_path}: {tuple(embeds.shape)} embeddings but {len(meta['files'])} files in "
                              f"{json_path.name}. {redo}")
    if not torch.isfinite(embeds).all():
        raise EmbeddingsError(f"{tensor_path} holds NaN or infinite embeddings. {redo}")
    if expected_dim is not None and embeds.shape[1] != expected_dim:
        raise EmbeddingsError(
            f"{tensor_path}: embeddings are {embeds.shape[1]}-d but the model's image encoder gives {expected_dim}-d "
            f"(they were made with '{meta.get('model')}'). {redo}"
        )
    made_by = meta.get("encoder_fingerprint")
    if expected_encoder is not None and made_by is not None and made_by != expected_encoder:
        raise EmbeddingsError(
            f"{tensor_path} was made by another image encoder (weights {made_by}, from '{meta.get('model')}'); this "
            f"run's encoder is {expected_encoder} (model.prior). Class means from another encoder would point in a "
            f"meaningless direction. {redo}")
    if expected_encoder is not None and made_by is None:
        log.warning("%s records no encoder fingerprint (written by an older version): cannot check that it was made "
                    "by this run's image encoder ('%s'); compute_missing_embeds=true (or scripts/save_embeds.py) "
                    "checks it against the encoder once and records the fingerprint", tensor_path, meta.get("model"))
    return embeds, meta


def load_class_means(embeds_dir: str | Path, classes: Sequence[str], expected_dim: Optional[int] = None,
                     num_images: Optional[int] = None,
                     expected_encoder: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """mu_c for each class from its embedding file (first ``num_images`` rows, in the file's sorted order), checked
    as :func:`load_class_embeds` does."""
    return {c: class_mean(load_class_embeds(embeds_dir, c, expected_dim, expected_encoder)[0], num_images)
            for c in classes}


def mean_geometry(means: Dict[str, torch.Tensor]) -> List[dict]:
    """Distance and cosine between every pair of class means: a guide for choosing eta."""
    names = list(means)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ma, mb = means[a], means[b]
            out.append({"a": a, "b": b, "distance": float((ma - mb).norm()),
                        "cosine": float(torch.nn.functional.cosine_similarity(ma, mb, dim=0))})
    return out
