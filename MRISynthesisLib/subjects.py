"""Which file of a subject folder is which modality: one rule for training, evaluation,
the demo and the Slicer batch script (torch-free, so Slicer can import it at start-up).

A file counts when its name ends in an image suffix and its stem, or the stem's last part
after "_" or "-", is a known token: this project's names (``t1.nii.gz``), BraTS 2015-2020
(``..._t1ce.nii.gz``), BraTS 2023 (``...-t2f.nii.gz``) and BIDS anatomical suffixes
(``sub-01[_ses-1]_T1w.nii.gz``, ``_T2w``, ``_FLAIR``; a T1w with a contrast-agent entity
``_ce-<label>_`` is the T1c); ``mask``/``brainmask`` is the brain mask. Segmentations and
other files are ignored.

BIDS datasets (https://bids-specification.readthedocs.io): ``bids_subjects`` walks
``ROOT/sub-X[/ses-Y]/anat`` and yields one ``BidsSubject`` per subject and session;
``bids_derivative_path`` and ``write_derivative_description`` place results as the
derivative ``ROOT/derivatives/mrisynthesis/sub-X[/ses-Y]/anat/sub-X[_ses-Y]_desc-synthetic_FLAIR.nii.gz``
(each with its JSON sidecar ``..._desc-synthetic_FLAIR.json``, MRISynthesisLib.provenance; the
uncertainty map is ``desc-UNCERTAINTY_DESC``, the brain mask ``..._desc-brain_mask.nii.gz``).
A subject folder given directly (``subject_files``) may also be a BIDS ``sub-X`` folder
(its ``anat``, or the ``anat`` of its only session).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from .errors import InputError

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TOKENS = {
    "t1": "t1", "t1n": "t1", "t1w": "t1",
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
                modality = TOKENS[token]
                # BIDS: "_ce-<label>" names the contrast agent of a post-contrast T1w.
                if modality == "t1" and sep == "_" and re.search(r"(^|_)ce-[a-z0-9]+(_|$)", stem):
                    return "t1c"
                return modality
    return None


def subject_files(folder) -> Dict[str, str]:
    """{modality (or "mask"): path} of the recognised files in ``folder``; two files for one
    modality are an error naming both. A BIDS ``sub-X`` folder reads its ``anat`` folder
    (with sessions: the only session's; several sessions are an error naming them)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(f"subject folder not found: {folder}")
    folder = _bids_anat_folder(folder)
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


# ----------------------------------------------------------------------------- BIDS

DERIVATIVE_NAME = "mrisynthesis"
BIDS_VERSION = "1.9.0"
# The synthetic contrast's BIDS suffix by target modality.
BIDS_SUFFIXES = {"flair": "FLAIR", "t1": "T1w", "t2": "T2w", "t1c": "T1w"}
# The desc- labels (BIDS: alphanumeric) of the synthetic image and of its uncertainty map
# (MRISynthesisLib.uncertainty: the spread over test-time augmentations).
SYNTHETIC_DESC = "synthetic"
UNCERTAINTY_DESC = "TTAspread"


def _sessions(folder: str) -> List[str]:
    return sorted(e for e in os.listdir(folder) if e.startswith("ses-") and os.path.isdir(os.path.join(folder, e)))


def _bids_anat_folder(folder: str) -> str:
    """``folder`` itself, or for a BIDS subject folder (sub-X) the anat folder inside it."""
    if os.path.isdir(os.path.join(folder, "anat")):
        return os.path.join(folder, "anat")
    sessions = [s for s in _sessions(folder) if os.path.isdir(os.path.join(folder, s, "anat"))]
    if len(sessions) == 1:
        return os.path.join(folder, sessions[0], "anat")
    if len(sessions) > 1:
        raise InputError(f"{folder} holds several BIDS sessions ({', '.join(sessions)}); give one session's "
                         f"folder, e.g. {os.path.join(folder, sessions[0])}")
    return folder


def is_bids_dataset(root) -> bool:
    """A BIDS dataset: a folder with dataset_description.json or sub-* folders."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return False
    return os.path.isfile(os.path.join(root, "dataset_description.json")) or any(
        e.startswith("sub-") and os.path.isdir(os.path.join(root, e)) for e in os.listdir(root))


@dataclass
class BidsSubject:
    """One subject (and session) of a BIDS dataset: ``files`` as ``subject_files`` gives them."""

    subject: str  # the label, without "sub-"
    session: Optional[str]  # the label without "ses-", or None
    files: Dict[str, str]
    folder: str  # the anat folder

    @property
    def name(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``: the BIDS file-name prefix, unique in the dataset."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def bids_subjects(root) -> Iterator[BidsSubject]:
    """Every ``sub-X[/ses-Y]/anat`` folder of the BIDS dataset ``root`` with recognised images,
    in sorted order (``derivatives/`` and other folders are not entered)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"BIDS dataset not found: {root}")
    for entry in sorted(os.listdir(root)):
        sub_dir = os.path.join(root, entry)
        if not (entry.startswith("sub-") and os.path.isdir(sub_dir)):
            continue
        subject = entry[len("sub-"):]
        places = [(None, sub_dir)] + [(s[len("ses-"):], os.path.join(sub_dir, s)) for s in _sessions(sub_dir)]
        for session, place in places:
            anat = os.path.join(place, "anat")
            if os.path.isdir(anat):
                files = subject_files(anat)
                if files:
                    yield BidsSubject(subject, session, files, anat)


def bids_derivative_path(root, subject: str, session: Optional[str] = None, target: str = "flair",
                         pipeline: str = DERIVATIVE_NAME, desc: str = SYNTHETIC_DESC) -> str:
    """Where the synthetic ``target`` of ``subject`` (label, with or without "sub-") goes:
    ROOT/derivatives/PIPELINE/sub-X[/ses-Y]/anat/sub-X[_ses-Y]_desc-synthetic_FLAIR.nii.gz
    (``desc``: another label, e.g. UNCERTAINTY_DESC for the uncertainty map). Its sidecar is
    the same path ending in .json. Folders are not created."""
    if not desc.isalnum():
        raise ValueError(f"BIDS desc label {desc!r} must be alphanumeric")
    subject = subject[len("sub-"):] if subject.startswith("sub-") else subject
    session = session[len("ses-"):] if session and session.startswith("ses-") else session
    parts = [os.fspath(root), "derivatives", pipeline, f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return os.path.join(*parts, "anat", f"{prefix}_desc-{desc}_{BIDS_SUFFIXES[target]}.nii.gz")


def write_derivative_description(root, version: str, pipeline: str = DERIVATIVE_NAME) -> str:
    """Create ROOT/derivatives/PIPELINE/dataset_description.json (BIDS derivative: Name,
    BIDSVersion, DatasetType, GeneratedBy) unless one exists; return its path."""
    folder = os.path.join(os.fspath(root), "derivatives", pipeline)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "dataset_description.json")
    if not os.path.exists(path):
        description = {
            "Name": "MRISynthesis synthetic contrasts",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "MRISynthesis", "Version": version,
                             "Description": "FLAIR synthesised from T1 [+ T2 [+ T1c]] by a "
                                            "feature-disentanglement GAN"}],
            # Every image here says so itself too: its JSON sidecar and header (provenance).
            "Description": "Synthetic images, not acquired by a scanner: not for diagnosis on their own. Each "
                           "file's JSON sidecar names its inputs (with SHA-256), the model and how it was made.",
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2)
        os.replace(tmp, path)
    return path


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
