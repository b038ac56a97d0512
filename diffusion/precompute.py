"""scripts/save_embeds.py's work: the CLIP image embedding of every image of a split, one file per class."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from diffusion.config import EmbedsConfig
from diffusion.data import dataset_classes, make_loader, split_records
from diffusion.embeddings import caller_meta, load_class_embeds, read_class_meta, save_class_embeds, tensor_rows
from diffusion.errors import ArtefactError, EmbeddingsError
from diffusion.files import relative_path, run_lock
from diffusion.runinfo import stamp_run_dir
from diffusion.models import ImageEncoder, decoder_image_size, load_image_encoder

log = logging.getLogger(__name__)


def _is_complete(meta: dict, expected: Dict[str, str], candidates: List[str], where: Path) -> bool:
    """True when an existing class file was made from the same model, split, image size and files; an existing file
    made from something else is an error rather than a silent reuse or a silent overwrite. (Keys an older file does
    not record are not compared.)"""
    for key, value in expected.items():
        if key in meta and meta.get(key) != value:
            raise EmbeddingsError(
                f"{where}: was written with {key} = '{meta.get(key)}', this run has '{value}'. Recompute it with "
                "python scripts/save_embeds.py --config_path <embeds config> overwrite=true, or point the run at "
                "another embeddings folder (output_dir of save_embeds, embeds_dir of an editing run)."
            )
    return sorted(meta["files"] + meta.get("skipped", [])) == sorted(candidates)


def _intact(out: Path, c: str, meta: dict, encoder: Optional[ImageEncoder]) -> bool:
    """A complete-looking class is really usable: its tensor file reads and has one row per listed file, and (when
    the encoder is loaded) it was made by that encoder. A damaged file is recomputed, with a warning."""
    try:
        rows = tensor_rows(out, c)
    except ArtefactError as err:
        log.warning("class %s: %s; recomputing it", c, str(err).split(";")[0])
        return False
    if rows != len(meta["files"]):
        log.warning("class %s: %s has %d rows for %d files (an interrupted write?); recomputing it", c,
                    out / f"{c}.safetensors", rows, len(meta["files"]))
        return False
    made_by = meta.get("encoder_fingerprint")
    if encoder is not None and made_by is not None and made_by != encoder.fingerprint:
        raise EmbeddingsError(
            f"{out / (c + '.json')}: made by another image encoder (weights {made_by}; this one {encoder.fingerprint}, "
            f"model.prior '{meta.get('model')}'). Recompute with python scripts/save_embeds.py --config_path <embeds "
            "config> overwrite=true, or use another embeddings folder.")
    return True


SAME_ENCODER_COSINE = 0.999  # row by row: the same encoder on another device or dtype stays above it, another does not


def _adopt_legacy(encoder: ImageEncoder, cfg: EmbedsConfig, records, root: Path, image_size: int, out: Path, c: str,
                  meta: dict) -> None:
    """A class file written before files recorded their encoder's fingerprint: embed its images again and compare.
    The same embeddings are kept as they are and get this encoder's fingerprint written in; others are refused, as
    they came from another encoder. The stored embeddings are never replaced."""
    stored, _ = load_class_embeds(out, c)
    by_file = {relative_path(r.path, root): r for r in records}
    again, kept, _ = embed_class(encoder, cfg, [by_file[f] for f in meta["files"]], image_size, desc=f"check {c}")
    worst = float(torch.nn.functional.cosine_similarity(stored, again.float().cpu(), dim=1).min()) \
        if len(kept) == len(meta["files"]) else -1.0
    if worst < SAME_ENCODER_COSINE:
        raise EmbeddingsError(
            f"{out / (c + '.json')}: written by an older version without an encoder fingerprint, and this run's image "
            f"encoder (model.prior '{cfg.model.prior}') gives other embeddings for its images (worst cosine "
            f"{worst:.3f}): it was made by another encoder. Recompute with python scripts/save_embeds.py "
            "--config_path <embeds config> overwrite=true, or use another embeddings folder.")
    stamped = {**caller_meta(meta), "encoder_fingerprint": encoder.fingerprint}
    save_class_embeds(out, c, stored, meta["files"], meta=stamped, skipped=meta.get("skipped", []))
    log.info("class %s: embeddings written by an older version match this encoder (worst cosine %.4f); its fingerprint "
             "is now recorded", c, worst)


def embed_class(encoder: ImageEncoder, cfg: EmbedsConfig, records, image_size: int, desc: str):
    """(embeds (N, D), files kept, files skipped) for one class, batched, in the records' order."""
    loader = make_loader(records, cfg.data, image_size, cfg.batch_size)
    rows, kept = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        if batch is None:
            continue
        rows.append(encoder.embed(batch["pixel_values"]).cpu())
        kept += list(batch["path"])
    if not rows:
        raise EmbeddingsError(f"{desc}: no readable image (see the warnings above)")
    skipped = sorted({str(r.path) for r in records} - set(kept))
    return torch.cat(rows), kept, skipped


