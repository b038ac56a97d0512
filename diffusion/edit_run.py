"""kandinsky_eval.py's work: every eval image of each source class edited towards its target class.

Resumable (rows already in results.csv or a shard are skipped), and data-parallel under ``accelerate launch``:
the pending images are split across processes, each appends to its own shard, the main process merges them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from datasets.folder import ImageRecord
from diffusion.config import ConfigError, EditConfig, SearchMode, atomic_write_text, stamp_run_dir
from diffusion.data import dataset_classes, make_loader, split_records
from diffusion.editing import Editor, Oracle
from diffusion.embeddings import load_class_means, mean_geometry
from diffusion.metrics import Lpips, pixel_l2, summarize
from diffusion.models import (
    check_embed_dim, load_decoder, load_image_encoder, optimize_unet, resolve_device, resolve_dtype,
)
from diffusion.results import ResultsWriter, fmt, merge_shards, row_key
from diffusion.views import save_image, save_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditItem:
    """One image with one target class."""

    record: ImageRecord
    rel_path: str  # relative to the data root: the row's source_path
    target: str

    @property
    def out_dir(self) -> str:
        name = Path(self.rel_path).name.replace(".", "_")
        return f"edits/{self.record.class_name}_to_{self.target}/{name}"


def resolve_directions(cfg: EditConfig, classes: Sequence[str]) -> List[Tuple[str, str]]:
    """[source, target] pairs: as configured, or both ways when the dataset has exactly two classes."""
    if cfg.directions:
        for src, tgt in cfg.directions:
            for c in (src, tgt):
                if c not in classes:
                    raise ConfigError(f"directions: class '{c}' is not one of the dataset's classes {list(classes)}")
        return [(s, t) for s, t in cfg.directions]
    if len(classes) != 2:
        raise ConfigError(f"the dataset has {len(classes)} classes {list(classes)}: name the pairs to edit in "
                          "'directions', e.g. directions: [[a, b], [b, a]]")
    return [(classes[0], classes[1]), (classes[1], classes[0])]


def image_seed(base_seed: int, rel_path: str) -> int:
    """A per-image seed from the run seed and the image's path: the same image gets the same noise whatever its
    batch, process or position in the run."""
    return (base_seed * 1_000_003 + zlib.crc32(rel_path.encode())) % (2**63)


def plan_items(cfg: EditConfig, classes: List[str]) -> List[EditItem]:
    directions = resolve_directions(cfg, classes)
    sources = sorted({s for s, _ in directions}, key=classes.index)
    records = split_records(cfg.data, cfg.data.eval_split, sources, use_file_lists=True)
    root = Path(cfg.data.root).resolve()
    items = []
    for r in records:
        rel = str(Path(r.path).resolve().relative_to(root))
        items += [EditItem(r, rel, t) for s, t in directions if s == r.class_name]
    return items


def expected_keys(cfg: EditConfig, item: EditItem) -> List[tuple]:
    search = cfg.search.value
    t_skips = cfg.t_skips if cfg.search == SearchMode.sweep else [0.0]
    return [row_key({"source_path": item.rel_path, "target_class": item.target, "eta": eta, "t_skip": t,
                     "search": search}) for eta in cfg.eta for t in t_skips]


def load_oracle(cfg: EditConfig, device: torch.device) -> Optional[Oracle]:
    if cfg.oracle_dir is None:
        return None
    from diffusion.oracle import load_oracle as _load

    return _load(cfg.oracle_dir, device=device)


def run_edits(cfg: EditConfig, oracle: Optional[Oracle] = None) -> Optional[Dict[str, object]]:
    """The whole editing run; returns the summary on the main process (None on the others)."""
    from accelerate import PartialState

    # cpu=True lets torchrun/accelerate start several CPU processes (gloo) on a machine without CUDA
    state = PartialState(cpu=resolve_device(cfg.model.device).type == "cpu")
    classes = dataset_classes(cfg.data)
    items = plan_items(cfg, classes)  # lists and checks the data before any model loads
    out = Path(cfg.output_dir)
    if state.is_main_process:
        stamp_run_dir(cfg)
    state.wait_for_everyone()
    writer = ResultsWriter(out, rank=state.process_index)
    done = writer.done_keys()
    pending = [it for it in items if not set(expected_keys(cfg, it)) <= done]
    log.info("%d (image, target) pairs, %d already done, %d to do", len(items), len(items) - len(pending),
             len(pending))
    with state.split_between_processes(pending) as mine:
        if mine:
            _edit_items(cfg, list(mine), classes, writer, done, state, oracle)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return finish_run(cfg)


def _device(cfg: EditConfig, state) -> torch.device:
    return state.device if state.num_processes > 1 else resolve_device(cfg.model.device)


def _edit_items(cfg: EditConfig, items: List[EditItem], classes: List[str], writer: ResultsWriter, done: set,
                state, oracle: Optional[Oracle]) -> None:
    device = _device(cfg, state)
    dtype = resolve_dtype(cfg.model.dtype, device)
    # the small, most failure-prone parts first, so an unusable oracle or LPIPS stops the run in seconds
    oracle = oracle if oracle is not None else load_oracle(cfg, device)
    if oracle is not None:
        missing = [c for c in classes if c not in oracle.classes]
        if missing:
            raise ConfigError(f"oracle_dir {cfg.oracle_dir}: the oracle knows classes {list(oracle.classes)}, "
                              f"not {missing}; train it on this dataset (scripts/train_classifiers.py)")
    lpips = Lpips(device) if cfg.lpips else None
    decoder = load_decoder(cfg.model, device, dtype)
    encoder = load_image_encoder(cfg.model, device, dtype)
    check_embed_dim(decoder, encoder)
    if cfg.lora.path:
        from diffusion.lora import load_lora

        load_lora(decoder.unet, cfg.lora.path, cfg.lora.step, cfg.lora.scale)
    optimize_unet(decoder, cfg.model)
    involved = [c for c in classes if any(c in pair for pair in resolve_directions(cfg, classes))]
    if cfg.compute_missing_embeds:
        from diffusion.config import EmbedsConfig
        from diffusion.precompute import save_embeddings

        # the whole train split, as scripts/save_embeds.py does: data.num_samples caps what is edited, and
        # num_images (below) what the class means use
        every_train_image = dataclasses.replace(cfg.data, num_samples=None)
        save_embeddings(EmbedsConfig(output_dir=cfg.embeds_dir, model=cfg.model,
                                     data=every_train_image, batch_size=cfg.batch_size), encoder=encoder)
    means = load_class_means(cfg.embeds_dir, involved, encoder.embed_dim, cfg.num_images)
    editor = Editor(decoder, cfg, encoder.null_embedding(), oracle)
    log.info("edit: %d images, T=%d, guidance %g, eta %s, search %s, t_skips %s, batch %d, device %s, dtype %s",
             len(items), cfg.num_inference_steps, cfg.guidance_scale, list(cfg.eta), cfg.search.value,
             editor.t_skips if cfg.search != SearchMode.fixed else [cfg.t_skip], cfg.batch_size, device, dtype)
    by_path: Dict[str, List[EditItem]] = {}
    for it in items:
        by_path.setdefault(str(it.record.path), []).append(it)
    records = list({str(it.record.path): it.record for it in items}.values())
    loader = make_loader(records, cfg.data, decoder.image_size, cfg.batch_size)
    bar = tqdm(total=len(items), desc="edit", unit="img", disable=not state.is_local_main_process)
    for batch in loader:
        if batch is None:
            continue
        start = time.perf_counter()
        batch_items, rows_of = [], []
        for k, path in enumerate(batch["path"]):
            for it in by_path[path]:
                batch_items.append(it)
                rows_of.append(k)
        rows = _edit_batch(cfg, editor, encoder, means, oracle, lpips, batch_items, batch["pixel_values"], rows_of,
                           done)
        seconds = (time.perf_counter() - start) / max(1, len(batch_items))
        for row in rows:
            row["seconds"] = seconds / sum(1 for r in rows if r["source_path"] == row["source_path"])
        writer.append(rows)
        bar.update(len(batch_items))
    bar.close()


def _edit_batch(cfg: EditConfig, editor: Editor, encoder, means: Dict[str, torch.Tensor], oracle, lpips,
                items: List[EditItem], sources: torch.Tensor, source_of: List[int],
                done: set) -> List[Dict[str, object]]:
    """Edit the items of one loader batch: ``sources`` (U, 3, H, W) the distinct images, ``source_of`` the image of
    each item (an image with several target classes is embedded, classified and inverted once)."""
    out = Path(cfg.output_dir)
    images = sources[source_of]  # per item
    e_src = encoder.embed(sources)[source_of]
    mu_src = torch.stack([means[it.record.class_name] for it in items])
    mu_tgt = torch.stack([means[it.target] for it in items])
    seeds = [image_seed(cfg.seed, it.rel_path) for it in items]
    first_item = {u: k for k, u in reversed(list(enumerate(source_of)))}
    generators = [torch.Generator().manual_seed(seeds[first_item[u]]) for u in range(len(sources))]
    probs_before = pred_before = target_index = None
    if oracle is not None:
        with torch.inference_mode():
            probs_before = oracle(sources).float().cpu()[source_of]
        pred_before = probs_before.argmax(1)
        target_index = [list(oracle.classes).index(it.target) for it in items]
    inv, outcomes = editor.edit(sources, e_src, mu_src, mu_tgt, target_index, generators, pred_before, source_of)
    inversion_evals = inv.evals  # the edit's cost, before the strips (views) extend the inversion
    for k, it in enumerate(items):
        save_image(images[k], out / it.out_dir / "original.png")
    if cfg.views.enabled:
        _save_strips(cfg, editor, inv, items, e_src, mu_src, mu_tgt, target_index)
    chosen = torch.stack([o.chosen.picture for o in outcomes])
    originals = images[[o.image for o in outcomes]]
    l2 = pixel_l2(originals, chosen)
    dist = lpips(originals, chosen) if lpips is not None else None
    rows = []
    for n, o in enumerate(outcomes):
        it, a = items[o.image], o.chosen
        suffix = f"eta{a.eta:g}" + (f"_t{a.t_skip:g}" if cfg.search == SearchMode.sweep else "")
        row = {
            "source_path": it.rel_path, "source_class": it.record.class_name, "target_class": it.target,
            "search": cfg.search.value, "t_skip": a.t_skip, "eta": a.eta, "guidance_scale": cfg.guidance_scale,
            "flipped": o.flipped, "l2": float(l2[n]), "lpips": float(dist[n]) if dist is not None else None,
            "unet_evals": int(inversion_evals[o.image]) + o.sampling_evals,
            "inversion_evals": int(inversion_evals[o.image]), "attempts": len(o.attempts),
            "seed": seeds[o.image], "original_path": f"{it.out_dir}/original.png",
            "counterfactual_path": f"{it.out_dir}/cf_{suffix}.png", "pair_path": f"{it.out_dir}/pair_{suffix}.png",
        }
        if row_key(row) in done:
            continue
        if oracle is not None:
            t = target_index[o.image]
            row.update(oracle_pred_before=list(oracle.classes)[int(pred_before[o.image])],
                       oracle_prob_before=float(probs_before[o.image, t]), oracle_prob_after=float(a.probs[t]))
        save_image(a.picture, out / row["counterfactual_path"])
        save_pair(images[o.image], a.picture, out / row["pair_path"])
        if cfg.save_attempts:
            for att in o.attempts:
                save_image(att.picture, out / it.out_dir / "attempts" / f"eta{att.eta:g}_t{att.t_skip:g}.png")
        rows.append(row)
    return rows


def _save_strips(cfg: EditConfig, editor: Editor, inv, items: List[EditItem], e_src, mu_src, mu_tgt,
                 target_index: Optional[List[int]]) -> None:
    """Interpolation frames over views.strip_etas at views.strip_t_skip, with the oracle's target probability."""
    out = Path(cfg.output_dir)
    frames = editor.interpolate(inv, e_src, mu_src, mu_tgt, cfg.views.strip_etas, cfg.views.strip_t_skip)
    for k, it in enumerate(items):
        mine = [a for a in frames if a.image == k]
        for a in mine:
            save_image(a.picture, out / it.out_dir / "strip" / f"eta{a.eta:g}.png")
        info = {
            "t_skip": cfg.views.strip_t_skip, "source_class": it.record.class_name, "target_class": it.target,
            "frames": [{"eta": a.eta, "path": f"strip/eta{a.eta:g}.png",
                        "target_prob": float(a.probs[target_index[k]]) if a.probs is not None else None}
                       for a in mine],
        }
        atomic_write_text(out / it.out_dir / "strip.json", json.dumps(info, indent=1))


