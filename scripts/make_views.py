"""Remake the teaching views of finished editing runs from their files, without loading a model: per edit a flicker
GIF and a difference map, per image an annotated interpolation strip, and the pages index.html and quiz.html.

    python scripts/make_views.py RUN_DIR [RUN_DIR ...] [--frame_ms MS]

RUN_DIR is the output_dir of a kandinsky_eval.py run. The GIF frame time defaults to the run's views.gif_frame_ms
(config.yaml). Earlier views are overwritten; everything else in the folder is left as it is.
"""

import argparse
import sys
from pathlib import Path


from diffusion.cli import setup_logging
from diffusion.views.gallery import run_frame_ms, write_views


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a kandinsky_eval.py run")
    parser.add_argument("--frame_ms", type=int, help="flicker GIF: ms per frame (default: the run's config)")
    args = parser.parse_args(argv)
    if args.frame_ms is not None and args.frame_ms <= 0:
        parser.error("--frame_ms must be > 0")
    setup_logging()
    for run_dir in args.run_dirs:
        try:
            frame_ms = args.frame_ms if args.frame_ms is not None else run_frame_ms(run_dir)
            views = write_views(Path(run_dir), frame_ms=frame_ms)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{views['index']}\n{views['quiz']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