def save_embeddings(cfg: EmbedsConfig, encoder: Optional[ImageEncoder] = None, stamp: bool = False) -> Dict[str, Path]:
    """Embed every image of ``cfg.split`` (default the train split) of every class into ``output_dir/<class>``.

    Complete classes are skipped unless ``overwrite``; files are written atomically, so a run that is interrupted
    resumes at the class it was on. ``encoder``: an already loaded image encoder to use (else loaded on demand).
    ``stamp``: write config.yaml / run_info.json into output_dir once the data has been listed and checked.
    """
    split = cfg.split or cfg.data.train_split
    classes = dataset_classes(cfg.data)
    root = Path(cfg.data.root)
    out = Path(cfg.output_dir)
    records_all = split_records(cfg.data, split, classes)  # listed (and checked) before any model loads
    size = decoder_image_size(cfg.model)
    with run_lock(out):  # one run per folder (also when an editing run computes missing classes here)
        if stamp:
            stamp_run_dir(cfg, has_results=lambda folder: any(folder.glob("*.safetensors")))
        return _embed_classes(cfg, classes, records_all, root, out, split, size, encoder)


def _embed_classes(cfg: EmbedsConfig, classes: List[str], records_all, root: Path, out: Path, split: str,
                   size: int, encoder: Optional[ImageEncoder]) -> Dict[str, Path]:
    written: Dict[str, Path] = {}
    for c in classes:
        records = [r for r in records_all if r.class_name == c]
        candidates = [relative_path(r.path, root) for r in records]
        try:
            meta = read_class_meta(out, c)
        except ArtefactError as err:
            log.warning("class %s: %s; recomputing it", c, str(err).split(". ")[0])
            meta = None
        expected = {"model": cfg.model.prior, "split": split, "image_size": str(size)}
        # a file that records its encoder's fingerprint is judged by the weights, not the path: a model folder that
        # was moved or copied (or a hub id now read from a local snapshot) keeps its embeddings
        legacy = meta is not None and "encoder_fingerprint" not in meta
        moved = meta is not None and meta.get("model") != cfg.model.prior and not legacy
        compare = {k: v for k, v in expected.items() if not (moved and k == "model")}
        complete = meta is not None and not cfg.overwrite and _is_complete(meta, compare, candidates,
                                                                            out / f"{c}.json")
        if complete and (moved or legacy) and encoder is None:
            encoder = load_image_encoder(cfg.model)  # only its fingerprint (or its output) tells who made the file
        if complete and _intact(out, c, meta, encoder):
            if legacy:
                _adopt_legacy(encoder, cfg, records, root, size, out, c, meta)
            log.info("class %s: complete (%d images), skipped; overwrite=true recomputes it", c, len(meta["files"]))
            written[c] = out / f"{c}.safetensors"
            continue
        if encoder is None:
            encoder = load_image_encoder(cfg.model)
            log.info("image encoder %s: %d-d embeddings, device %s, dtype %s", cfg.model.prior, encoder.embed_dim,
                     encoder.device, encoder.dtype)
        embeds, kept, skipped = embed_class(encoder, cfg, records, size, desc=f"embed {c}")
        for path in skipped:
            log.warning("class %s: skipped unreadable %s", c, path)
        written[c] = save_class_embeds(
            out, c, embeds, [relative_path(Path(p), root) for p in kept],
            meta={**expected, "data_root": str(root), "dataset": cfg.data.name,
                  "encoder_fingerprint": encoder.fingerprint, "dtype": str(encoder.dtype).replace("torch.", "")},
            skipped=[relative_path(Path(p), root) for p in skipped],
        )
        log.info("class %s: %d embeddings -> %s", c, len(kept), written[c])
    return written


def compute_missing_class_embeddings(edit_cfg, encoder: ImageEncoder) -> Dict[str, Path]:
    """An editing run's ``compute_missing_embeds``: embed the whole train split into ``embeds_dir`` as
    scripts/save_embeds.py would (complete classes are kept). data.num_samples caps what is edited, and
    class_mean_images what the class means use, so neither limits the files written here."""
    import dataclasses

    every_train_image = dataclasses.replace(edit_cfg.data, num_samples=None)
    return save_embeddings(EmbedsConfig(output_dir=edit_cfg.embeds_dir, model=edit_cfg.model, data=every_train_image,
                                        batch_size=edit_cfg.batch_size), encoder=encoder)
