"""Train the evaluation oracle of one binary domain: a ResNet-18 / EfficientNet-B0 / MobileNet-V2 ensemble (or a CLIP
linear probe with kind: clip_probe), one safetensors checkpoint + JSON per member, test accuracy printed and saved.

    python scripts/train_classifiers.py --config_path configs/classifier/<dataset>.yaml [key=value ...]

Writes output_dir/{config.yaml, run_info.json, <architecture>.safetensors, <architecture>.json, test_metrics.json};
point kandinsky_eval.py's oracle_dir at output_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from diffusion.cli import run  # noqa: E402
from diffusion.config import ClassifierConfig, stamp_run_dir  # noqa: E402


def main(cfg: ClassifierConfig) -> None:
    from diffusion.classifier_training import accuracy_table, train_classifiers

    stamp_run_dir(cfg)
    metrics = train_classifiers(cfg)
    print(accuracy_table(metrics))
    print(f"saved to {Path(cfg.output_dir) / 'test_metrics.json'}")


if __name__ == "__main__":
    run(ClassifierConfig, main, description=__doc__)
