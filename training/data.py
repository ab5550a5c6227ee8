"""Training data: subject discovery, the subject-level split and the slice cache.

A data folder holds one folder per subject; each file is one modality. Recognised names
(case-insensitive, ``.nii.gz``/``.nii``/``.nrrd``/``.mha``/``.mhd``):

- this project: ``t1``, ``t1c``, ``t2``, ``flair``, ``mask`` (brain mask, optional);
- BraTS 2015-2020: ``<anything>_t1``, ``_t1ce``, ``_t2``, ``_flair``;
- BraTS 2023: ``<anything>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``.

Other files (``seg``, ``seg_auto``, ...) are ignored. Two files that mean the same
modality in one folder are an error, never a guess.

The split is by subject (never by slice), over *all* subjects found, so that one data
folder and seed give the same split whatever sources a model uses; subjects that lack a
modality the task needs are then left out of their split with a message. Known
same-patient groups are kept in one split (``DEFAULT_GROUPS``).

Preprocessed slices are cached as ``.npy`` (float16, values in [-1, 1]) keyed by the
files' paths, sizes and modification times, the modalities and the preprocessing, so an
epoch never re-reads NIfTI and a second run on the same data reuses the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from MRISynthesisLib.errors import InputError
from MRISynthesisLib.preprocessing import (AxialReorientation, PreprocessingConfig, SliceResizer, SliceStack,
                                           histogram_landmarks, select_middle_slices)
from MRISynthesisLib.subjects import bids_subjects, is_bids_dataset, lesion_label_file, subject_files
from MRISynthesisLib.volumes import load_volume

MODALITIES = ("t1", "t1c", "t2", "flair")
# Same-patient subjects of /work/shared/data (see its README): never split apart.
DEFAULT_GROUPS = (("brats20-001", "brats18-cbica-aab"), ("ms-long-01a", "ms-long-01b"))
CACHE_VERSION = 1


@dataclass
class Subject:
    name: str
    folder: Path
    files: Dict[str, Path] = field(default_factory=dict)  # modality (and "mask") -> path
    # Lesion label map (non-zero = lesion) and whether it is "ground truth" or "automatic".
    lesion: Optional[Path] = None
    lesion_kind: Optional[str] = None

    @property
    def mask(self) -> Optional[Path]:
        return self.files.get("mask")

    def missing(self, modalities: Sequence[str]) -> List[str]:
        return [m for m in modalities if m not in self.files]


PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Run options that hold a file or folder (named portably in provenance, cards and reports).
PATH_OPTIONS = ("data", "out", "cache_dir", "split", "groups_file", "init_from", "init_discriminator_from")


# The subjects ../shared/more-data/stage.py writes wherever its user puts them: named by
# what they are, not by that folder (the manifest lists them; absent on other machines).
STAGED_MANIFEST = PROJECT_ROOT.parent / "shared" / "more-data" / "manifest.json"
STAGED_NAME = "../shared/more-data (staged)"


def _is_staged_more_data(folder: Path) -> bool:
    """True for a folder of subjects that are all (and only) ones the more-data manifest lists."""
    try:
        staged = {entry["folder"] for entry in json.loads(Path(STAGED_MANIFEST).read_text())}
        subjects = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(subjects) and subjects <= staged


def portable_path(path) -> str:
    """How cards, reports and bundle provenance name a file or folder: relative to the
    project folder when it lies beside or inside it (``../shared/data``, ``docs/split.json``,
    ``runs/t1t2``), ``STAGED_NAME`` for the staged more-data subjects wherever they are, else
    ``<elsewhere>/NAME``: never an absolute path of the machine that made them. Several
    folders joined with os.pathsep are named one by one."""
    text = str(path)
    if os.pathsep in text:
        return ":".join(portable_path(p) for p in text.split(os.pathsep) if p)
    if Path(text).is_dir() and _is_staged_more_data(Path(text)):
        return STAGED_NAME
    resolved = Path(text).resolve()
    try:
        relative = os.path.relpath(resolved, PROJECT_ROOT)
    except ValueError:  # another drive (Windows)
        return f"<elsewhere>/{resolved.name}"
    if Path(relative).is_absolute() or relative.startswith(os.path.join(os.pardir, os.pardir)):
        return f"<elsewhere>/{resolved.name}"
    return Path(relative).as_posix()


def portable_options(options: dict) -> dict:
    """Run options with their paths named by ``portable_path``."""
    return {k: (portable_path(v) if k in PATH_OPTIONS and v else v) for k, v in options.items()}


def data_folders(data_dir) -> List[Path]:
    """The data folders of a ``--data`` value: one path, or several joined with os.pathsep
    (e.g. ``../shared/data:/data/extra``) or given as a list."""
    if isinstance(data_dir, (list, tuple)):
        parts = [str(p) for p in data_dir]
    else:
        parts = [p for p in str(data_dir).split(os.pathsep) if p]
    if not parts:
        raise InputError("no data folder given")
    return [Path(p) for p in parts]


def discover(data_dir) -> List[Subject]:
    """Every subject under the data folder(s) that holds at least one recognised image: each
    subject folder, or in a BIDS dataset every sub-X[/ses-Y]/anat folder (named sub-X or
    sub-X_ses-Y). A subject name found in two folders is an error (splits are by name)."""
    subjects, seen = [], {}
    for folder_root in data_folders(data_dir):
        if not folder_root.is_dir():
            raise InputError(f"data folder not found: {folder_root}")
        if is_bids_dataset(folder_root):
            entries = [(s.name, Path(s.folder), s.files) for s in bids_subjects(folder_root)]
        else:
            entries = [(folder.name, folder, subject_files(folder))
                       for folder in sorted(p for p in folder_root.iterdir() if p.is_dir())]
        found = []
        for name, folder, files in entries:
            files = {m: Path(p) for m, p in files.items()}
            if not any(m in files for m in MODALITIES):
                continue
            if name in seen:
                raise InputError(f"subject {name} is in two data folders ({seen[name]} and {folder_root}); "
                                 "subject names must be unique")
            seen[name] = folder_root
            label = lesion_label_file(folder)
            found.append(Subject(name, folder, files, *(Path(label[0]), label[1]) if label else (None, None)))
        if not found:
            raise InputError(f"{folder_root}: no subject folders with recognised images "
                             f"(expected e.g. SUBJECT/t1.nii.gz, BraTS names like SUBJECT/x_t1.nii.gz "
                             f"or a BIDS dataset sub-X/anat/sub-X_T1w.nii.gz)")
        subjects += found
    return sorted(subjects, key=lambda s: s.name)


def availability_report(subjects: Sequence[Subject], needed: Sequence[str] = MODALITIES) -> str:
    """A table of which subject has which modality (and a mask), for the log and the CLI."""
    cols = list(MODALITIES) + ["mask"]
    lines = ["subject".ljust(24) + " ".join(c.ljust(6) for c in cols) + " usable"]
    for s in subjects:
        marks = " ".join(("yes" if c in s.files else "-").ljust(6) for c in cols)
        missing = s.missing(needed)
        lines.append(s.name.ljust(24) + marks + " " + ("yes" if not missing else "no (lacks " + ", ".join(missing) + ")"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- split


def parse_groups(specs: Sequence[str] = (), groups_file=None, use_defaults: bool = True) -> List[List[str]]:
    """Same-patient groups from ``--group a,b`` specs, a JSON file (a list of lists of subject
    names) and the defaults; groups sharing a subject are merged."""
    groups = [list(g) for g in DEFAULT_GROUPS] if use_defaults else []
    groups += [[n.strip() for n in spec.split(",") if n.strip()] for spec in specs]
    if groups_file:
        with open(groups_file) as f:
            loaded = json.load(f)
        if not isinstance(loaded, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                                   for g in loaded):
            raise InputError(f"{groups_file}: expected a JSON list of lists of subject names")
        groups += [list(g) for g in loaded]
    merged: List[set] = []
    for g in groups:
        g = set(g)
        for other in [m for m in merged if m & g]:
            g |= other
            merged.remove(other)
        merged.append(g)
    return [sorted(g) for g in merged if len(g) > 1]


def split_subjects(names: Sequence[str], seed: int, val_fraction: float, test_fraction: float,
                   groups: Sequence[Sequence[str]] = ()) -> Dict[str, List[str]]:
    """Seeded subject-level split; each group of same-patient subjects lands in one split.
    Fractions count groups (a lone subject is a group of one); with a fraction > 0 and at
    least three groups, that split gets at least one group."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise InputError(f"need 0 <= val, test fractions and val + test < 1 (got {val_fraction}, {test_fraction})")
    names = sorted(set(names))
    present = set(names)
    units, grouped = [], set()
    for g in groups:
        members = sorted(n for n in g if n in present)
        if members:
            units.append(members)
            grouped.update(members)
    units += [[n] for n in names if n not in grouped]
    units.sort()
    random.Random(seed).shuffle(units)

    def count(fraction):
        n = int(round(fraction * len(units)))
        return max(n, 1) if fraction > 0 and len(units) >= 3 else n

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val >= len(units):
        raise InputError(f"{len(units)} subject groups are too few for the requested validation/test split")
    pick = lambda part: sorted(n for unit in part for n in unit)  # noqa: E731
    return {"train": pick(units[n_test + n_val:]), "val": pick(units[n_test:n_test + n_val]),
            "test": pick(units[:n_test])}


