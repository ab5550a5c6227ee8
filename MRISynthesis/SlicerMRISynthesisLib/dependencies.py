"""Python packages MRISynthesis needs inside 3D Slicer, and installing them on first use.

Qt-free: asking the user and installing are injected (the module passes Slicer's dialog,
the PyTorch extension's installer and ``pip_ensure``), so the decision logic is tested
under plain Python. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Callable, List, Optional, Sequence, Tuple

log = logging.getLogger("MRISynthesis")

# (import name, pip requirement). SimpleITK and numpy ship with Slicer and must not be
# replaced by pip (Slicer's SimpleITK has Slicer-specific IO), so they are only checked.
TORCH_REQUIREMENT = ("torch", "torch>=2.1")
PIP_REQUIREMENTS = (
    ("nibabel", "nibabel>=5.0"),
    ("skimage", "scikit-image>=0.21"),
    ("safetensors", "safetensors>=0.4"),
)
BUNDLED_WITH_SLICER = ("numpy", "SimpleITK")


def missingRequirements(findSpec: Callable = importlib.util.find_spec) -> List[Tuple[str, Optional[str]]]:
    """[(import name, requirement)] of the packages that cannot be imported (no import done)."""
    missing = []
    for module, requirement in (TORCH_REQUIREMENT, *PIP_REQUIREMENTS, *((m, None) for m in BUNDLED_WITH_SLICER)):
        if findSpec(module) is None:
            missing.append((module, requirement))
    return missing


class DependencyInstaller:
    """Checks the packages and, with the user's confirmation, installs the missing ones.

    confirm(message) -> bool asks the user; installTorch(requirement) installs PyTorch (the
    PyTorch extension picks a CUDA build when a GPU is present); pipInstall([requirements])
    installs the rest. Each installer raises on failure.
    """

    def __init__(self, confirm: Callable[[str], bool], installTorch: Callable[[str], None],
                 pipInstall: Callable[[Sequence[str]], None], findSpec: Callable = importlib.util.find_spec):
        self.confirm = confirm
        self.installTorch = installTorch
        self.pipInstall = pipInstall
        self.findSpec = findSpec

    def ensure(self) -> bool:
        """True when everything is importable (after installing if the user agreed); False
        when the user declined. Raises RuntimeError if something cannot be installed."""
        missing = missingRequirements(self.findSpec)
        if not missing:
            return True
        unfixable = [module for module, requirement in missing if requirement is None]
        if unfixable:
            raise RuntimeError(f"{', '.join(unfixable)} should come with 3D Slicer but cannot be imported; "
                               "this Slicer installation looks broken (reinstall Slicer)")
        names = ", ".join(requirement for _, requirement in missing)
        if not self.confirm(f"MRISynthesis needs these Python packages, which are not installed yet:\n\n{names}\n\n"
                            "Install them now? This downloads several hundred MB for PyTorch and can "
                            "take a few minutes."):
            return False
        if any(module == "torch" for module, _ in missing):
            log.info("Installing PyTorch (%s)", TORCH_REQUIREMENT[1])
            self.installTorch(TORCH_REQUIREMENT[1])
        others = [requirement for module, requirement in missing if module != "torch"]
        if others:
            log.info("Installing %s", ", ".join(others))
            self.pipInstall(others)
        importlib.invalidate_caches()
        still = missingRequirements(self.findSpec)
        if still:
            raise RuntimeError(f"installation finished but {', '.join(m for m, _ in still)} still cannot be "
                               "imported; restart Slicer and try again")
        return True
