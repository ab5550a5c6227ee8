"""How a synthetic image says what it is: the provenance record of a synthesis and its
marks in every file written (one home for the CLI, the Python API, the batch script and
the Slicer module).

A synthetic FLAIR must never pass for an acquired one once it leaves the tool (a PACS
import, a colleague's folder, a segmentation pipeline). Every volume MRISynthesis writes
carries:

- a **provenance record** (``synthesis_record``; a dict with BIDS-style keys): that it is
  synthetic and not for diagnosis on its own (``Statement``), the input files with their
  SHA-256 (``Sources``, ``SourceFiles``), the program and model with its digest
  (``GeneratedBy``), the brain-mask decision, device and precision, and the uncertainty
  method when a map was made;
- in a **NIfTI** file: ``descrip`` ("MRISynthesis synthetic FLAIR v0.1.0 t1_t2_to_flair
  <digest>", at most 80 bytes), ``intent_name`` ("synthetic FLAIR", 16 bytes at most) and
  the whole record as JSON in a NIfTI-1 header extension (code 6, comment), so the file
  says it even without its sidecar;
- in an **NRRD / MHA** file: the header keys of ``header_keys`` (``MRISynthesis.*``;
  the same keys the Slicer module puts on its output node as node attributes);
- a **JSON sidecar** beside it in the BIDS style (``X.nii.gz`` -> ``X.json``).

``read_provenance(path)`` reads all of this back (``mrisynthesis info FILE``).

Entry points: ``synthesize_with_details`` returns the record (``result.provenance``) and
sets it on the volumes it returns, so ``volumes.save_volume``/``save_volumes`` mark the
files and write the sidecars. Callers with their own writer or scene (the Slicer module)
use ``attach_source_files`` (inputs read from files elsewhere), ``record_for_kind``,
``header_keys`` (node attributes, NRRD keys; ``record_from_header_keys`` reads them back),
``nifti_descrip`` / ``nifti_intent_name`` and ``write_sidecar``.

Each written volume has a kind: ``KIND_SYNTHETIC`` (the synthetic contrast),
``KIND_MASK`` (the brain mask the synthesis used) or ``KIND_UNCERTAINTY`` (the
test-time-augmentation spread, MRISynthesisLib.uncertainty). ``record_for_kind`` makes
the record of one from the synthesis record.

Torch-free: the Slicer module may import it at start-up.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np

from . import __version__

FORMAT = "mrisynthesis-provenance/1"
PROGRAM = "MRISynthesis"
CODE_URL = "https://github.com/MRISynthesis/SlicerMRISynthesis"  # CMakeLists.txt EXTENSION_HOMEPAGE

KIND_SYNTHETIC = "synthetic"
KIND_MASK = "brain mask"
KIND_UNCERTAINTY = "uncertainty"
KINDS = (KIND_SYNTHETIC, KIND_MASK, KIND_UNCERTAINTY)

STATEMENT = ("SYNTHETIC IMAGE: computed by MRISynthesis, a neural network, from other MRI contrasts of the same "
             "subject; it was not acquired by a scanner. Not for diagnosis on its own: read it with the acquired "
             "images.")
MASK_STATEMENT = ("Brain mask used by MRISynthesis to synthesise an image (1 = brain); outside it the synthetic "
                  "image is background.")
UNCERTAINTY_STATEMENT = ("Map computed by MRISynthesis, not acquired: the spread of the synthetic image over "
                         "test-time augmentations. Not a confidence map: it did not predict the real error better "
                         "than the image's own gradient (docs/uncertainty.md).")

# NIfTI-1 header: descrip is char[80], intent_name char[16] (nibabel keeps them NUL-padded).
DESCRIP_BYTES = 80
INTENT_NAME_BYTES = 16
NIFTI_COMMENT_EXTENSION = 6  # NIFTI_ECODE_COMMENT: free text, here the record as JSON
KEY_PREFIX = "MRISynthesis."
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SIDECAR_SUFFIX = ".json"
_HASH_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- inputs


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder) -> tuple:
    """(SHA-256, file count) of a DICOM series folder: the digest of every file's name and
    SHA-256 in name order (files only, not sub-folders)."""
    folder = os.fspath(folder)
    h = hashlib.sha256()
    names = sorted(e for e in os.listdir(folder) if os.path.isfile(os.path.join(folder, e)))
    for name in names:
        h.update(f"{name}\0{file_sha256(os.path.join(folder, name))}\n".encode())
    return h.hexdigest(), len(names)


def voxel_sha256(volume) -> str:
    """SHA-256 of a volume's voxels (float32, in NIfTI order: i fastest) and its affine
    (float64, row by row): identifies an input that came as an array (a Slicer node, a
    Volume built in memory), not a file. A Fortran-ordered float32 array (what synthesis
    gets from files and Slicer nodes) is hashed in place, without a copy."""
    h = hashlib.sha256()
    voxels = np.asfortranarray(np.asarray(volume.array, dtype=np.float32))
    h.update(memoryview(voxels.T).cast("B"))  # .T of a Fortran array is C-contiguous: no copy
    h.update(np.ascontiguousarray(np.asarray(volume.affine, dtype=np.float64)).tobytes())
    return h.hexdigest()


def source_entry(modality: str, value) -> dict:
    """One input of a synthesis: a file (``Path``, ``SHA256``), a DICOM series folder
    (``Path``, ``SHA256`` over its files, ``DICOMFiles``) or an in-memory volume
    (``Path`` None, ``VoxelSHA256``)."""
    if isinstance(value, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(value))
        if os.path.isdir(path):
            digest, count = folder_sha256(path)
            return {"Modality": modality, "Path": path, "SHA256": digest, "DICOMFiles": count}
        return {"Modality": modality, "Path": path, "SHA256": file_sha256(path)}
    return {"Modality": modality, "Path": None, "VoxelSHA256": voxel_sha256(value)}


def _sources_list(entries: List[dict]) -> List[str]:
    """BIDS ``Sources``: one string per input (its path, or ``voxels:<modality>:<digest>``)."""
    return [e["Path"] if e.get("Path") else f"voxels:{e['Modality']}:{e['VoxelSHA256']}" for e in entries]


def attach_source_files(record: dict, files: Mapping[str, object]) -> dict:
    """A copy of ``record`` whose inputs ``files`` ({modality: file or DICOM folder}; "mask":
    the given brain-mask file) are named by the file they were read from, with its SHA-256:
    for callers that synthesise from arrays read elsewhere (the Slicer module's nodes, the
    batch script). An input's ``VoxelSHA256`` is kept."""
    record = json.loads(json.dumps(record))
    entries = record.get("SourceFiles", [])
    for entry in entries:
        path = files.get(entry["Modality"])
        if path is not None:
            named = source_entry(entry["Modality"], os.fspath(path))
            entry.update({k: v for k, v in named.items() if k != "Modality"})
    record["Sources"] = _sources_list(entries)
    if files.get("mask") is not None and "BrainMask" in record:
        record["BrainMask"]["File"] = {k: v for k, v in source_entry("mask", os.fspath(files["mask"])).items()
                                       if k != "Modality"}
    return record


