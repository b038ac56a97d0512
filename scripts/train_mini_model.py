"""Train the offline demo's small Kandinsky-2.2-shaped model on scikit-learn's digits, on the CPU.

    python scripts/train_mini_model.py --config_path configs/mini/digits.yaml [key=value ...]

Stages (MoVQ, image encoder, UNet) are saved as they finish; a rerun skips finished stages (overwrite=true retrains).
"""

from pathlib import Path

from diffusion.cli import run
from diffusion.config import MiniConfig


def main(cfg: MiniConfig) -> None:
    from diffusion.demo.mini import train_mini_model
    from diffusion.runinfo import stamp_run_dir

    stamp_run_dir(cfg, Path(cfg.output_dir) / "training_run")
    train_mini_model(cfg)


if __name__ == "__main__":
    run(MiniConfig, main, description=__doc__,
        interrupted="the stages already saved are kept; rerun the same command to train the rest")
