"""Analyse a teaching study run with study.html: per arm the pre- and post-test accuracy, the learning gain with a 95%
bootstrap interval over participants, the difference of gains between arms (bootstrap interval, permutation test),
per-class accuracy; a markdown table on stdout, every number as JSON, and a figure.

    python scripts/analyze_study.py ANSWERS.csv [ANSWERS.csv ...] [--plot DIR] [--json FILE] [--output FILE]

ANSWERS.csv: files downloaded from study.html (one per participant, or the organiser's combined file from
study.html?results=all; the same answers in several files count once). Nothing is written unless asked.
"""

import argparse
import sys
from pathlib import Path

from diffusion.cli import setup_logging
from diffusion.errors import DiffusionError
from diffusion.files import atomic_write_json, atomic_write_text
from diffusion.study import analyze, markdown_report, read_answers, save_figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("answers", nargs="+", metavar="ANSWERS.csv", help="answers CSV(s) downloaded from study.html")
    parser.add_argument("--plot", metavar="DIR", help="write DIR/study_results.png")
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    parser.add_argument("--output", metavar="FILE", help="also write the markdown tables to FILE")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--permutations", type=int, default=10000, help="permutation test draws (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the permutations")
    args = parser.parse_args(argv)
    if args.resamples <= 0 or args.permutations <= 0:
        parser.error("--resamples and --permutations must be > 0")
    setup_logging()
    try:
        rows = read_answers(args.answers)
        result = analyze(rows, resamples=args.resamples, seed=args.seed, permutations=args.permutations)
        table = markdown_report(result)
        result["files"] = [str(Path(p)) for p in args.answers]
        if args.json:
            atomic_write_json(args.json, result)
        if args.output:
            atomic_write_text(args.output, table + "\n")
        if args.plot:
            figure = save_figure(result, Path(args.plot) / "study_results.png")
            print(f"figure: {figure}", file=sys.stderr)
    except DiffusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
