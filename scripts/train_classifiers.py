"""Train a classifier folder (an editing run's oracle_dir, or its independent judge_dir): an ensemble of K-way
networks (torchvision's ResNet-18 / EfficientNet-B0 / MobileNet-V2, or small nets for small images: lenet,
small_vgg, mlp, logistic) or a CLIP linear probe (kind: clip_probe). One safetensors checkpoint + JSON per member;
members below min_accuracy on the validation images are not written; each member's and the ensemble's test
accuracy with a 95% Wilson interval, overall and per class, is printed and saved.

    python scripts/train_classifiers.py --config_path configs/classifier/<dataset>.yaml [key=value ...]

Writes output_dir/{config.yaml, run_info.json, <architecture>.safetensors, <architecture>.json, test_metrics.json};
point kandinsky_eval.py's oracle_dir (or judge_dir) at output_dir. An independent judge: other architectures and
another train_part than the oracle's (see configs/classifier/demo_judge.yaml).
"""

from pathlib import Path

from diffusion.cli import run
from diffusion.config import ClassifierConfig


def main(cfg: ClassifierConfig) -> None:
    from diffusion.oracle.training import accuracy_table, train_classifiers

    metrics = train_classifiers(cfg)
    print(accuracy_table(metrics))
    print(f"saved to {Path(cfg.output_dir) / 'test_metrics.json'}")


if __name__ == "__main__":
    run(ClassifierConfig, main, description=__doc__,
        interrupted="members already written are kept, but the folder has no test_metrics.json until a run "
                    "finishes; rerun the same command")
