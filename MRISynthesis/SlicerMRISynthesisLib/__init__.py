"""Helpers of the MRISynthesis Slicer module, kept in a package because Slicer loads every
top-level ``*.py`` of a scripted-module folder as a module of its own.

Qt-free throughout (MRML, numpy and MRISynthesisLib only), so CI tests it with slicer-core:
``scene`` (volume nodes <-> MRISynthesisLib, the scene rules), ``jobs`` (synthesis in a
worker thread, applied to the scene on the main thread), ``dependencies`` (checking and
installing the Python packages on Slicer 5.8-5.12+), ``modelinfo`` (labels and model cards
of the shipped models, read without torch).

Importing this package makes the core package ``MRISynthesisLib`` importable, and nothing
else: in an installed extension it sits next to this package (qt-scripted-modules/), which
Slicer already has on ``sys.path``; in a source checkout it is ``../../MRISynthesisLib`` and
is loaded from its own location, so the repository root (with ``training/``, ``scripts/``...)
never goes on ``sys.path``.
"""

import importlib.util
import os
import sys

CORE_PACKAGE = "MRISynthesisLib"


def _coreCandidates():
    here = os.path.dirname(os.path.abspath(__file__))
    moduleDir = os.path.dirname(here)
    return (os.path.join(moduleDir, CORE_PACKAGE),  # installed extension: a sibling
            os.path.join(os.path.dirname(moduleDir), CORE_PACKAGE))  # source tree: repository root


def ensureCoreImportable():
    """Make ``import MRISynthesisLib`` work without adding any folder to ``sys.path``.

    The copy beside this package wins (installed extension, or source tree); an already
    imported or otherwise importable MRISynthesisLib is used only when neither exists.
    Returns the package's folder.
    """
    if CORE_PACKAGE in sys.modules:
        return os.path.dirname(sys.modules[CORE_PACKAGE].__file__)
    for folder in _coreCandidates():
        init = os.path.join(folder, "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(CORE_PACKAGE, init, submodule_search_locations=[folder])
            module = importlib.util.module_from_spec(spec)
            sys.modules[CORE_PACKAGE] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[CORE_PACKAGE]
                raise
            return folder
    if importlib.util.find_spec(CORE_PACKAGE) is not None:
        return os.path.dirname(importlib.util.find_spec(CORE_PACKAGE).origin)
    raise ImportError(f"{CORE_PACKAGE} not found next to the MRISynthesis module ({' or '.join(_coreCandidates())}); "
                      "the extension is incompletely installed")


ensureCoreImportable()
