"""Edit one image towards a class and write its teaching views.

    python scripts/edit_image.py IMAGE --config_path configs/edit/<dataset>.yaml --target CLASS
        [--source CLASS] [--eta ETA] [--t_skip T] [--output DIR] [key.sub=value ...]

With an oracle (oracle_dir) t_skip is searched as the config says (search, t_skips); --t_skip (or, without an
oracle, the config's t_skip) edits at that t_skip instead. The source class defaults to the oracle's prediction.
Writes counterfactual.png, pair.png, flicker.gif, difference.png, strip.png and edit.json into DIR (default
<output_dir>/single/<image>_to_<target>) and prints where.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from diffusion.cli import add_overrides, config_from_args, guarded, setup_logging
from diffusion.cli import make_parser as make_config_parser
from diffusion.config import EditConfig
from diffusion.errors import ConfigError


def make_parser() -> argparse.ArgumentParser:
    parser = make_config_parser(EditConfig, __doc__, prog="scripts/edit_image.py", config_required=True,
                                overrides=False)
    parser.add_argument("image", help="the image file to edit (any image format, or .npy)")
    parser.add_argument("--target", required=True, help="the class to edit the image towards")
    parser.add_argument("--source", help="the image's class (default: the oracle's prediction)")
    parser.add_argument("--eta", type=float, help="manipulation scale; the same as eta=[ETA] (several: eta=[1,2])")
    parser.add_argument("--t_skip", type=float, help="edit at this t_skip (0..1) instead of searching; the same as "
                                                     "search=fixed t_skip=T")
    parser.add_argument("--output", help="folder for the files (default: <output_dir>/single/<image>_to_<target>)")
    add_overrides(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    args = make_parser().parse_intermixed_args(argv)
    # the options are config keys too, so the stamped config.yaml says what was done
    overrides = list(args.overrides)
    if args.eta is not None:
        overrides.append(f"eta=[{args.eta!r}]")
    if args.t_skip is not None:
        overrides += ["search=fixed", f"t_skip={args.t_skip!r}"]

    def check_t_skip() -> None:
        if args.t_skip is not None and not 0.0 <= args.t_skip <= 1.0:
            raise ConfigError(f"--t_skip {args.t_skip:g} must lie in [0, 1] (the share of the steps skipped)")

    try:
        cfg = config_from_args(EditConfig, args, overrides, check=check_t_skip)
    except SystemExit as done:
        if done.code:
            sys.exit(done.code)
        return

    def work() -> None:
        from diffusion.interactive import edit_image_files

        result = edit_image_files(cfg, args.image, args.target, source=args.source, output=args.output)
        for e in result.edits:
            verdict = "" if e.flipped is None else (" (flipped)" if e.flipped else " (not flipped)")
            print(f"{result.source} -> {result.target}, eta {e.eta:g}: t_skip {e.t_skip}{verdict}")
        for name, path in result.files.items():
            print(f"{name}: {path}")

    code = guarded(work)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
