"""Exceptions with messages meant for the user: each names the problem and the input,
and the one way the command lines report them (``run_command``)."""

import logging
import sys
import warnings


class MRISynthesisError(Exception):
    """Base class for errors the command line and the Slicer module report as one line."""


class InputError(MRISynthesisError, ValueError):
    """An input volume, mask or path cannot be used (missing, wrong shape, NaN, empty...)."""


class BundleError(MRISynthesisError, ValueError):
    """A model bundle is missing, truncated, of another format, corrupted or mismatched."""


class Cancelled(MRISynthesisError):
    """The caller's cancel flag was raised; no output was produced."""


def run_command(func, args, prog: str = "mrisynthesis") -> int:
    """Run a command-line handler ``func(args)``: library errors become one line
    ``PROG: error: ...`` and exit status 2, Ctrl-C exit status 130 with nothing written."""
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(levelname)s: %(message)s")
    warnings.simplefilter("ignore", UserWarning)  # resampling warnings are logged once instead
    try:
        return func(args)
    except MRISynthesisError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
