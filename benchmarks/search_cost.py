"""t_skip search cost: UNet evaluations per image of `search: first_flip` (linear, the paper's) against
`search: bisect` (binary search over the same ordered t_skips), and how often the two choose different t_skips.

    python benchmarks/search_cost.py [--config configs/edit/demo.yaml] [key=value ...]

The config needs an oracle (oracle_dir). Linear's worst case is every t_skip tried; bisect tries about log2(n).
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path

from _common import REPO  # noqa: F401  (sets sys.path)
from diffusion.config import EditConfig, load_config
from diffusion.edit_run import run_edits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/edit/demo.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, summaries = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("first_flip", "bisect"):
            cfg = load_config(EditConfig, args.config, [*args.overrides, f"output_dir={tmp}/{mode}", f"search={mode}",
                                                        "views.enabled=false", "lpips=false"])
            summaries[mode] = run_edits(cfg)
            with open(Path(tmp) / mode / "results.csv") as f:
                rows[mode] = {(r["source_path"], r["target_class"], r["eta"]): r for r in csv.DictReader(f)}
    T = cfg.num_inference_steps
    inversion = float(next(iter(rows["first_flip"].values()))["inversion_evals"])
    worst = inversion + sum(2 * (T - round(t * T)) for t in cfg.t_skips)  # T_skip = round(t_skip * T)
    differ = sum(rows["first_flip"][k]["t_skip"] != rows["bisect"][k]["t_skip"] for k in rows["first_flip"])
    print(f"config {args.config}; {len(rows['first_flip'])} edits; t_skips {list(cfg.t_skips)}")
    print("| search | UNet evals/image | flip rate | mean t_skip |")
    print("| --- | --- | --- | --- |")
    for mode, s in summaries.items():
        print(f"| {mode} | {s['unet_evals_per_image']:.0f} | {s['flip_rate']:.3f} | {s['t_skip_mean']:.3f} |")
    print(f"linear worst case (every t_skip tried): {worst:.0f} evals/image")
    print(f"bisect / linear worst case: {summaries['bisect']['unet_evals_per_image'] / worst:.2f}")
    print(f"bisect / linear (measured): "
          f"{summaries['bisect']['unet_evals_per_image'] / summaries['first_flip']['unet_evals_per_image']:.2f}")
    print(f"edits where the two choose a different t_skip: {differ}/{len(rows['first_flip'])}")


if __name__ == "__main__":
    main()