# ----------------------------------------------------------------------------- cache


@dataclass
class SubjectSlices:
    """One subject's preprocessed slices: images (N, C, S, S) in [-1, 1], channels in the
    order of ``modalities`` (with 2.5D context, each source's 2k + 1 slices and then the
    target's one); brain mask (N, S, S); axial indices in RAS order."""

    name: str
    modalities: tuple
    images: np.ndarray
    mask: np.ndarray
    slice_indices: np.ndarray
    # (N, S, S) bool lesion map of the same slices (``with_lesions``), or None.
    lesion: Optional[np.ndarray] = None


def _cache_key(subject: Subject, modalities: Sequence[str], preprocessing: PreprocessingConfig,
               slices_per_subject: Optional[int], context: int = 0) -> str:
    files = {}
    for key in list(modalities) + (["mask"] if subject.mask else []):
        path = subject.files[key].resolve()
        st = path.stat()
        files[key] = [str(path), st.st_size, st.st_mtime_ns]
    settings = preprocessing.to_dict()
    if settings["resize_interpolation"] == "bilinear":  # as before the setting existed: the same keys
        del settings["resize_interpolation"]
    blob = json.dumps({"version": CACHE_VERSION, "files": files, "modalities": list(modalities),
                       "preprocessing": settings, "slices": slices_per_subject,
                       # Only when set, so that the 2D entries keep their keys.
                       **({"context": context} if context else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_subject(subject: Subject, modalities: Sequence[str]):
    """The subject's volumes of ``modalities`` (one grid, checked) and its brain mask (or None)."""
    volumes = [load_volume(subject.files[m], f"{subject.name}/{m}") for m in modalities]
    ref = volumes[0]
    for m, v in zip(modalities, volumes):
        if not v.same_grid(ref):
            raise InputError(f"{subject.name}: {m} is not on the grid of {modalities[0]} "
                             f"(shape {v.shape} vs {ref.shape}); training needs co-registered volumes on one grid")
    mask = None
    if subject.mask is not None:
        mask_vol = load_volume(subject.mask, f"{subject.name}/mask")
        if not mask_vol.same_grid(ref):
            raise InputError(f"{subject.name}: mask is not on the grid of {modalities[0]}")
        mask = mask_vol.array > 0
    return volumes, mask


def preprocess_subject(subject: Subject, modalities: Sequence[str], preprocessing: PreprocessingConfig,
                       slices_per_subject: Optional[int], context: int = 0) -> SubjectSlices:
    """Read, normalise and cut one subject with the library's SliceStack (the inference path).
    ``modalities`` are the sources then the target; ``context``: 2.5D neighbours of each source."""
    volumes, mask = load_subject(subject, modalities)
    ref = volumes[0]
    stack = SliceStack([v.array for v in volumes], ref.affine, preprocessing, mask=mask,
                       names=[f"{subject.name}/{m}" for m in modalities], modalities=modalities)
    indices = select_middle_slices(stack.brain_slices, slices_per_subject)
    if context:
        sources = stack.batch(indices, channels=range(len(modalities) - 1), context=context)
        images = torch.cat([sources, stack.batch(indices, channels=[len(modalities) - 1])], dim=1)
    else:
        images = stack.batch(indices)
    images = images.numpy().astype(np.float16)
    mask_slices = _mask_slices(stack.mask, indices, stack.resizer)
    return SubjectSlices(subject.name, tuple(modalities), images, mask_slices, np.asarray(indices))


def _mask_slices(ras_mask: np.ndarray, indices: Sequence[int], resizer: SliceResizer) -> np.ndarray:
    """Axial ``indices`` of a (X, Y, Z) RAS mask on the network grid, (N, S, S) bool."""
    picked = torch.from_numpy(ras_mask[..., np.asarray(indices)].transpose(2, 0, 1)[:, None].astype(np.float32))
    return (resizer.forward(picked, fill=0.0)[:, 0] > 0.5).numpy()


def load_or_build(subject: Subject, modalities: Sequence[str], preprocessing: PreprocessingConfig,
                  slices_per_subject: Optional[int], cache_dir, log: Callable[[str], None] = print,
                  context: int = 0) -> SubjectSlices:
    """The subject's slices from the cache, preprocessing (and caching) them on a miss."""
    cache_dir = Path(cache_dir)
    key = _cache_key(subject, modalities, preprocessing, slices_per_subject, context)
    base = cache_dir / f"{subject.name}-{'_'.join(modalities)}-{key}"
    paths = [Path(f"{base}.images.npy"), Path(f"{base}.mask.npy"), Path(f"{base}.slices.npy")]
    if all(p.is_file() for p in paths):
        images = np.load(paths[0], mmap_mode="r")
        return SubjectSlices(subject.name, tuple(modalities), images, np.load(paths[1]), np.load(paths[2]))
    log(f"preprocessing {subject.name} ({', '.join(modalities)}) -> cache {cache_dir}")
    result = preprocess_subject(subject, modalities, preprocessing, slices_per_subject, context)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Images last: their presence marks a complete entry.
    _atomic_save(paths[1], result.mask)
    _atomic_save(paths[2], result.slice_indices)
    _atomic_save(paths[0], result.images)
    return result


def lesion_slices(subject: Subject, reference: str, preprocessing: PreprocessingConfig,
                  slice_indices: Sequence[int]) -> np.ndarray:
    """The subject's lesion label (> 0) on the network grid of the axial ``slice_indices``
    of its ``reference`` modality, (N, S, S) bool: cut and resized as the brain mask is."""
    ref = load_volume(subject.files[reference], f"{subject.name}/{reference}")
    label = load_volume(subject.lesion, f"{subject.name}/lesion")
    if not label.same_grid(ref):
        raise InputError(f"{subject.name}: the lesion label {subject.lesion.name} is not on the grid of {reference} "
                         f"(shape {label.shape} vs {ref.shape}); training needs co-registered volumes on one grid")
    orientation = AxialReorientation(ref.affine)
    ras = orientation.forward(label.array > 0)
    return _mask_slices(ras, slice_indices, SliceResizer(ras.shape[:2], orientation.ras_spacing[:2], preprocessing))


def with_lesions(slices: SubjectSlices, subject: Subject, preprocessing: PreprocessingConfig, cache_dir,
                 log: Callable[[str], None] = print) -> SubjectSlices:
    """``slices`` with their lesion map: the subject's ground-truth label, cached beside the
    slices (keyed by the label file too); all False for a subject without one (automatic
    labels are not ground truth to train towards)."""
    shape = (len(slices.slice_indices),) + tuple(slices.mask.shape[1:])
    if subject.lesion is None or subject.lesion_kind != "ground truth":
        return dataclasses.replace(slices, lesion=np.zeros(shape, dtype=bool))
    path = subject.lesion.resolve()
    st = path.stat()
    blob = json.dumps({"version": CACHE_VERSION, "label": [str(path), st.st_size, st.st_mtime_ns],
                       "reference": subject.files[slices.modalities[0]].resolve().as_posix(),
                       "preprocessing": preprocessing.to_dict(),
                       "slices": np.asarray(slices.slice_indices).tolist()}, sort_keys=True)
    cached = Path(cache_dir) / f"{subject.name}-lesion-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npy"
    if cached.is_file():
        lesion = np.load(cached)
    else:
        log(f"cutting {subject.name}'s lesion label -> cache {cache_dir}")
        lesion = lesion_slices(subject, slices.modalities[0], preprocessing, slices.slice_indices)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _atomic_save(cached, lesion)
    if lesion.shape != shape:
        raise InputError(f"{subject.name}: lesion slices {lesion.shape} do not match its image slices {shape}")
    return dataclasses.replace(slices, lesion=lesion)


class SliceDataset(torch.utils.data.Dataset):
    """All slices of some subjects; ``gather(indices)`` -> float32 (B, C, S, S) tensor."""

    def __init__(self, subjects: Sequence[SubjectSlices]):
        self.subjects = list(subjects)
        self.index = np.array([(si, k) for si, s in enumerate(self.subjects) for k in range(len(s.images))],
                              dtype=np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        si, k = self.index[i]
        return torch.from_numpy(np.asarray(self.subjects[si].images[k], dtype=np.float32))

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])

    def masks(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([self.subjects[self.index[i][0]].mask[self.index[i][1]] for i in indices])

    def lesions(self, indices: Sequence[int]) -> np.ndarray:
        """(B, S, S) lesion maps of the slices (the subjects must carry them: ``with_lesions``)."""
        return np.stack([self.subjects[self.index[i][0]].lesion[self.index[i][1]] for i in indices])


def mean_histogram_landmarks(subjects: Sequence[Subject], modalities: Sequence[str],
                             preprocessing: PreprocessingConfig) -> Dict[str, List[float]]:
    """Per modality, the mean over ``subjects`` (a model's training subjects) of their brain
    histogram landmarks (``MRISynthesisLib.preprocessing.histogram_landmarks``): what the
    model's bundle standardises each input of that modality onto."""
    if not subjects:
        raise InputError("no training subjects to take histogram landmarks from")
    found: Dict[str, List[np.ndarray]] = {m: [] for m in modalities}
    for subject in subjects:
        missing = subject.missing(modalities)
        if missing:
            raise InputError(f"{subject.name}: lacks {', '.join(missing)} (needed for its histogram landmarks)")
        volumes, mask = load_subject(subject, modalities)
        for m, volume in zip(modalities, volumes):
            found[m].append(histogram_landmarks(volume.array, mask, preprocessing, f"{subject.name}/{m}"))
    return {m: np.mean(values, axis=0).tolist() for m, values in found.items()}

