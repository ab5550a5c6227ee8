"""Training and evaluation of MRISynthesis models (``python -m training train|evaluate|export|subjects``).

Builds on MRISynthesisLib (networks, preprocessing, bundle format, metrics); see
docs/training.md.
"""
