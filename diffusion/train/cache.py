"""The training features that never change without augmentation, computed once and cached on disk.

Each training image x gives its MoVQ latent w_0 = MoVQ(x) and its CLIP embedding e = CLIP(x); both models are frozen,
so without augmentation these are constants and a training step needs only the UNet. They are stored as safetensors,
one file per kind, keyed by a fingerprint of the weights that made them and of the image files they came from, so any
run on the same model and data (another output_dir, a resumed run, another LR) reuses them:

    latents-<key>.safetensors       "values" (N, C, h, w) float32: w_0 (not used with augment_flip: flips vary)
    embeds-<key>.safetensors        "values" (N, D) float32: e
    embeds_flip-<key>.safetensors   "values" (N, D) float32: CLIP(flip(x)) (only with augment_flip)

Row i of every kind belongs to the i-th readable image; the file's metadata holds the image list (relative to the
data root) and the key material, readable with any safetensors tool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from datasets.folder import DatasetLayoutError, ImageRecord
from diffusion.config import DataConfig
from diffusion.data import make_loader
from diffusion.files import atomic_save, relative_path
from diffusion.models import Decoder, ImageEncoder, weights_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
KINDS = ("latents", "embeds", "embeds_flip")


@dataclass
class Features:
    """Cached features of the readable training images, in record order (unreadable files skipped)."""

    indices: List[int]  # position of each row's image in the records the cache was built from
    files: List[str]  # each row's image, relative to the data root
    latents: Optional[torch.Tensor]  # (N, C, h, w) float32, or None when not requested
    embeds: torch.Tensor  # (N, D) float32
    embeds_flip: Optional[torch.Tensor]  # (N, D) float32, or None when not requested

    def __len__(self) -> int:
        return len(self.files)


def data_fingerprint(records: Sequence[ImageRecord], root: Path) -> List[list]:
    """[relative path, size, modification time] of every candidate image: a changed or moved file is another key."""
    out = []
    for r in records:
        st = os.stat(r.path)
        out.append([relative_path(r.path, root), st.st_size, st.st_mtime_ns])
    return out


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def key_materials(decoder: Decoder, encoder: ImageEncoder, records: Sequence[ImageRecord], root: Path,
                  data: DataConfig) -> Dict[str, dict]:
    """What each kind's key hashes: the weights and dtype that computed it, image size, files and background."""
    common = {
        "format": CACHE_FORMAT,
        "image_size": decoder.image_size,
        "background": list(data.background),
        "files": data_fingerprint(records, root),
    }
    movq = {"movq": weights_fingerprint(decoder.movq), "dtype": str(decoder.movq.dtype)}
    clip = {"image_encoder": weights_fingerprint(encoder.model), "dtype": str(encoder.dtype),
            "processor": encoder.processor.to_dict()}
    return {"latents": {**common, **movq, "kind": "latents"},
            "embeds": {**common, **clip, "kind": "embeds"},
            "embeds_flip": {**common, **clip, "kind": "embeds_flip"}}


