"""Counterfactual edits: every eval image of one class turned minimally into the other class (DIFFusion).

    python kandinsky_eval.py --config_path configs/edit/<dataset>.yaml [key=value ...]
    accelerate launch --num_processes N kandinsky_eval.py --config_path ...      (images split across processes)

Writes output_dir/{config.yaml, run_info.json, results.csv, summary.json, edits/..., index.html, quiz.html,
study.html}; re-running the same command resumes.
"""

from diffusion.cli import run
from diffusion.config import EditConfig


def main(cfg: EditConfig) -> None:
    from diffusion.edit.run import run_edits

    run_edits(cfg)


if __name__ == "__main__":
    run(EditConfig, main, description=__doc__,
        interrupted="the rows already written to results.csv / shards are kept; rerun the same command to resume")
