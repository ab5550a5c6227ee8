"""Which file of a subject folder is which modality: one rule for training, evaluation,
the demo and the Slicer batch script (torch-free, so Slicer can import it at start-up).

A file counts when its name ends in an image suffix and its stem, or the stem's last part
after "_" or "-", is a known token: this project's names (``t1.nii.gz``), BraTS 2015-2020
(``..._t1ce.nii.gz``) and BraTS 2023 (``...-t2f.nii.gz``); ``mask``/``brainmask`` is the
brain mask. Segmentations and other files are ignored.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from .errors import InputError

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TOKENS = {
    "t1": "t1", "t1n": "t1",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
    "mask": "mask", "brainmask": "mask",
}


def modality_of(filename: str) -> Optional[str]:
    """The modality a file name stands for, or None (not an image, or another kind of file)."""
    lower = filename.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            stem = lower[: -len(suffix)]
            break
    else:
        return None
    if stem in TOKENS:
        return TOKENS[stem]
    for sep in ("_", "-"):
        if sep in stem:
            token = stem.rsplit(sep, 1)[1]
            if token in TOKENS:
                return TOKENS[token]
    return None


def subject_files(folder) -> Dict[str, str]:
    """{modality (or "mask"): path} of the recognised files in ``folder``; two files for one
    modality are an error naming both."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(f"subject folder not found: {folder}")
    found: Dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        modality = modality_of(entry)
        if modality is None or not os.path.isfile(path):
            continue
        if modality in found:
            raise InputError(f"{folder}: two files look like {modality} (both {os.path.basename(found[modality])} "
                             f"and {entry}; several {modality} files): keep one or rename the other")
        found[modality] = path
    return found


# Lesion label maps (non-zero = lesion), best first: a ground-truth segmentation
# (``seg``, BraTS ``..._seg``), then an automatic one (``seg_auto``). Used for lesion
# metrics only; the ms-long ``lesion_change_gt`` marks new lesions, not all, so it is not one.
LESION_LABELS = (("seg", "ground truth"), ("seg_auto", "automatic"))


def lesion_label_file(folder):
    """(path, kind) of the subject's lesion label map, or None; kind is "ground truth" or
    "automatic". Two ground-truth candidates are an error naming both."""
    folder = os.fspath(folder)
    for token, kind in LESION_LABELS:
        found = []
        for entry in sorted(os.listdir(folder)):
            lower = entry.lower()
            suffix = next((s for s in SUFFIXES if lower.endswith(s)), None)
            if suffix is None or not os.path.isfile(os.path.join(folder, entry)):
                continue
            stem = lower[: -len(suffix)]
            if stem == token or stem.endswith(("_" + token, "-" + token)):
                found.append(entry)
        if len(found) > 1:
            raise InputError(f"{folder}: several {token} label files ({', '.join(found)}): keep one")
        if found:
            return os.path.join(folder, found[0]), kind
    return None
