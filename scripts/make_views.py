"""Remake the teaching views of finished editing runs from their files, without loading a model: per edit a flicker
GIF and a difference map, per image an interpolation strip, the run's figures (figures/: PNG, SVG, figures.csv and
figures.json) and the pages index.html, quiz.html and study.html.

    python scripts/make_views.py RUN_DIR [RUN_DIR ...] [--frame_ms MS]

RUN_DIR is the output_dir of a kandinsky_eval.py run. The GIF frame time is --frame_ms, else the one the views were
made with (views.json), else the run's views.gif_frame_ms (config.yaml); new options are logged before the views are
re-rendered with them. Earlier views are overwritten; everything else in the folder is left as it is.
"""

import argparse
import sys
from pathlib import Path


from diffusion.cli import EXIT_USER_ERROR, setup_logging
from diffusion.errors import user_errors
from diffusion.views.gallery import run_frame_ms, views_options, write_views


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a kandinsky_eval.py run")
    parser.add_argument("--frame_ms", type=int,
                        help="flicker GIF: ms per frame (default: views.json, else the run's config.yaml)")
    args = parser.parse_args(argv)
    if args.frame_ms is not None and args.frame_ms <= 0:
        parser.error("--frame_ms must be > 0")
    setup_logging()
    for run_dir in args.run_dirs:
        try:
            made_with = views_options(run_dir) or {}
            frame_ms = next(v for v in (args.frame_ms, made_with.get("gif_frame_ms"), run_frame_ms(run_dir))
                            if v is not None)
            views = write_views(Path(run_dir), frame_ms=int(frame_ms))
        except user_errors() as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        print("\n".join(str(views[page]) for page in ("index", "quiz", "study") if views.get(page)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
