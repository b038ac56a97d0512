"""A local web app with live sliders: pick an eval image or upload one, pick the target class, move eta and t_skip,
and see the counterfactual, the flicker, the difference map and the classifiers' probabilities.

    python scripts/app.py --config_path configs/edit/<dataset>.yaml [--port N] [--host 127.0.0.1] [key.sub=value ...]

Serves on 127.0.0.1 (this machine only) unless --host says otherwise; works offline (no analytics, no share link,
no remote fonts). The image's inversion is cached, so a slider move costs only its sampling. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from diffusion.cli import config_from_args, guarded, setup_logging
from diffusion.cli import make_parser as make_config_parser
from diffusion.config import EditConfig
from diffusion.errors import ConfigError


def make_parser() -> argparse.ArgumentParser:
    parser = make_config_parser(EditConfig, __doc__, prog="scripts/app.py", config_required=True)
    parser.add_argument("--port", type=int, help="port to serve on (default: the first free one from 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                            "0.0.0.0 serves the local network, without a password)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    args = make_parser().parse_intermixed_args(argv)

    def check_port() -> None:
        if args.port is not None and not 0 < args.port < 65536:
            raise ConfigError(f"--port {args.port} is not a port number (1..65535)")

    try:
        cfg = config_from_args(EditConfig, args, check=check_port)
    except SystemExit as done:
        if done.code:
            sys.exit(done.code)
        return

    def work() -> None:
        from diffusion.app import AppModel, launch
        from diffusion.interactive import EditSession, load_workbench

        launch(AppModel(EditSession(load_workbench(cfg))), host=args.host, port=args.port)

    code = guarded(work, interrupted="the app stopped")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
