"""Choose eta, guidance_scale and flip_threshold on validation images of the TRAIN split (never the test set).

    python scripts/calibrate.py --config_path configs/edit/demo.yaml --pairs 3,8 4,9 1,7 0,6 \\
        --etas 0.75 1 1.5 --guidance 1 2 4 --thresholds argmax 0.8 --agreements mean all --images 8 \\
        [--output snippet.yaml] [-- key=value ...]

Config overrides (key=value) go after a lone `--`, since the list options above would take them as values.

Every setting is run on --images held-out train images per class, both ways of every pair; the oracle (oracle_dir)
picks each image's t_skip as `search: first_flip` would, and the independent judge (judge_dir) scores the result.
Printed: every setting's oracle and judge flip rates (with a 95% Wilson interval), the share of judged flips closer
to their source than the source is to its nearest real train image of the target class, and their pixel L2. The rule
(diffusion/edit/calibrate.py: choose): the setting whose worst direction does best on both counts (per direction, the
smaller of the judge flip rate and the closer share; the highest such minimum over directions), then the highest
overall judge flip rate, then closer share, then the smallest L2. The
chosen values are printed (and written to --output) as a config snippet.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from diffusion.cli import add_overrides, config_from_args, guarded, setup_logging
from diffusion.cli import make_parser as make_config_parser
from diffusion.config import EditConfig
from diffusion.errors import ConfigError


def _pair(text: str):
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a class pair like 3,8")
    return parts[0], parts[1]


def _number(text: str) -> float:
    if "=" in text:
        raise argparse.ArgumentTypeError(f"'{text}' looks like a config override: put overrides after a lone --, "
                                         "e.g. ... --t_skips 0.9 0.7 -- model.device=cuda")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _threshold(text: str):
    if text == "argmax":
        return None
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"flip_threshold {text} must lie strictly between 0 and 1 (or be argmax)")
    return value


def main(argv=None) -> int:
    parser = make_config_parser(EditConfig, __doc__, prog="scripts/calibrate.py", config_required=True,
                                overrides=False)
    parser.add_argument("--pairs", type=_pair, nargs="+", help="class pairs a,b (both directions are edited); "
                                                              "default: the config's two classes")
    parser.add_argument("--images", type=int, default=8, help="validation images per class (held out of the means)")
    parser.add_argument("--etas", type=_number, nargs="+", default=[0.75, 1.0, 1.5])
    parser.add_argument("--guidance", type=_number, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--thresholds", type=_threshold, nargs="+", default=[None, 0.8],
                        help="flip_threshold values; 'argmax' is the paper's rule")
    parser.add_argument("--agreements", nargs="+", default=["mean"], choices=["mean", "all"],
                        help="flip_agreement values: mean (the ensemble decides) or all (every member too)")
    parser.add_argument("--t_skips", type=_number, nargs="+", help="default: the config's t_skips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the chosen config snippet here")
    add_overrides(parser)
    args = parser.parse_args(argv)
    setup_logging()

    def check_images() -> None:
        if args.images < 1:
            raise ConfigError("--images must be at least 1")

    base = config_from_args(EditConfig, args, check=check_images)

    def work() -> None:
        from diffusion.devices import resolve_device
        from diffusion.edit.calibrate import (Setting, calibrate, choose, direction_table, snippet, table,
                                              validation_seen)
        from diffusion.edit.run import load_classifiers, load_pipeline
        from diffusion.files import atomic_write_text

        if base.oracle_dir is None or base.judge_dir is None:
            raise ConfigError("calibration needs both oracle_dir (it picks t_skip) and judge_dir (it scores the "
                              "edits): set them in the config or as overrides")
        pairs = args.pairs or ([tuple(base.data.classes)] if len(base.data.classes) == 2 else None)
        if not pairs:
            raise ConfigError("name the class pairs with --pairs a,b [c,d ...] (the config does not list two classes)")
        classes = sorted({c for p in pairs for c in p})
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, classes=classes, num_samples=None))
        clf = load_classifiers(cfg, classes, resolve_device(cfg.model.device))
        pipe = load_pipeline(cfg, resolve_device(cfg.model.device))
        settings = [Setting(e, g, t, a) for e in args.etas for g in args.guidance for t in args.thresholds
                    for a in args.agreements]
        results = calibrate(cfg, pipe, clf.oracle, clf.judge, pairs, settings, args.t_skips or cfg.t_skips,
                            args.images, args.seed)
        chosen = choose(results)
        print(table(results, chosen))
        print(f"\nrule: the setting whose worst direction does best on both counts (per direction the smaller of the "
              f"judge flip rate and the share of judged flips closer to their source than its nearest real image of "
              f"the target class; the highest such minimum), then the highest overall judge flip rate, closer share, "
              f"smallest L2 ({args.images} validation images per class from {cfg.data.train_split}).")
        if chosen is None:
            print("no setting made an edit the judge accepts: try larger etas or guidance, or check the judge")
            return
        print("\nthe chosen setting by direction:\n" + direction_table(chosen))
        seen = validation_seen(cfg, classes, args.images, args.seed)
        if seen:
            print(seen)
        text = snippet(chosen, pairs, args.images)
        print("\n" + text, end="")
        if args.output:
            atomic_write_text(args.output, text)
            print(f"(written to {args.output})")

    return guarded(work)


if __name__ == "__main__":
    sys.exit(main())