# ----------------------------------------------------------------------------- the record


def model_name(bundle) -> str:
    """A bundle's name: its file name without .safetensors (the shipped names say what it
    takes), or "in-memory model"."""
    if getattr(bundle, "path", None):
        base = os.path.basename(bundle.path)
        return base[: -len(".safetensors")] if base.endswith(".safetensors") else base
    return "in-memory model"


CONTRAST_NAMES = {"t1": "T1", "t2": "T2", "t1c": "T1c", "flair": "FLAIR"}


def synthesis_record(bundle, sources: Mapping[str, object], mask_decision, device: str, precision: str,
                     uncertainty: Optional[dict] = None, created: Optional[str] = None, mask_spec=None) -> dict:
    """The provenance record of one synthesis (kind "synthetic"): a JSON-able dict.

    bundle: the ModelBundle used; sources: {modality: file path, DICOM folder or Volume}
    as given to synthesis; mask_decision: MRISynthesisLib.brainmask.BrainMaskDecision;
    device / precision: what the network ran on ("cpu", "cuda:0 (NVIDIA ...)"; "bf16",
    "fp32"); uncertainty: the uncertainty method's description when a map was made;
    mask_spec: the brain-mask spec as given (a mask file is named with its SHA-256).
    """
    entries = [source_entry(m, sources[m]) for m in bundle.sources if m in sources]
    target = CONTRAST_NAMES.get(bundle.target, bundle.target)
    inputs = " + ".join(CONTRAST_NAMES.get(e["Modality"], e["Modality"]) for e in entries)
    name = model_name(bundle)
    trained = bundle.provenance or {}
    model = {"Name": name, "File": os.path.abspath(bundle.path) if bundle.path else None,
             "SHA256": bundle.sha256, "Architecture": bundle.model.architecture,
             "Inputs": list(bundle.sources), "Target": bundle.target}
    for key, label in (("date", "TrainedOn"), ("git_commit", "TrainingCommit")):
        if trained.get(key):
            model[label] = str(trained[key])
    record = {
        "ProvenanceFormat": FORMAT,
        "Kind": KIND_SYNTHETIC,
        "Synthetic": True,
        "ImageType": f"synthetic {target}",
        "Statement": STATEMENT,
        "Description": f"{target} synthesised from {inputs} by {PROGRAM} {__version__} with the model {name}",
        "Sources": _sources_list(entries),
        "SourceFiles": entries,
        "GeneratedBy": [{"Name": PROGRAM, "Version": __version__, "CodeURL": CODE_URL,
                         "Description": f"{target} synthesis from {inputs} by a neural network", "Model": model}],
        "BrainMask": {"Source": mask_decision.source, "Description": mask_decision.description},
        "Device": str(device),
        "Precision": str(precision),
        "IntensityScale": (f"0 = background (outside the brain mask); {bundle.preprocessing.output_max:g} = the upper "
                           "end of the model's normalisation window in a real image normalised the same way "
                           f"({bundle.preprocessing.window_text()})"),
        "DateCreated": created or datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if isinstance(mask_spec, (str, os.PathLike)) and os.fspath(mask_spec) not in ("auto", "none") \
            and os.path.exists(os.fspath(mask_spec)):
        record["BrainMask"]["File"] = {k: v for k, v in source_entry("mask", mask_spec).items() if k != "Modality"}
    if uncertainty:
        record["Uncertainty"] = dict(uncertainty)
    return record


def record_for_kind(record: dict, kind: str) -> dict:
    """The record of one written volume of the synthesis ``record``: the synthetic image
    itself, the brain mask it used, or its uncertainty map."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    out = json.loads(json.dumps(record))
    target = out["ImageType"].replace("synthetic ", "", 1)
    model = out["GeneratedBy"][0]["Model"]["Name"]
    out["Kind"] = kind
    if kind == KIND_MASK:
        out.update(Synthetic=False, ImageType=f"brain mask of a synthetic {target}", Statement=MASK_STATEMENT,
                   Description=f"brain mask used to synthesise {target} with {model} "
                               f"({out['BrainMask']['Description']})")
        out.pop("IntensityScale", None)
        out.pop("Uncertainty", None)
    elif kind == KIND_UNCERTAINTY:
        if "Uncertainty" not in out:
            raise ValueError("the synthesis made no uncertainty map")
        out.update(Synthetic=True, ImageType=f"TTA spread of a synthetic {target}", Statement=UNCERTAINTY_STATEMENT,
                   Description=f"{out['Uncertainty'].get('Name', 'uncertainty')} of the {target} synthesised with "
                               f"{model}: {out['Uncertainty'].get('Statistic', '')}".rstrip(": "),
                   IntensityScale="the synthetic image's units (0 outside the brain mask)")
    return out


# ----------------------------------------------------------------------------- marks


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _fit(text: str, size: int) -> str:
    """``text`` in ASCII, cut to leave room for the NUL a C reader expects."""
    return _ascii(text)[: size - 1]


def nifti_descrip(record: dict) -> str:
    """The NIfTI ``descrip`` (under 80 bytes): "MRISynthesis synthetic FLAIR v0.1.0
    t1_t2_to_flair 1a2b3c4d5e6f" (program, kind, version, model name, digest start)."""
    generated = record["GeneratedBy"][0]
    model = generated["Model"]
    what = {KIND_SYNTHETIC: record["ImageType"], KIND_MASK: "brain mask for synthetic",
            KIND_UNCERTAINTY: "TTA spread of synthetic"}[record.get("Kind", KIND_SYNTHETIC)]
    if record.get("Kind", KIND_SYNTHETIC) != KIND_SYNTHETIC:
        what += " " + record["ImageType"].rsplit(" ", 1)[-1]
    head = f"{PROGRAM} {what} v{generated['Version']}"
    digest = (model.get("SHA256") or "")[:12]
    room = DESCRIP_BYTES - 1 - len(_ascii(head)) - (len(digest) + 1 if digest else 0) - 1
    name = _ascii(model["Name"])
    if room < len(name):
        name = name[: max(room, 0)]
    return _fit(" ".join(p for p in (head, name, digest) if p), DESCRIP_BYTES)


def nifti_intent_name(record: dict) -> str:
    """The NIfTI ``intent_name`` (16 bytes at most): "synthetic FLAIR", "brain mask",
    "uncertainty"."""
    kind = record.get("Kind", KIND_SYNTHETIC)
    text = record["ImageType"] if kind == KIND_SYNTHETIC else {KIND_MASK: "brain mask",
                                                               KIND_UNCERTAINTY: "TTA spread"}[kind]
    return _fit(text, INTENT_NAME_BYTES + 1)[:INTENT_NAME_BYTES]


def record_json(record: dict) -> str:
    """The record as one line of JSON (ASCII: escapes keep it valid in NRRD headers)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def header_keys(record: dict) -> Dict[str, str]:
    """{key: value} for an NRRD/MHA header and for the Slicer output node's attributes
    (``node.SetAttribute(key, value)``): ``MRISynthesis.Synthetic``, ``.ImageType``,
    ``.Statement``, ``.Version``, ``.Model``, ``.ModelSHA256``, ``.BrainMask``,
    ``.Device``, ``.Precision`` and the whole record as JSON in ``.Provenance``."""
    generated = record["GeneratedBy"][0]
    keys = {
        "Synthetic": "true" if record.get("Synthetic") else "false",
        "ImageType": record["ImageType"],
        "Statement": record["Statement"],
        "Version": generated["Version"],
        "Model": generated["Model"]["Name"],
        "ModelSHA256": generated["Model"].get("SHA256") or "",
        "BrainMask": record["BrainMask"]["Source"],
        "Device": record["Device"],
        "Precision": record["Precision"],
        "Provenance": record_json(record),
    }
    return {KEY_PREFIX + k: _ascii(v).replace("\n", " ") for k, v in keys.items()}


def record_from_header_keys(keys: Mapping[str, str]) -> Optional[dict]:
    """The record from ``header_keys`` read back (an NRRD header, a node's attributes), or None."""
    text = keys.get(KEY_PREFIX + "Provenance")
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if is_record(record) else None


def is_record(value) -> bool:
    return isinstance(value, dict) and value.get("ProvenanceFormat", "").startswith("mrisynthesis-provenance/")


# ----------------------------------------------------------------------------- files


def volume_stem(path) -> str:
    """``path`` without its volume suffix (.nii.gz, .nii, .nrrd, ...)."""
    path = os.fspath(path)
    lower = path.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def sidecar_path(path) -> str:
    """The BIDS-style JSON sidecar of a volume file: ``X.nii.gz`` -> ``X.json``."""
    return volume_stem(path) + SIDECAR_SUFFIX


def output_files(path) -> List[str]:
    """Every file written for one volume output: the volume and its sidecar (for the
    checks before writing: existing files, collisions between outputs)."""
    return [os.fspath(path), sidecar_path(path)]


def sidecar_text(record: dict) -> str:
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"


def write_sidecar(record: dict, volume_path) -> str:
    """Write ``record`` as the JSON sidecar of ``volume_path`` (atomically: a temporary file
    renamed); returns its path. For writers other than ``volumes.save_volume`` (which writes
    it itself), e.g. a volume saved by Slicer's storage node."""
    path = sidecar_path(volume_path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{base}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(sidecar_text(record))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@dataclass
class ProvenanceReport:
    """What ``read_provenance`` found for a file. ``record``: the provenance record (from the
    sidecar, else the NIfTI extension / NRRD key), or None; ``found_in``: where marks were
    found; ``descrip`` / ``intent_name``: the NIfTI fields as stored; ``problems``:
    disagreements between the sidecar and the file's own record."""

    path: str
    record: Optional[dict] = None
    found_in: List[str] = field(default_factory=list)
    descrip: Optional[str] = None
    intent_name: Optional[str] = None
    sidecar: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def marked(self) -> bool:
        return self.record is not None

    def describe(self) -> str:
        """Human-readable, for ``mrisynthesis info FILE``."""
        if self.record is None:
            lines = [f"file:          {self.path}",
                     "provenance:    none: no MRISynthesis sidecar, header mark or embedded record "
                     "(not known to be synthesised by MRISynthesis)"]
            if self.descrip:
                lines.append(f"descrip:       {self.descrip}")
            return "\n".join(lines)
        r = self.record
        generated = r["GeneratedBy"][0]
        model = generated["Model"]
        lines = [
            f"file:          {self.path}",
            f"image:         {r['ImageType'].upper() if r.get('Synthetic') else r['ImageType']}"
            f" ({'synthetic, not acquired' if r.get('Synthetic') else 'not an image of the subject'})",
            f"statement:     {r['Statement']}",
            f"made by:       {generated['Name']} {generated['Version']} on {r.get('DateCreated', '?')}",
            f"model:         {model['Name']} ({' + '.join(model.get('Inputs', []))} -> {model.get('Target', '?')}, "
            f"{model.get('Architecture', '?')}), sha256 {model.get('SHA256')}",
        ]
        for entry in r.get("SourceFiles", []):
            where = entry.get("Path") or "in-memory volume"
            digest = entry.get("SHA256") or f"voxels {entry.get('VoxelSHA256')}"
            lines.append(f"{'input ' + entry['Modality'] + ':':<15}{where} (sha256 {digest})")
        lines += [f"brain mask:    {r['BrainMask']['Description']}",
                  f"device:        {r['Device']}, precision {r['Precision']}"]
        if r.get("Uncertainty"):
            u = r["Uncertainty"]
            lines.append(f"uncertainty:   {u.get('Name', '')} over {', '.join(u.get('Augmentations', []))} "
                         f"({u.get('NetworkPasses', '?')} network passes)")
            if u.get("Validation"):
                lines.append(f"               {u['Validation']}")
        if self.descrip is not None or self.intent_name is not None:
            lines.append(f"NIfTI header:  descrip {self.descrip!r}, intent_name {self.intent_name!r}")
        lines.append(f"read from:     {', '.join(self.found_in)}")
        lines += [f"warning:       {p}" for p in self.problems]
        return "\n".join(lines)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_provenance(path) -> ProvenanceReport:
    """Read back the provenance of a volume written by MRISynthesis, or of its JSON sidecar:
    the sidecar beside it, the NIfTI descrip / intent_name / header extension, the NRRD or
    MHA ``MRISynthesis.*`` keys. Raises OSError / ValueError for unreadable files."""
    from .errors import InputError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    report = ProvenanceReport(path=path)
    if path.lower().endswith(SIDECAR_SUFFIX):
        try:
            record = _read_json(path)
        except ValueError as exc:
            raise InputError(f"{path}: not a JSON file ({exc})") from None
        if is_record(record):
            report.record, report.sidecar = record, path
            report.found_in.append(f"JSON sidecar {path}")
        return report
    embedded = None
    lower = path.lower()
    try:
        if lower.endswith((".nii", ".nii.gz")):
            from .volumes import _load_nifti

            header = _load_nifti(path).header
            report.descrip = bytes(header["descrip"]).rstrip(b"\0").decode("ascii", "replace")
            report.intent_name = bytes(header["intent_name"]).rstrip(b"\0").decode("ascii", "replace")
            if report.descrip.startswith(PROGRAM + " "):
                report.found_in.append("NIfTI descrip")
            for extension in header.extensions:
                if extension.get_code() != NIFTI_COMMENT_EXTENSION:
                    continue
                try:
                    value = json.loads(bytes(extension.get_content()).decode("utf-8"))
                except ValueError:
                    continue
                if is_record(value):
                    embedded = value
                    report.found_in.append("NIfTI header extension (JSON record)")
        elif os.path.isfile(path):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            keys = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
            embedded = record_from_header_keys(keys)
            if any(k.startswith(KEY_PREFIX) for k in keys):
                report.found_in.append(f"header keys {KEY_PREFIX}*")
    except InputError:
        raise
    except Exception as exc:  # nibabel / ITK raise many types for unreadable files
        raise InputError(f"cannot read {path}: {exc}") from exc
    sidecar = sidecar_path(path)
    from_sidecar = None
    if os.path.isfile(sidecar):
        try:
            value = _read_json(sidecar)
        except ValueError:
            value = None
            report.problems.append(f"sidecar {sidecar} is not valid JSON")
        if is_record(value):
            from_sidecar = value
            report.sidecar = sidecar
            report.found_in.append(f"JSON sidecar {sidecar}")
    if from_sidecar is not None and embedded is not None:
        for key in ("Kind", "DateCreated", "Sources"):
            if from_sidecar.get(key) != embedded.get(key):
                report.problems.append(f"the sidecar and the file's own record differ in {key}: the sidecar may "
                                       "belong to another file")
                break
    report.record = embedded if embedded is not None else from_sidecar
    return report
