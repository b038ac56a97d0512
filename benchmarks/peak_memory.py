"""Peak memory (max RSS) of each entry point on the demo configs, against the size of the model weights it loads
and against the bare interpreter with torch/diffusers/transformers imported.

    python benchmarks/peak_memory.py [--model DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

from _common import REPO, default_model, weights_bytes


def peak_rss_mb(cmd: list) -> float:
    """Max RSS (MB) of one child process tree run to completion (each measurement in its own wrapper process)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model()))
    args = parser.parse_args()
    weights = weights_bytes(args.model) / 2**20
    base = peak_rss_mb([sys.executable, "-c", "import torch, diffusers, transformers, accelerate, peft"])
    with tempfile.TemporaryDirectory() as tmp:
        model = [f"model.decoder={args.model}/decoder", f"model.prior={args.model}/prior"]
        runs = {
            "save_embeds": [sys.executable, "scripts/save_embeds.py", "--config_path", "configs/embeds/demo.yaml",
                            f"output_dir={tmp}/embeds", f"data.root={tmp}/digits", *model],
            "kandinsky_eval (demo)": [sys.executable, "kandinsky_eval.py", "--config_path", "configs/edit/demo.yaml",
                                      f"output_dir={tmp}/edit", f"embeds_dir={tmp}/embeds", f"data.root={tmp}/digits",
                                      *model],
        }
        print(f"model {args.model}: weights {weights:.1f} MB on disk; "
              f"python + torch/diffusers/transformers/accelerate/peft imported: {base:.0f} MB")
        print("| entry point | peak RSS | above import baseline | target 1.5 x weights + 300 MB |")
        print("| --- | --- | --- | --- |")
        for name, cmd in runs.items():
            peak = peak_rss_mb(cmd)
            print(f"| {name} | {peak:.0f} MB | {peak - base:.0f} MB | {1.5 * weights + 300:.0f} MB |")


if __name__ == "__main__":
    main()
