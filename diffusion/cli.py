"""What every entry point does around its work: parse and validate the config, set up logging, and end in one of
three ways: done (exit 0), a problem the user can fix (one line naming it, exit 2), or stopped by Ctrl-C / SIGTERM
(one line saying what was kept and how to resume, exit 130). Never a traceback for either of the last two.

``--help`` lists every config key with its type, default and meaning, read from the schema; ``--print_config``
prints the resolved config (defaults, file and overrides merged) and exits; no arguments at all print what the
command does, the configs that exist for it, and an example.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Type, TypeVar

from diffusion.config import CONFIGS_DIR, SCHEMAS, help_text, load_config, to_yaml
from diffusion.errors import ConfigError, RunInterrupted, user_errors

C = TypeVar("C")
log = logging.getLogger("diffusion")


class _CurrentStdout(logging.Handler):
    """Writes each record's bare message to whatever sys.stdout is at that moment (a redirect or a test's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


# What a command produces on request (the merged config of --print_config, the usage text), as opposed to diagnostics:
# plain lines on stdout, whatever the logging setup, so `--print_config > run.yaml` writes a loadable config.
output = logging.getLogger("diffusion.output")
output.addHandler(_CurrentStdout())
output.setLevel(logging.INFO)
output.propagate = False

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_kind(schema: type) -> str:
    """The configs/ subfolder of a schema (edit, lora, embeds, classifier, mini)."""
    return next(k for k, s in SCHEMAS.items() if s is schema)


def available_configs(schema: type) -> List[str]:
    folder = CONFIGS_DIR / config_kind(schema)
    return sorted(str(p.relative_to(CONFIGS_DIR.parent)) for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _usage(prog: str, schema: type, description: str) -> str:
    configs = available_configs(schema)
    example = configs[0] if configs else f"configs/{config_kind(schema)}/<dataset>.yaml"
    demo = next((c for c in configs if c.endswith("demo.yaml")), example)
    lines = [description.strip(), "", f"Configs for this command ({config_kind(schema)}):"]
    lines += [f"  {c}" for c in configs] or ["  (none yet)"]
    lines += ["", "Example:", f"  python {prog} --config_path {demo}",
              f"  python {prog} --config_path {example} key.sub=value ...   (overrides, e.g. data.num_samples=5)",
              f"  python {prog} --help                                    (every config key)"]
    return "\n".join(lines)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing key.sub=value positionals (add them after a command's own positionals)."""
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")


def make_parser(schema: type, description: str, prog: Optional[str] = None, config_required: bool = False,
                overrides: bool = True) -> argparse.ArgumentParser:
    """The parser every config-driven command shares: --config_path, --print_config, key=value overrides (unless
    ``overrides`` is False: then call :func:`add_overrides` after adding positionals of your own), and the schema's
    keys in --help. Commands with options of their own add them to it."""
    epilog = "config keys (set in the YAML, or as key.sub=value overrides after it):\n" + help_text(schema)
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=config_required,
                        help="YAML file (see configs/); the paper's domain names work too, e.g. configs/edit/retina.yaml")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    if overrides:
        add_overrides(parser)
    return parser


def config_from_args(schema: Type[C], args: argparse.Namespace, overrides: Optional[Sequence[str]] = None,
                     check: Optional[Callable[[], None]] = None) -> C:
    """The validated config of parsed arguments (``overrides``: instead of ``args.overrides``); ``check`` may raise
    a ConfigError about the command's own options. A bad config logs one line and exits 2; ``--print_config``
    prints the merged config and exits 0."""
    try:
        if check is not None:
            check()
        if args.config_path is None:
            raise ConfigError("--config_path is required: " + (", ".join(available_configs(schema)) or
                                                               f"a YAML file in configs/{config_kind(schema)}/"))
        cfg = load_config(schema, args.config_path, list(args.overrides if overrides is None else overrides))
    except ConfigError as err:
        log.error("config error: %s", err)
        raise SystemExit(EXIT_USER_ERROR) from None
    if args.print_config:
        output.info(to_yaml(cfg).rstrip("\n"))
        raise SystemExit(0)
    return cfg


def parse_args(schema: Type[C], argv: Optional[Sequence[str]] = None, description: str = "",
               prog: Optional[str] = None) -> C:
    """``--config_path FILE [key.sub=value ...]`` -> validated config; logs the problem and exits 2 on a bad one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or _display_prog()
    if not argv:
        output.info(_usage(_display_prog(), schema, description))
        raise SystemExit(EXIT_USER_ERROR)
    args = make_parser(schema, description, prog).parse_args(argv)
    return config_from_args(schema, args)


def _display_prog() -> str:
    """The command as the user typed it, relative to the current folder when possible."""
    if not sys.argv or not sys.argv[0]:
        return "command"
    path = Path(sys.argv[0])
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def guarded(main: Callable[[], object], interrupted: str = "") -> int:
    """Run ``main()``; turn user errors into one logged line + 2, interrupts into one line + 130. Returns the code."""
    try:
        main()
    except RunInterrupted as err:
        log.error("interrupted: %s", err)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        log.error("interrupted: %s", interrupted or "stopped before finishing; rerun the same command to resume")
        return EXIT_INTERRUPTED
    except user_errors() as err:
        log.error("%s", err)
        return EXIT_USER_ERROR
    return 0


def run(schema: Type[C], main: Callable[[C], object], argv: Optional[Sequence[str]] = None,
        description: str = "", interrupted: str = "") -> None:
    """``--config_path FILE [key=value ...]`` -> validated config -> ``main(cfg)``; exits 0, 2 (user error, one
    line) or 130 (interrupted; ``interrupted`` says what is kept and how to resume)."""
    setup_logging()
    cfg = parse_args(schema, argv, description)  # exits 2 on a bad config, before anything heavy is imported
    code = guarded(lambda: main(cfg), interrupted)
    if code:
        sys.exit(code)
