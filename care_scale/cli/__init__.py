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
    """Run one command. ``argv=None`` (the ``care-scale`` process itself: the console script,
    ``python -m care_scale``) also ends the process when the command is done (``_fast_exit``);
    with an explicit ``argv`` (tests, ``jobs/*.py``) it returns the exit code."""
    import warnings

    from care_scale import timeline

    timeline.reset()
    timeline.mark("cli")  # the interpreter is up and care_scale.cli imported

    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # the display is restored when the command ends
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        code = _run(args)
    if argv is None and os.environ.get(FAST_EXIT_ENV, "1") != "0":
        _fast_exit(code)
    return code


#: ``0`` turns :func:`_fast_exit` off (the interpreter's own teardown runs, as before).
FAST_EXIT_ENV = "CARE_SCALE_FAST_EXIT"


def _fast_exit(code: int) -> None:
    """End the process without the interpreter's module teardown: after an embedding run,
    unloading torch, ONNX Runtime and Ray Data (their finalizers and C++ static destructors)
    takes 1-2 s on 2 cores (``benchmarks/bench_fixed_cost.py``) and does nothing a finished
    command needs. What a normal exit waits for still happens first: non-daemon threads are
    joined, the atexit handlers run (Ray's, temporary folders' cleanup, logging's flush), the
    standard streams are flushed."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that went away
            pass
    os._exit(code)


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
