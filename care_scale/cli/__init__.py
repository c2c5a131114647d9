"""The ``care-scale`` command line.

Each sub-command lives in its own module of this package and maps one-to-one to a library
call; this file only wires them together and turns care-scale errors into one line on stderr.
Heavy imports (torch, ray, deltalake) happen inside the handlers, never at import time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name of the sub-command -> module in care_scale.cli that defines ``add_parser(subparsers)``.
COMMANDS = ("inspect", "embed", "tables", "sql", "probe", "similar", "show", "report", "train",
            "export", "models", "bench")


def package_version() -> str:
    """The installed care-scale distribution's version (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("care-scale")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="care-scale",
        description="Cohort-scale CARE slide embeddings: inspect slides, embed cohorts into "
        "Delta Lake, query them, pretrain and export the encoders.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"care_scale.cli.{name}").add_parser(sub)
    return parser


def _one_line_warnings(default):
    """care-scale's own warnings as one line each on stderr (``Name: message``), instead of
    Python's file:line plus source excerpt; everything else is shown as ``default`` shows it."""
    from care_scale.exceptions import CareScaleWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CareScaleWarning):
            print(f"{category.__name__}: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    import warnings

    from care_scale import timeline

    timeline.reset()
    timeline.mark("cli")  # the interpreter is up and care_scale.cli imported

    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # the display is restored when the command ends
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from care_scale.exceptions import CareScaleError

    try:
        code = args.func(args)
    except CareScaleError as exc:
        if args.debug:
            raise
        # One line, starting with the class name, naming the file and the reason.
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`care-scale sql ... | head`): stop quietly, as `cat` does.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
