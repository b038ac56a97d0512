"""Quality of the offline demo, judged by the independent judge: does DIFFusion change the class while keeping
identity, on several digit pairs, and better than SDEdit?

    python benchmarks/demo_quality.py [--config configs/edit/demo.yaml] [--pairs 3,8 4,9 1,7 0,6] [--per_class 20]
                                      [--ceiling] [--json FILE] [-- key=value ...]

For each pair, both directions, on the first --per_class TEST images of the source class (the images the demo edits;
the settings were chosen on held-out TRAIN images by scripts/calibrate.py), with the config's settings:
- DIFFusion: the config's search (the oracle picks each image's t_skip) with the stored edit-friendly noise maps;
- SDEdit: the same search, start latents, edited embedding and sampler, with fresh noise instead of the maps;
- the drift of an eta 0 edit (the image re-sampled with its own embedding at the same t_skip: what the sampler
  changes without any edit).
Printed per direction: the oracle's and the JUDGE's flip rates over all attempted images (95% Wilson intervals),
the share of judged flips whose pixel change is smaller than the distance from the source to its nearest real
train image of the target class (where it is not, that real example would teach as much), and mean pixel L2 (RMS
in [0, 1], bootstrap intervals over images). The targets (judge flip rate >= 0.9 and >= 0.9 of judged flips closer
than the nearest real target, in every direction) are checked and reported. This is a benchmark: it asserts nothing.

--ceiling also edits every image at every t_skip of the grid and reports the share of images for which SOME t_skip
gives an edit the judge accepts that is closer than the nearest real target: what a perfect stopping rule could
reach with this decoder and eta. It lets the judge choose, so it is a diagnostic of where the misses come from (the
oracle's stopping point or the decoder), never a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, List

import torch

from _common import REPO
from diffusion.config import SEARCHES, EditConfig, load_config
from diffusion.data import make_loader, split_records
from diffusion.devices import resolve_device
from diffusion.edit.run import image_seed, load_classifiers, load_means, load_pipeline, plan_items
from diffusion.metrics import pixel_l2
from diffusion.pipeline import ClassDirection
from diffusion.stats import as_list, bootstrap_mean_interval, wilson_interval

TARGET = 0.9


def _load_images(cfg: EditConfig, records, size: int) -> torch.Tensor:
    return torch.cat([b["pixel_values"] for b in make_loader(records, cfg.data, size, 64) if b is not None])


def _rate(k: int, n: int) -> dict:
    return {"rate": k / n if n else None, "k": k, "n": n, "ci": as_list(wilson_interval(k, n))}


def _mean(values: List[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else None, "n": len(values),
            "ci": as_list(bootstrap_mean_interval(values))}


def _method(pipe, inv, x, direction, cfg, clf, nearest) -> dict:
    """Search as the config says on one inversion; the oracle's and the judge's verdicts and the distances."""
    search = cfg.search.value if cfg.search in SEARCHES else None
    t_skips = list(cfg.t_skips) if search else [cfg.t_skip]
    out = pipe(inv, direction, eta=cfg.eta[0], t_skip=t_skips, guidance_scale=cfg.guidance_scale, search=search,
               oracle=clf.oracle, judge=clf.judge, flip_threshold=cfg.flip_threshold,
               flip_agreement=cfg.flip_agreement, output_type="pt")
    tried = [e for e in out.edits if not e.already_target]
    oracle_flips = [e for e in tried if e.flipped]
    judged = [e for e in tried if e.judge_flipped]  # the judge agrees with an edit the search accepted
    l2 = {e.image: float(pixel_l2(x[e.image:e.image + 1], e.picture[None])[0]) for e in tried}
    closer = [e for e in judged if l2[e.image] < float(nearest[e.image])]
    return {
        "n_attempted": len(tried), "n_already_target": len(out.edits) - len(tried),
        "oracle_flip_rate": _rate(len(oracle_flips), len(tried)),
        "judge_flip_rate": _rate(len(judged), len(tried)),
        "judged_flips_closer_than_nearest_real_target": _rate(len(closer), len(judged)),
        "l2_judged_flips": _mean([l2[e.image] for e in judged]),
        "l2_all": _mean(list(l2.values())),
        "t_skip_histogram": {f"{t:g}": sum(e.t_skip == t for e in tried) for t in sorted({e.t_skip for e in tried},
                                                                                        reverse=True)},
        "_chosen": {e.image: e.t_skip for e in tried},
    }


def _ceiling(pipe, inv, x, direction, cfg, clf, nearest, attempted: List[int]) -> dict:
    """Per attempted image: does any t_skip of the grid give a judged flip closer than the nearest real target?"""
    out = pipe(inv.select(attempted), direction, eta=cfg.eta[0], t_skip=list(cfg.t_skips),
               guidance_scale=cfg.guidance_scale, judge=clf.judge, output_type="pt")
    reachable = set()
    for e in out.edits:
        u = attempted[e.image]
        if e.judge_flipped and float(pixel_l2(x[u:u + 1], e.picture[None])[0]) < float(nearest[u]):
            reachable.add(u)
    return _rate(len(reachable), len(attempted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/edit/demo.yaml"))
    parser.add_argument("--pairs", nargs="+", default=["3,8", "4,9", "1,7", "0,6"])
    parser.add_argument("--per_class", type=int, default=20, help="test images per source class")
    parser.add_argument("--ceiling", action="store_true",
                        help="also report what a perfect stopping rule could reach (judge-chosen: a diagnostic)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bad = [p for p in args.pairs if "=" in p or len(p.split(",")) != 2]
    if bad:
        parser.error(f"--pairs {bad[0]!r} is not a pair like 3,8" + (": config overrides go after a lone --, e.g. "
                     "--pairs 3,8 -- model.device=cuda" if "=" in bad[0] else ""))
    pairs = [tuple(p.split(",")) for p in args.pairs]
    classes = sorted({c for p in pairs for c in p})
    base = load_config(EditConfig, args.config, [*args.overrides, f"data.num_samples={args.per_class}"])
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, classes=classes))
    device = resolve_device(base.model.device)
    clf = load_classifiers(base, classes, device)
    if clf.oracle is None or clf.judge is None:
        raise SystemExit("demo_quality needs oracle_dir and judge_dir in the config")
    pipe = load_pipeline(base, device)
    means = load_means(base, pipe, classes)
    all_train = dataclasses.replace(base.data, num_samples=None)
    train = {c: _load_images(base, split_records(all_train, base.data.train_split, [c]), pipe.image_size)
             for c in classes}
    figures: Dict[str, dict] = {}
    for a, b in pairs:
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, classes=[a, b]), directions=[])
        items = plan_items(cfg, [a, b])
        for src, tgt in ((a, b), (b, a)):
            mine = [it for it in items if it.record.class_name == src and it.target == tgt]
            x = _load_images(cfg, [it.record for it in mine], pipe.image_size)
            gens = [torch.Generator().manual_seed(image_seed(cfg.seed, it.rel_path)) for it in mine]
            direction = ClassDirection(means[src], means[tgt], src, tgt)
            nearest = torch.cdist(x.flatten(1), train[tgt].flatten(1)).min(1).values / x[0].numel() ** 0.5
            inv = pipe.invert(x, cfg.num_inference_steps, gens, cfg.inversion, cfg.inversion_guidance)
            fresh_zs = torch.randn(inv.zs.shape, generator=torch.Generator().manual_seed(1), dtype=inv.zs.dtype)
            fresh = dataclasses.replace(inv, zs=fresh_zs, ready=torch.zeros_like(inv.ready),
                                        counter=torch.zeros_like(inv.counter))
            diffusion = _method(pipe, inv, x, direction, cfg, clf, nearest)
            sdedit = _method(pipe, fresh, x, direction, cfg, clf, nearest)
            drift = []  # eta 0 at each image's chosen t_skip: the change the sampler makes without an edit
            chosen = diffusion.pop("_chosen")
            sdedit.pop("_chosen")
            for t in sorted(set(chosen.values())):
                idx = [u for u, tt in chosen.items() if tt == t]
                out = pipe(inv.select(idx), direction, eta=0.0, t_skip=t, guidance_scale=cfg.guidance_scale,
                           output_type="pt")
                drift += pixel_l2(x[idx], out.images).tolist()
            figures[f"{src}->{tgt}"] = {
                "n": len(mine), "diffusion": diffusion, "sdedit": sdedit, "eta0_drift_l2": _mean(drift),
                "nearest_real_target_l2": _mean(nearest.tolist()),
            }
            if args.ceiling:
                figures[f"{src}->{tgt}"]["ceiling_any_t_skip_judged_and_closer"] = _ceiling(
                    pipe, inv, x, direction, cfg, clf, nearest, sorted(chosen))
            print(f"{src}->{tgt} done", flush=True)
    met = {d: bool((f["diffusion"]["judge_flip_rate"]["rate"] or 0) >= TARGET and
                   (f["diffusion"]["judged_flips_closer_than_nearest_real_target"]["rate"] or 0) >= TARGET)
           for d, f in figures.items()}
    config = Path(args.config).resolve()
    result = {"config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else args.config,
              "pairs": args.pairs, "per_class": args.per_class, "ceiling": args.ceiling,
              "settings": {"eta": base.eta, "guidance_scale": base.guidance_scale, "search": base.search.value,
                           "t_skips": list(base.t_skips), "flip_threshold": base.flip_threshold,
                           "flip_agreement": base.flip_agreement.value, "num_inference_steps": base.num_inference_steps,
                           "oracle_dir": base.oracle_dir, "judge_dir": base.judge_dir},
              "oracle": clf.oracle.accuracy_summary() if hasattr(clf.oracle, "accuracy_summary") else None,
              "judge": clf.judge.accuracy_summary() if hasattr(clf.judge, "accuracy_summary") else None,
              "directions": figures, "targets_met": met}
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _print(r: dict) -> None:
    def rate(d: dict) -> str:
        if d["rate"] is None:
            return "-"
        lo, hi = d["ci"]
        return f"{d['rate']:.2f} ({d['k']}/{d['n']}; {lo:.2f}-{hi:.2f})"

    def mean(d: dict) -> str:
        return "-" if d["mean"] is None else f"{d['mean']:.3f} ({d['ci'][0]:.3f}-{d['ci'][1]:.3f})"

    s = r["settings"]
    print(f"\n{r['config']}: eta {s['eta']}, guidance {s['guidance_scale']}, search {s['search']}, flip_threshold "
          f"{s['flip_threshold']}, T {s['num_inference_steps']}, {r['per_class']} test images per direction")
    print(f"oracle: {r['oracle']}\njudge: {r['judge']}\n")
    print("| direction | method | oracle flip rate | **judge flip rate** (95% CI) | judged flips closer than nearest "
          "real target | L2, judged flips | L2, all attempted |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d, f in r["directions"].items():
        for name in ("diffusion", "sdedit"):
            m = f[name]
            print(f"| {d} | {'DIFFusion' if name == 'diffusion' else 'SDEdit'} | {rate(m['oracle_flip_rate'])} "
                  f"| {rate(m['judge_flip_rate'])} | {rate(m['judged_flips_closer_than_nearest_real_target'])} "
                  f"| {mean(m['l2_judged_flips'])} | {mean(m['l2_all'])} |")
    ceiling = r.get("ceiling")
    print("\n| direction | eta 0 drift L2 (at the chosen t_skips) | source to nearest real target L2 | chosen t_skips "
          "| targets met |" + (" ceiling: some t_skip judged and closer (judge-chosen, a diagnostic) |" if ceiling
                               else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if ceiling else ""))
    for d, f in r["directions"].items():
        hist = ", ".join(f"{t}: {n}" for t, n in f["diffusion"]["t_skip_histogram"].items())
        print(f"| {d} | {mean(f['eta0_drift_l2'])} | {mean(f['nearest_real_target_l2'])} | {hist} "
              f"| {'yes' if r['targets_met'][d] else 'NO'} |"
              + (f" {rate(f['ceiling_any_t_skip_judged_and_closer'])} |" if ceiling else ""))
    print(f"\ntargets (judge flip rate >= {TARGET} and >= {TARGET} of judged flips closer than the nearest real "
          f"target, every direction): {'met' if all(r['targets_met'].values()) else 'NOT met'}")


if __name__ == "__main__":
    main()
