"""Shipped model bundles: where they live and which one fits the inputs a user has.

Shipped bundles are ``<name>.safetensors`` files in ``Resources/Models`` of the source
tree / installed Slicer extension, or in the folder named by ``MRISYNTHESIS_MODELS``.
Their names say what they take: ``t1_to_flair``, ``t1_t2_to_flair``,
``t1_t2_t1c_to_flair``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional

# Same value as bundle.BUNDLE_SUFFIX, defined here so that listing and resolving models never
# imports torch (the Slicer panel lists models before PyTorch is installed).
BUNDLE_SUFFIX = ".safetensors"
from .errors import BundleError

MODELS_ENV = "MRISYNTHESIS_MODELS"


def models_dirs() -> List[Path]:
    dirs = []
    if os.environ.get(MODELS_ENV):
        dirs.append(Path(os.environ[MODELS_ENV]))
    dirs.append(Path(__file__).resolve().parent.parent / "Resources" / "Models")
    return dirs


def bundle_name(sources: Iterable[str], target: str = "flair") -> str:
    return "_".join(sources) + f"_to_{target}"


def shipped_bundles() -> dict:
    """{name: path} of the shipped bundles found (first folder wins for a name)."""
    found = {}
    for folder in models_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{BUNDLE_SUFFIX}")):
                found.setdefault(path.name[: -len(BUNDLE_SUFFIX)], path)
    return found


def resolve_model(model: Optional[str], sources: Iterable[str], target: str = "flair") -> Path:
    """A bundle path from ``model`` (a file path or a shipped name), or when ``model`` is
    None the shipped bundle whose sources are exactly ``sources``."""
    shipped = shipped_bundles()
    if model:
        if os.path.exists(model):
            return Path(model)
        if model in shipped:
            return shipped[model]
        raise BundleError(f"model {model!r} is neither a file nor a shipped model "
                          f"(shipped: {', '.join(sorted(shipped)) or 'none installed'})")
    sources = [s for s in ("t1", "t2", "t1c") if s in set(sources)]
    name = bundle_name(sources, target)
    if name in shipped:
        return shipped[name]
    raise BundleError(f"no shipped model takes exactly {' + '.join(sources) or 'no inputs'} -> {target} "
                      f"(shipped: {', '.join(sorted(shipped)) or 'none installed'}); pass --model")