def _read_entry(path: Path) -> Optional[dict]:
    """{"values", "indices", "files"} of a complete cache file, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        return {"values": tensors["values"], "indices": tensors["indices"].tolist(), "files": json.loads(meta["files"])}
    except Exception as err:  # a foreign or damaged file: recompute it rather than stop
        log.warning("feature cache %s is unreadable (%s); recomputing it", path, err)
        return None


def _write_entry(path: Path, values: torch.Tensor, indices: List[int], files: List[str], material: dict) -> None:
    """Write one cache file atomically (temporary file, then rename)."""
    tensors = {"values": values.contiguous(), "indices": torch.tensor(indices, dtype=torch.long)}
    meta = {"files": json.dumps(files), "key_material": json.dumps(material, sort_keys=True)}
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@torch.no_grad()
def compute_features(decoder: Decoder, encoder: ImageEncoder, records: Sequence[ImageRecord], positions: List[int],
                     data: DataConfig, kinds: Sequence[str], batch_size: int, desc: str,
                     show_progress: bool = True) -> Dict[str, torch.Tensor]:
    """The requested kinds for ``records[p]`` of every p in ``positions``, in one pass over the images.

    Returns {"indices": (n,) long of the readable positions, kind: values on the CPU, ...}.
    """
    loader = make_loader([records[p] for p in positions], data, decoder.image_size, batch_size)
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("indices", *kinds)}
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not show_progress):
        if batch is None:  # every image of the batch was unreadable (on_bad_file: skip)
            continue
        x = batch["pixel_values"]  # (B, 3, H, W) in [0, 1]
        parts["indices"].append(torch.tensor([positions[i] for i in batch["index"].tolist()], dtype=torch.long))
        if "latents" in kinds:
            parts["latents"].append(decoder.encode(x).cpu())
        if "embeds" in kinds:
            parts["embeds"].append(encoder.embed(x).cpu())
        if "embeds_flip" in kinds:
            parts["embeds_flip"].append(encoder.embed(x.flip(-1)).cpu())
    if not parts["indices"]:
        return {"indices": torch.zeros(0, dtype=torch.long)}
    return {k: torch.cat(v) for k, v in parts.items()}


def load_or_build_features(decoder: Decoder, encoder: ImageEncoder, records: Sequence[ImageRecord], root: Path,
                           data: DataConfig, cache_dir: Path, kinds: Sequence[str], batch_size: int,
                           state) -> Features:
    """The cached features of ``records`` (computing and caching the missing kinds first).

    ``state`` is accelerate's PartialState: with several processes each computes a share of the images, the main
    process merges the shares and writes the files, every process then reads them.
    """
    materials = key_materials(decoder, encoder, records, root, data)
    paths = {k: cache_dir / f"{k}-{cache_key(materials[k])}.safetensors" for k in kinds}
    entries = {k: _read_entry(paths[k]) for k in kinds}
    present = [k for k in kinds if entries[k] is not None]
    if len({tuple(entries[k]["files"]) for k in present}) > 1:  # images became unreadable since: redo all
        present = []
    missing = [k for k in kinds if k not in present]
    state.wait_for_everyone()  # nobody writes before everyone has looked
    if missing:
        log.info("feature cache: computing %s for %d images (cache %s)", ", ".join(missing), len(records), cache_dir)
        _build(decoder, encoder, records, root, data, missing, materials, paths, batch_size, state)
        entries.update({k: _read_entry(paths[k]) for k in missing})
    else:
        log.info("feature cache: %s of %d images read from %s", ", ".join(kinds), len(entries[kinds[0]]["files"]),
                 cache_dir)
    first = entries[kinds[0]]
    if first is None:
        raise DatasetLayoutError(f"none of the {len(records)} training images under {root} could be read "
                                 "(see the warnings above)")
    if any(entries[k] is None or entries[k]["files"] != first["files"] for k in kinds):
        raise RuntimeError(f"feature cache {cache_dir}: the cache files disagree on the images; delete them and rerun")
    return Features(
        indices=first["indices"], files=first["files"],
        latents=entries["latents"]["values"] if "latents" in kinds else None,
        embeds=entries["embeds"]["values"],
        embeds_flip=entries["embeds_flip"]["values"] if "embeds_flip" in kinds else None,
    )


def _build(decoder: Decoder, encoder: ImageEncoder, records: Sequence[ImageRecord], root: Path, data: DataConfig,
           kinds: List[str], materials: Dict[str, dict], paths: Dict[str, Path], batch_size: int, state) -> None:
    rank, world = state.process_index, state.num_processes
    partial = paths[kinds[0]].parent / f".partial-{paths[kinds[0]].stem}"
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    state.wait_for_everyone()
    share = list(range(rank, len(records), world))
    part = compute_features(decoder, encoder, records, share, data, kinds, batch_size,
                            desc=f"cache {'+'.join(kinds)}", show_progress=state.is_local_main_process)
    save_file({k: v.contiguous() for k, v in part.items()}, str(partial / f"part-{rank}.safetensors"))
    state.wait_for_everyone()
    if state.is_main_process:
        shares = [load_file(str(partial / f"part-{r}.safetensors")) for r in range(world)]
        indices = torch.cat([s["indices"] for s in shares])
        order = torch.argsort(indices)
        kept = indices[order].tolist()
        files = [relative_path(records[i].path, root) for i in kept]
        for k in kinds if kept else ():  # no readable image: no file, load_or_build_features says so
            values = torch.cat([s[k] for s in shares if k in s])[order]
            _write_entry(paths[k], values, kept, files, materials[k])
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
