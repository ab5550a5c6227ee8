"""What the panel tells people about models and devices.

Model labels and model-card summaries come from the shipped bundles' own metadata, read
from the safetensors header only (no torch: the panel shows them before PyTorch is
installed). Nothing here imports torch: the PyTorch line comes from the installed
distribution's metadata, and device names from the synthesis process's report (its own
interpreter imports torch; Slicer's never does for the panel).
"""

import json
import os
import re
import struct
import sys
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from MRISynthesisLib.errors import BundleError

ARROW = "\u2192"
DASH = "\u2013"
MODALITY_LABELS = {"t1": "T1", "t2": "T2", "t1c": "T1c", "flair": "FLAIR"}
AUTOMATIC_HELP = ("Automatic: the installed model that takes exactly the volumes you selected "
                  "(T1 alone, T1 + T2, or T1 + T2 + T1c).")


def readBundleHeader(path) -> dict:
    """A safetensors file's JSON header (no torch). Raises BundleError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BundleError(f"model bundle not found: {path}")
    try:
        with open(path, "rb") as f:
            headerLength = struct.unpack("<Q", f.read(8))[0]
            if headerLength > 100_000_000:
                raise ValueError("implausible header size")
            return json.loads(f.read(headerLength))
    except Exception as exc:
        raise BundleError(f"{path}: not an MRISynthesis model bundle ({exc})") from None


def readBundleMetadata(path) -> dict:
    """The ``mrisynthesis_bundle`` JSON of a bundle file, from its header (no torch).

    Only for showing; the bundle is fully verified by MRISynthesisLib.bundle.load_bundle
    when synthesis runs."""
    header = readBundleHeader(path)
    try:
        info = json.loads(header["__metadata__"]["mrisynthesis_bundle"])
        info["sources"] = list(info["sources"])
    except Exception as exc:  # any failure means: not one of our bundles
        raise BundleError(f"{os.fspath(path)}: not an MRISynthesis model bundle ({exc})") from None
    return info


def taskLabel(sources, target: str = "flair") -> str:
    return f"{' + '.join(MODALITY_LABELS.get(s, s) for s in sources)} {ARROW} {MODALITY_LABELS.get(target, target)}"


def modelLabel(info: dict) -> str:
    """"T1 + T2 -> FLAIR (paper model)"."""
    architecture = (info.get("model") or {}).get("architecture", "")
    kinds = {"fdgan": "paper model", "pix2pix_unet": "pix2pix baseline"}
    kind = kinds.get(architecture) or f"{architecture or 'unknown'} model"
    return f"{taskLabel(info['sources'], info.get('target', 'flair'))} ({kind})"


def _section(markdown: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    return match.group(1).strip() if match else ""


def _bullets(text: str) -> List[str]:
    """The list items of a markdown section, each joined onto one line."""
    items = []
    for line in text.splitlines():
        if line.startswith("- "):
            items.append(line[2:].strip())
        elif items and line.startswith("  "):
            items[-1] += " " + line.strip()
    return items


def modelSummary(info: dict) -> str:
    """Plain-text model card summary: training data, held-out metrics, the advice of its
    comparison with other inputs, limits."""
    provenance = info.get("provenance") or {}
    lines = [modelLabel(info)]
    split = provenance.get("split") or {}
    if split:
        lines.append(f"Trained on {len(split.get('train', []))} subjects; evaluated on "
                     f"{len(split.get('test', []))} held-out subjects.")
    card = str(provenance.get("model_card") or "")
    data = [b for b in _bullets(_section(card, "Known limits")) if b.lower().startswith("training data")]
    if data:
        lines.append(data[0])
    summary = (provenance.get("held_out_evaluation") or {}).get("summary") or {}
    architecture = (info.get("model") or {}).get("architecture")
    stats = (summary.get(provenance.get("evaluation_label")) or summary.get(architecture)
             or (next(iter(summary.values())) if summary else None))
    if stats:
        # Brain figures first: whole-slice PSNR mostly measures the background.
        parts = [f"{label} {stats[key]['mean']:.{digits}f} \u00b1 {stats[key]['std']:.{digits}f}{unit}"
                 for key, label, digits, unit in (("psnr_masked", "brain PSNR", 2, " dB"),
                                                  ("ssim_masked", "brain SSIM", 3, ""),
                                                  ("lesion_conspicuity", "lesion conspicuity", 2, ""),
                                                  ("psnr", "whole-slice PSNR", 2, " dB"))
                 if key in stats]
        lines.append("Held-out test: " + ", ".join(parts) + ".")
    # Where a model with fewer inputs does as well (training/model_card.py writes the sentence).
    compared = _section(card, "Against the other models of one evaluation")
    lines += [p.replace("`", "") for p in compared.split("\n\n") if p.startswith("On these subjects")]
    limits = [b for b in _bullets(_section(card, "Known limits")) if not b.lower().startswith("training data")]
    if limits:
        lines.append("Limits: " + " ".join(limits[:3]))
    lines.append("For research use only; not for diagnosis.")
    return "\n".join(lines)


def shippedModels(shipped: Optional[Dict[str, object]] = None) -> List[Tuple[str, str, str]]:
    """[(name, label, summary)] of the installed shipped bundles, in task order."""
    if shipped is None:
        from MRISynthesisLib.models import shipped_bundles  # torch-free

        shipped = shipped_bundles()
    models = []
    for name, path in shipped.items():
        try:
            info = readBundleMetadata(path)
        except BundleError as exc:
            models.append((name, f"{name} (unreadable)", str(exc)))
            continue
        models.append((name, modelLabel(info), modelSummary(info)))
    order = {"t1_to_flair": 0, "t1_t2_to_flair": 1, "t1_t2_t1c_to_flair": 2, "pix2pix_t1_t2_to_flair": 3}
    return sorted(models, key=lambda m: (order.get(m[0], 9), m[0]))


def _gpuNames(source) -> Optional[List[str]]:
    """GPU names from ``source``: a sequence of names, a mapping (the synthesis process's
    "ready" report: ``cuda_devices``, or ``gpus``), or a torch-like module (asked: only ever
    given one outside Slicer's process). None: nothing known."""
    if source is None:
        return None
    if isinstance(source, Mapping):
        names = source.get("cuda_devices", source.get("gpus"))
        return [str(n) for n in names] if names is not None else None
    if isinstance(source, (list, tuple)):
        return [str(n) for n in source]
    cuda = source.cuda
    return [cuda.get_device_name(i) for i in range(cuda.device_count())] if cuda.is_available() else []


def deviceChoices(source=None, current: Optional[str] = None) -> List[Tuple[str, str]]:
    """[(device, label)]: automatic, each CUDA GPU by name ("cuda:0 - NVIDIA ..."), CPU.

    ``source``: None (not known yet: only automatic and CPU), a list of GPU names, the
    synthesis process's report (a mapping with ``cuda_devices``: ``workerDevices``) or a
    torch-like module. ``current`` (e.g. the saved "cuda:1") stays listed when the GPUs are
    not known yet, so showing the list never changes the choice."""
    choices = [("auto", "automatic (GPU when usable, else CPU)")]
    for index, name in enumerate(_gpuNames(source) or []):
        choices.append((f"cuda:{index}", f"cuda:{index} {DASH} {name}"))
    if current and current not in {"auto", "cpu"} and current not in {d for d, _ in choices}:
        known = _gpuNames(source) is not None
        choices.append((current, f"{current} ({'not found' if known else 'GPUs not listed yet'})"))
    choices.append(("cpu", "CPU"))
    return choices


def workerDevices(info: Optional[Mapping]) -> List[str]:
    """The GPU names of the synthesis process's "ready" report (``cuda_devices``), for
    ``deviceChoices``."""
    return list(_gpuNames(info) or []) if info else []


def torchStatus(source=None) -> str:
    """The PyTorch line from a torch-like module or the synthesis process's report (a mapping
    with ``torch``, ``cuda_build``, ``cuda_devices``); None: not installed."""
    if source is None:
        return "PyTorch: not installed yet (installed on the first Apply, after asking)."
    if isinstance(source, Mapping):
        version, build, gpus = source.get("torch"), source.get("cuda_build"), _gpuNames(source) or []
    else:
        version, build, gpus = source.__version__, getattr(source.version, "cuda", None), _gpuNames(source)
    if gpus:
        return f"PyTorch {version}: CUDA {build} usable ({len(gpus)} GPU)."
    if build:
        return f"PyTorch {version}: CUDA build {build}, but no usable GPU: runs on the CPU."
    return f"PyTorch {version} (CPU build): runs on the CPU."


def workerTorchStatus(info: Mapping) -> str:
    """The PyTorch line from the synthesis process's "ready" report."""
    return torchStatus(info)


def installedTorchStatus(installedVersion: Optional[Callable[[str], Optional[str]]] = None,
                         isLoaded: Optional[Callable[[str], bool]] = None) -> str:
    """The PyTorch line before the synthesis process has reported: from the installed
    distribution's metadata, WITHOUT importing torch (an old torch imported into Slicer's
    process could not be upgraded until Slicer restarts)."""
    from . import dependencies

    installedVersion = installedVersion or dependencies.installedVersion
    isLoaded = isLoaded or (lambda name: name in sys.modules)
    requirement = dependencies.TORCH
    version = installedVersion(requirement.distribution)
    if version is None:
        return torchStatus(None)
    if dependencies.versionTuple(version) < dependencies.versionTuple(requirement.minimum):
        if isLoaded(requirement.importName):
            return (f"PyTorch {version} is loaded by another module; MRISynthesis needs {requirement.pip}: "
                    "update it in the PyTorch Util module and restart Slicer.")
        return (f"PyTorch {version} is installed; MRISynthesis needs {requirement.pip}: "
                "it is upgraded on the first Apply, after asking.")
    return f"PyTorch {version} installed (the GPUs are listed once the synthesis process has started)."