def finish_run(cfg: EditConfig) -> Dict[str, object]:
    """Merge the shards into results.csv and write summary.json (main process)."""
    out = Path(cfg.output_dir)
    rows = merge_shards(out)
    summary = summarize(rows)
    summary["settings"] = {
        "search": cfg.search.value, "eta": list(cfg.eta), "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps, "inversion": cfg.inversion.value,
        "t_skips": list(cfg.t_skips) if cfg.search != SearchMode.fixed else [cfg.t_skip],
        "decoder": cfg.model.decoder, "prior": cfg.model.prior, "lora": cfg.lora.path, "lora_step": cfg.lora.step,
        "oracle_dir": cfg.oracle_dir,
    }
    try:
        classes = dataset_classes(cfg.data)
        summary["class_mean_geometry"] = mean_geometry(load_class_means(cfg.embeds_dir, classes, None, cfg.num_images))
    except Exception as err:  # informative only; never fail a finished run over it
        log.warning("class-mean geometry not computed: %s", err)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    log.info("results: %s (%d rows); flip rate %s, LPIPS (flipped) %s, UNet evals/image %s",
             out / "results.csv", len(rows), fmt(summary["flip_rate"]) or "n/a (no oracle)",
             fmt(summary["lpips_mean"]) or "n/a", fmt(summary["unet_evals_per_image"]))
    if cfg.views.enabled:
        from diffusion.gallery import write_views

        write_views(out, frame_ms=cfg.views.gif_frame_ms)
    return summary
