"""Compare editing runs side by side: recompute each run's summary from its results.csv and print one markdown table,
a row per run (flip rate over all attempted images, overall and per direction; LPIPS and L2 of the flipped edits;
mean t_skip; UNet evaluations and seconds per image).

    python scripts/analyze_results.py RUN_DIR [RUN_DIR ...] [--output table.md]

RUN_DIR is the output_dir of a kandinsky_eval.py run. Nothing in the run folders is modified.
"""

import argparse
import sys
from pathlib import Path


from diffusion.metrics import comparison_table, load_run_rows, run_settings, summarize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a kandinsky_eval.py run")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    runs = []
    for run_dir in args.run_dirs:
        try:
            rows = load_run_rows(run_dir)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        runs.append((run_dir, summarize(rows), run_settings(run_dir)))
    table = comparison_table(runs)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
