"""Exceptions with messages meant for the user: each names the problem and the input."""


class MRISynthesisError(Exception):
    """Base class for errors the command line and the Slicer module report as one line."""


class InputError(MRISynthesisError, ValueError):
    """An input volume, mask or path cannot be used (missing, wrong shape, NaN, empty...)."""


class BundleError(MRISynthesisError, ValueError):
    """A model bundle is missing, truncated, of another format, corrupted or mismatched."""


class Cancelled(MRISynthesisError):
    """The caller's cancel flag was raised; no output was produced."""
