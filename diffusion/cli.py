"""What every entry point does around its work: parse and validate the config, set up logging, turn the errors a user
can fix into one clear line and exit status 2 (instead of a traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence, Type, TypeVar

from diffusion.config import ConfigError, load_config

C = TypeVar("C")
log = logging.getLogger("diffusion")


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors() -> tuple:
    """Exception types whose message is meant for the user (bad config, data or weights), not a bug report."""
    from datasets.images import BadImageError
    from diffusion.embeddings import EmbeddingsError
    from diffusion.metrics import LpipsError
    from diffusion.models import ModelLoadError
    from diffusion.oracle import OracleError
    from diffusion.training import CheckpointError

    return (ConfigError, ModelLoadError, EmbeddingsError, BadImageError, CheckpointError, OracleError, LpipsError,
            FileNotFoundError)


def parse_args(schema: Type[C], argv: Optional[Sequence[str]] = None, description: str = "") -> C:
    """``--config_path FILE [key.sub=value ...]`` -> validated config; logs the problem and exits 2 on a bad config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config_path", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")
    args = parser.parse_args(argv)
    try:
        return load_config(schema, args.config_path, args.overrides)
    except ConfigError as err:
        log.error("config error: %s", err)
        raise SystemExit(2) from None


def run(schema: Type[C], main: Callable[[C], object], argv: Optional[Sequence[str]] = None,
        description: str = "") -> None:
    """``--config_path FILE [key=value ...]`` -> validated config -> ``main(cfg)``; user errors exit 2 with a message."""
    setup_logging()
    cfg = parse_args(schema, argv, description)  # exits 2 on a bad config, before anything heavy is imported
    try:
        main(cfg)
    except user_errors() as err:
        log.error("%s", err)
        sys.exit(2)
