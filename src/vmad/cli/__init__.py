"""The ``vmad`` command. Each subcommand lives in its own module with a ``register(subparsers)`` function."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from vmad import __version__
from vmad.errors import VMADError, VMADWarning

# Subcommand modules under vmad.cli; each defines register(subparsers) and sets a `func` default.
SUBCOMMANDS: tuple[str, ...] = (
    "bench", "calibrate", "chat", "data", "detect", "eval", "model", "serve", "train"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmad", description="VMAD zero-shot industrial anomaly detection")
    parser.add_argument("--version", action="version", version=f"vmad {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"vmad.cli.{name}")
        module.register(subparsers)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """``warning: <message>`` for vmad's own warnings (VMADWarning); Python's format for the others."""
    if issubclass(category, VMADWarning):
        return f"warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VMADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a command that closed early (e.g. `| head`): not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
