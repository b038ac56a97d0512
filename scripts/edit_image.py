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

from diffusion.cli import EXIT_USER_ERROR, guarded, log, setup_logging
from diffusion.config import EditConfig, help_text, load_config, to_yaml
from diffusion.errors import ConfigError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/edit_image.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML, or as key.sub=value overrides):\n" + help_text(EditConfig))
    parser.add_argument("image", help="the image file to edit (any image format, or .npy)")
    parser.add_argument("--config_path", required=True, help="an editing config (configs/edit/<dataset>.yaml)")
    parser.add_argument("--target", required=True, help="the class to edit the image towards")
    parser.add_argument("--source", help="the image's class (default: the oracle's prediction)")
    parser.add_argument("--eta", type=float, help="manipulation scale; the same as eta=[ETA] (several: eta=[1,2])")
    parser.add_argument("--t_skip", type=float, help="edit at this t_skip (0..1) instead of searching; the same as "
                                                     "search=fixed t_skip=T")
    parser.add_argument("--output", help="folder for the files (default: <output_dir>/single/<image>_to_<target>)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. guidance_scale=3")
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
    try:
        if args.t_skip is not None and not 0.0 <= args.t_skip <= 1.0:
            raise ConfigError(f"--t_skip {args.t_skip:g} must lie in [0, 1] (the share of the steps skipped)")
        cfg = load_config(EditConfig, args.config_path, overrides)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(EXIT_USER_ERROR)
    if args.print_config:
        print(to_yaml(cfg), end="")
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
