"""Quality of the offline demo: does DIFFusion change the class while keeping identity, and better than SDEdit?

    python benchmarks/demo_quality.py [--config configs/edit/demo.yaml] [--per_class 20] [key=value ...]

On the demo's eval images of both directions, at every t_skip of the config (one shared inversion per image):
- DIFFusion: the edited embedding e', sampled with the stored edit-friendly noise maps z_t;
- SDEdit: the same e', the same start latent w_{T_skip} and the same sampler, but fresh noise instead of z_t;
and the run's own search (the config's `search`) for the headline figures. Printed:
- flip rate over ALL images per direction (the oracle predicts the target class), mean pixel L2 (RMS in [0, 1]) to the
  original, and LPIPS when torchvision's AlexNet weights are available;
- the share of flipped counterfactuals whose change is smaller than the distance from the source to its nearest
  train image of the target class (where it is not, showing that real example would teach as much);
- two baselines: the drift of a no-edit re-sample (eta 0, stored noise maps) and the distance between two samples
  drawn from pure noise with the image's own embedding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections import defaultdict
from typing import Dict

import torch

from _common import REPO
from diffusion.config import EditConfig, load_config
from diffusion.data import dataset_classes, make_loader, split_records
import dataclasses as dc

from diffusion.devices import resolve_device
from diffusion.edit.run import image_seed, load_oracle, plan_items, resolve_directions
from diffusion.embeddings import load_class_means
from diffusion.metrics import pixel_l2
from diffusion.pipeline import ClassDirection, DIFFusionPipeline
from diffusion.precompute import compute_missing_class_embeddings


def _lpips(device):
    try:
        from diffusion.metrics import Lpips

        return Lpips(device)
    except Exception as err:  # offline: no AlexNet weights
        print(f"(LPIPS not available: {str(err).splitlines()[0][:120]}...)")
        return None


def _load_images(cfg: EditConfig, records, size: int) -> torch.Tensor:
    batches = [b["pixel_values"] for b in make_loader(records, cfg.data, size, 64) if b is not None]
    return torch.cat(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/edit/demo.yaml"))
    parser.add_argument("--per_class", type=int, default=20, help="eval images per source class")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(EditConfig, args.config, [*args.overrides, f"data.num_samples={args.per_class}"])
    device = resolve_device(cfg.model.device)
    pipe = DIFFusionPipeline.from_config(cfg.model, batch_size=cfg.batch_size)
    classes = dataset_classes(cfg.data)
    directions = resolve_directions(cfg, classes)
    if cfg.compute_missing_embeds:
        compute_missing_class_embeddings(cfg, pipe.encoder)
    means = load_class_means(cfg.embeds_dir, classes, pipe.encoder.embed_dim, cfg.class_mean_images)
    oracle = load_oracle(cfg, device)
    if oracle is None:
        raise SystemExit("demo_quality needs an oracle: set oracle_dir in the config")
    lpips = _lpips(device)
    t_skips = sorted(cfg.t_skips, reverse=True)
    eta, g = cfg.eta[0], cfg.guidance_scale
    # nearest real example of the target class, among the train images (L2 at the model's resolution)
    all_train = dataclasses.replace(cfg.data, num_samples=None)  # every train image, not the eval cap
    train = {c: _load_images(cfg, split_records(all_train, cfg.data.train_split, [c]), pipe.image_size)
             for c in classes}
    items = plan_items(cfg, classes)
    per_direction: Dict[str, dict] = {}
    base: Dict[str, list] = defaultdict(list)
    for src, tgt in directions:
        mine = [it for it in items if it.record.class_name == src and it.target == tgt]
        x = _load_images(cfg, [it.record for it in mine], pipe.image_size)
        gens = [torch.Generator().manual_seed(image_seed(cfg.seed, it.rel_path)) for it in mine]
        n = len(mine)
        direction = ClassDirection(means[src], means[tgt], src, tgt)
        nearest = torch.cdist(x.flatten(1), train[tgt].flatten(1)).min(1).values / x[0].numel() ** 0.5
        inv = pipe.invert(x, cfg.num_inference_steps, gens)
        fresh_zs = torch.randn(inv.zs.shape, generator=torch.Generator().manual_seed(1), dtype=inv.zs.dtype)
        fresh = dc.replace(inv, zs=fresh_zs, ready=torch.zeros_like(inv.ready), counter=torch.zeros_like(inv.counter))
        res = {}  # (method, t_skip) -> (flips (n,), l2 (n,), lpips (n,) or None)
        for method, source in (("diffusion", inv), ("sdedit", fresh)):
            out = pipe(source, direction, eta=eta, t_skip=t_skips, guidance_scale=g, oracle=oracle, output_type="pt")
            for t in t_skips:
                edits = [e for e in out.edits if e.t_skip == t]
                pics = torch.stack([e.picture for e in edits])
                res[(method, t)] = (torch.tensor([bool(e.flipped) for e in edits]), pixel_l2(x, pics),
                                    lpips(x, pics) if lpips else None)
        # baselines: eta-0 re-sample at the strip t_skip; two pure-noise samples with the image's own e
        drift = pipe(inv, direction, eta=0.0, t_skip=cfg.views.strip_t_skip, guidance_scale=g, output_type="pt")
        base["eta0_drift_l2"] += pixel_l2(x, drift.images).tolist()
        pair = []
        for seed in (11, 12):
            gen = torch.Generator().manual_seed(seed)
            ws = inv.ws.clone()
            ws[0] = torch.randn(ws[0].shape, generator=gen, dtype=ws.dtype)
            zs = torch.randn(inv.zs.shape, generator=gen, dtype=inv.zs.dtype)
            noise = dc.replace(inv, ws=ws, zs=zs, ready=torch.zeros_like(inv.ready))
            pair.append(pipe(noise, direction, eta=0.0, t_skip=0.0, guidance_scale=g, output_type="pt").images)
        base["two_noise_samples_l2"] += pixel_l2(pair[0], pair[1]).tolist()
        base["source_to_nearest_target_l2"] += nearest.tolist()
        # first_flip per image (mildest t_skip whose DIFFusion edit flips), SDEdit at the same t_skip
        chosen = []
        for b in range(n):
            ok = [t for t in t_skips if res[("diffusion", t)][0][b]]
            chosen.append(ok[0] if ok else None)
        flipped = [b for b in range(n) if chosen[b] is not None]
        pick = lambda m, k: [float(res[(m, chosen[b])][k][b]) for b in flipped]  # noqa: E731
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        per_direction[f"{src}->{tgt}"] = {
            "n": n,
            "first_flip": {
                "flip_rate": len(flipped) / n,
                "diffusion_l2": mean(pick("diffusion", 1)),
                "sdedit_l2_same_t_skip": mean(pick("sdedit", 1)),
                "sdedit_flip_rate_same_t_skip": mean([float(res[("sdedit", chosen[b])][0][b]) for b in flipped]),
                "diffusion_lpips": mean(pick("diffusion", 2)) if lpips else None,
                "sdedit_lpips_same_t_skip": mean(pick("sdedit", 2)) if lpips else None,
                "smaller_than_nearest_real_target": mean([float(res[("diffusion", chosen[b])][1][b] < nearest[b])
                                                          for b in flipped]),
                "t_skip_histogram": {f"{t:g}": chosen.count(t) for t in t_skips if chosen.count(t)},
            },
            "per_t_skip": [{"t_skip": t,
                            **{f"{m}_flip_rate": float(res[(m, t)][0].float().mean()) for m in ("diffusion", "sdedit")},
                            **{f"{m}_l2": float(res[(m, t)][1].mean()) for m in ("diffusion", "sdedit")}}
                           for t in t_skips],
        }
    figures = {"config": args.config, "eta": eta, "guidance_scale": cfg.guidance_scale,
               "num_inference_steps": cfg.num_inference_steps, "per_class": args.per_class,
               "directions": per_direction, "baselines": {k: sum(v) / len(v) for k, v in base.items()}}
    _print(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def _print(figures: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{figures['config']}: eta {figures['eta']}, guidance {figures['guidance_scale']}, "
          f"T {figures['num_inference_steps']}, {figures['per_class']} images per direction\n")
    print("| direction | flip rate | DIFFusion L2 | SDEdit L2 (same t_skip) | SDEdit flip (same t_skip) "
          "| DIFFusion LPIPS | SDEdit LPIPS | flipped edits smaller than nearest real target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, d in figures["directions"].items():
        f = d["first_flip"]
        print(f"| {name} | {fmt(f['flip_rate'])} | {fmt(f['diffusion_l2'])} | {fmt(f['sdedit_l2_same_t_skip'])} "
              f"| {fmt(f['sdedit_flip_rate_same_t_skip'])} | {fmt(f['diffusion_lpips'])} "
              f"| {fmt(f['sdedit_lpips_same_t_skip'])} | {fmt(f['smaller_than_nearest_real_target'])} |")
    for name, d in figures["directions"].items():
        print(f"\n{name}, every t_skip (flip rate over all images / mean pixel L2):\n")
        print("| t_skip | DIFFusion flip | DIFFusion L2 | SDEdit flip | SDEdit L2 |")
        print("| --- | --- | --- | --- | --- |")
        for r in d["per_t_skip"]:
            print(f"| {r['t_skip']:g} | {r['diffusion_flip_rate']:.2f} | {r['diffusion_l2']:.4f} "
                  f"| {r['sdedit_flip_rate']:.2f} | {r['sdedit_l2']:.4f} |")
    print("\nbaselines (mean pixel L2):")
    for k, v in figures["baselines"].items():
        print(f"  {k}: {v:.4f}")


if __name__ == "__main__":
    main()
