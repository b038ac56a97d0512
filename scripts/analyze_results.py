"""Analyse editing runs from their results.csv: a markdown table comparing them (a row per run or series), then per
series its sweep table (flip rate, judge flip rate, LPIPS and L2 per direction, eta and t_skip) or, for searched runs,
the distribution of the chosen t_skip, of the distances and of the UNet evaluations. Every rate and mean carries a
95% interval; the output says which (Wilson over independent rows, else a seeded bootstrap over images).

    python scripts/analyze_results.py RUN_DIR [RUN_DIR ...] [--by KEY] [--plot DIR] [--output table.md]
                                      [--json figures.json] [--csv figures.csv]

RUN_DIR is the output_dir of a kandinsky_eval.py run. --by KEY (a dotted key of each run's config.yaml, e.g.
lora.step) names the series by that value, orders them by it and pools runs that share it. --plot DIR writes the
figures as PNG and SVG, with figures.json and figures.csv beside them. Nothing in the run folders is modified.
"""

import argparse
import sys
from pathlib import Path

from diffusion.analysis import analyze, figure_records, load_series, markdown_report, write_records_csv
from diffusion.cli import EXIT_USER_ERROR, setup_logging
from diffusion.errors import user_errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a kandinsky_eval.py run")
    parser.add_argument("--by", metavar="KEY", help="series by this dotted config.yaml key, e.g. lora.step")
    parser.add_argument("--plot", metavar="DIR", help="write the figures (PNG, SVG) and figures.json/.csv here")
    parser.add_argument("--output", help="also write the markdown to this file")
    parser.add_argument("--json", help="write every figure (nested, with the summaries) to this JSON file")
    parser.add_argument("--csv", help="write every figure, one per line, to this CSV file")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        analysis = analyze(load_series(args.run_dirs, args.by), args.by)
        report = markdown_report(analysis)
        print(report)
        write_outputs(analysis, report, args)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def write_outputs(analysis, report: str, args) -> None:
    from diffusion.files import atomic_write_text

    if args.output:
        atomic_write_text(args.output, report + "\n")
    paths = {"json": args.json, "csv": args.csv}
    if args.plot:
        from diffusion.views.figures import write_figures

        written = write_figures(analysis, args.plot)
        paths = {k: v or str(Path(args.plot) / f"figures.{k}") for k, v in paths.items()}
        for w in written:
            print(f"figure: {w['png']} {w['svg']}", file=sys.stderr)
    if paths["json"]:
        from diffusion.files import atomic_write_json

        atomic_write_json(paths["json"], analysis)
    if paths["csv"]:
        write_records_csv(paths["csv"], figure_records(analysis))


if __name__ == "__main__":
    sys.exit(main())
