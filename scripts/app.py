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

from diffusion.cli import EXIT_USER_ERROR, guarded, log, setup_logging
from diffusion.config import EditConfig, help_text, load_config, to_yaml
from diffusion.errors import ConfigError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML, or as key.sub=value overrides):\n" + help_text(EditConfig))
    parser.add_argument("--config_path", required=True, help="an editing config (configs/edit/<dataset>.yaml)")
    parser.add_argument("--port", type=int, help="port to serve on (default: the first free one from 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                            "0.0.0.0 serves the local network, without a password)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. guidance_scale=3")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    setup_logging()
    args = make_parser().parse_intermixed_args(argv)
    try:
        if args.port is not None and not 0 < args.port < 65536:
            raise ConfigError(f"--port {args.port} is not a port number (1..65535)")
        cfg = load_config(EditConfig, args.config_path, args.overrides)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(EXIT_USER_ERROR)
    if args.print_config:
        print(to_yaml(cfg), end="")
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
