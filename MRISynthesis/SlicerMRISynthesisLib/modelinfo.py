"""What the panel tells people about models and devices.

Model labels and model-card summaries come from the shipped bundles' own metadata, read
from the safetensors header only (no torch: the panel shows them before PyTorch is
installed). Device names and the PyTorch version need torch and are asked only when it is
installed.
"""

import json
import os
import re
import struct
from typing import Dict, List, Optional, Tuple

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
    """Plain-text model card summary: training data, held-out metrics, limits."""
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


def deviceChoices(torchModule=None) -> List[Tuple[str, str]]:
    """[(device, label)]: automatic, each CUDA GPU by name ("cuda:0 - NVIDIA ..."), CPU.
    Without torch (not installed yet) only automatic and CPU."""
    choices = [("auto", "automatic (GPU when usable, else CPU)")]
    if torchModule is not None and torchModule.cuda.is_available():
        for index in range(torchModule.cuda.device_count()):
            choices.append((f"cuda:{index}", f"cuda:{index} {DASH} {torchModule.cuda.get_device_name(index)}"))
    choices.append(("cpu", "CPU"))
    return choices


def torchStatus(torchModule=None) -> str:
    if torchModule is None:
        return "PyTorch: not installed yet (installed on the first Apply, after asking)."
    cuda = torchModule.cuda.is_available()
    build = getattr(torchModule.version, "cuda", None)
    if cuda:
        return f"PyTorch {torchModule.__version__}: CUDA {build} usable ({torchModule.cuda.device_count()} GPU)."
    if build:
        return f"PyTorch {torchModule.__version__}: CUDA build {build}, but no usable GPU: runs on the CPU."
    return f"PyTorch {torchModule.__version__} (CPU build): runs on the CPU."
