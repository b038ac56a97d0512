"""t_skip search cost: UNet evaluations per image of `search: first_flip` (linear, the paper's) against
`search: bisect` (binary search over the same ordered t_skips, splits weighted by cost), and how often the two choose
a different t_skip.

    python benchmarks/search_cost.py [--config configs/edit/demo.yaml] [key=value ...]

The config needs an oracle (oracle_dir). Two kinds of figure:
- measured: the mean UNet evaluations per image of each search on the config's images (results.csv);
- worst case and mean: the most, and the mean, an image costs under each search over every possible first flipping
  t_skip (and none), each counted once, with the run's own cost rule (2 evaluations per guided sampling step, each
  inversion step paid once, when first needed); "eager inversion" charges the whole inversion up front instead, as
  the paper's protocol does.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path

from _common import REPO, search_outcomes
from diffusion.config import EditConfig, InversionCond, load_config
from diffusion.edit.run import run_edits

MODES = ("first_flip", "bisect")


def worst_case_optimum(depths, invert_cost: int) -> tuple:
    """(worst case, mean over outcomes) of the binary search tree that minimises the worst case alone (ties: the
    mean), for comparison with bisect_plan's mean-optimal tree; same cost rule and dynamic programme."""
    n = len(depths)
    best = {(k, k): (0, 0) for k in range(n + 1)}  # (worst, total over the interval's outcomes)
    for size in range(1, n + 1):
        for lo in range(n + 1 - size):
            hi, base = lo + size, (depths[lo - 1] if lo else 0)
            options = []
            for m in range(lo, hi):
                cost = 2 * depths[m] + (invert_cost * max(0, depths[m] - base) if hi == n else 0)
                (w_l, t_l), (w_r, t_r) = best[(lo, m)], best[(m + 1, hi)]
                options.append((cost + max(w_l, w_r), cost * (hi - lo + 1) + t_l + t_r))
            best[(lo, hi)] = min(options)
    worst, total = best[(0, n)]
    return worst, total / (n + 1)


def outcome_costs(mode: str, depths, invert_cost: int, weighted: bool = True) -> list:
    """UNet evaluations of one (image, eta) under ``mode`` for every first-flip index, and none."""
    return [cost for _, _, cost in search_outcomes(mode, depths, invert_cost, weighted)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/edit/demo.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, summaries = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            cfg = load_config(EditConfig, args.config, [*args.overrides, f"output_dir={tmp}/{mode}", f"search={mode}",
                                                        "views.enabled=false", "lpips=false"])
            summaries[mode] = run_edits(cfg)
            with open(Path(tmp) / mode / "results.csv") as f:
                rows[mode] = {(r["source_path"], r["target_class"], r["eta"]): r for r in csv.DictReader(f)}
    T = cfg.num_inference_steps
    invert_cost = 1 if cfg.inversion == InversionCond.null else 2
    t_skips = sorted(cfg.t_skips, reverse=True)
    depths = [T - round(t * T) for t in t_skips]  # T_skip = round(t_skip * T)
    linear_worst = max(outcome_costs("first_flip", depths, invert_cost))
    eager_linear_worst = T * invert_cost + sum(2 * d for d in depths)
    keys = list(rows["first_flip"])
    print(f"config {args.config}; {len(keys)} edits; T {T}; t_skips {t_skips}")
    print("| search | UNet evals/image (measured) | same with eager inversion | worst case | worst / linear's worst "
          "| mean over outcomes | most attempts | flip rate | mean t_skip | t_skip differs from first_flip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        s = summaries[mode]
        eager = sum(float(r["unet_evals"]) - float(r["inversion_evals"]) + T * invert_cost
                    for r in rows[mode].values()) / len(keys)
        outcomes = search_outcomes(mode, depths, invert_cost)
        costs = [cost for _, _, cost in outcomes]
        attempts = max(len(tried) for _, tried, _ in outcomes)
        differ = sum(rows[mode][k]["t_skip"] != rows["first_flip"][k]["t_skip"] for k in keys)
        print(f"| {mode} | {s['unet_evals_per_image']:.1f} | {eager:.1f} | {max(costs)} "
              f"| {max(costs) / linear_worst:.2f} | {sum(costs) / len(costs):.0f} | {attempts} | {s['flip_rate']:.3f} "
              f"| {s['t_skip_mean']:.3f} | {differ}/{len(keys)} |")
    mid = outcome_costs("bisect", depths, invert_cost, weighted=False)
    print(f"plain midpoint bisect (for comparison, not run): worst case {max(mid)}, mean over outcomes "
          f"{sum(mid) / len(mid):.0f}")
    opt_worst, opt_mean = worst_case_optimum(depths, invert_cost)
    print(f"worst-case-optimal binary search (for comparison, not run): worst case {opt_worst} "
          f"({opt_worst / linear_worst:.2f} of linear's), mean over outcomes {opt_mean:.0f}")
    print(f"linear worst case with the whole inversion up front (the paper's protocol): {eager_linear_worst}")
    print(f"bisect measured / linear's worst case: {summaries['bisect']['unet_evals_per_image'] / linear_worst:.2f}; "
          f"bisect measured / first_flip measured: "
          f"{summaries['bisect']['unet_evals_per_image'] / summaries['first_flip']['unet_evals_per_image']:.2f}")

if __name__ == "__main__":
    main()
