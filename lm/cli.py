"""What every command-line tool of ``lm`` does with a failure: one ``error:`` line, exit code 2.

    def main(argv=None) -> int:
        args = parser.parse_intermixed_args(argv)
        return run_tool(lambda: body(args), debug=args.debug)

A user's mistake (a bad value, a missing file, a folder that cannot be written) and an
unexpected failure both end in one line on stderr that says what went wrong, and the exit
code 2; no traceback. ``--debug`` (or the environment variable ``LM_DEBUG=1``) re-raises
instead, so the traceback shows; the error line says so. Ctrl-C ends with exit code 130
and, when the tool gives one, a line saying how to continue.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

DEBUG_ENV = "LM_DEBUG"
DEBUG_HINT = f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what shells report for Ctrl-C


class ToolError(Exception):
    """An error whose message is the whole story; ``code`` is the exit code (2 by default)."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)")


def debug_wanted(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined with '; ')."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(parts)


def describe(e: BaseException) -> str:
    """What to print after ``error:``; OS errors name the file, unexpected types their class."""
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return f"{e.strerror or one_line(e)}: {e.filename}"
    if isinstance(e, (ToolError, ValueError, OSError)):
        return one_line(e)
    return f"{type(e).__name__}: {one_line(e)}"


def fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"error: {message} {DEBUG_HINT}", file=sys.stderr)
    return code


def run_tool(body, debug: bool = False, on_interrupt=None) -> int:
    """Run ``body()`` (returns an exit code or None for 0) with the rules above.

    ``on_interrupt(exc)`` returns the line to print on Ctrl-C (how to continue), or None.
    """
    debug = debug_wanted(debug)
    fmt = warnings.formatwarning
    if not debug:   # a warning is one line too ("warning: ..."), not a file name and a source line
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        rc = body()
        return 0 if rc is None else int(rc)
    except KeyboardInterrupt as e:
        if debug:
            raise
        msg = on_interrupt(e) if on_interrupt is not None else None
        print(f"interrupted{': ' + msg if msg else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the point: no traceback for any failure
        if debug:
            raise
        return fail(describe(e), getattr(e, "code", EXIT_ERROR) if isinstance(e, ToolError) else EXIT_ERROR)
    finally:
        warnings.formatwarning = fmt
