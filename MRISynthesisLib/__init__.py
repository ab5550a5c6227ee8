"""MRISynthesisLib: the Slicer-free core of MRISynthesis (networks, preprocessing,
model bundles, volume inference, metrics and the ``mrisynthesis`` command line)."""

__version__ = "0.1.0"
