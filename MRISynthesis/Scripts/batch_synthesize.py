"""Synthesise FLAIR for every subject folder of a directory, or every subject of a BIDS dataset, headless.

In 3D Slicer:
    Slicer --no-main-window --python-script batch_synthesize.py --input-dir DIR --output-dir OUT
Under plain Python with the PyPI ``slicer-core`` package (what CI runs):
    python MRISynthesis/Scripts/batch_synthesize.py --input-dir DIR --output-dir OUT

Plain folders: each subfolder of DIR is one subject; its volumes are recognised by file name
(t1, t1n; t2, t2w; t1c, t1ce, t1gd, post; BIDS names; MRISynthesisLib.subjects) and the result
is written to OUT/<subject>_flair.nii.gz (or --format nrrd) on the T1 grid.
BIDS datasets (DIR has dataset_description.json or sub-* folders): every sub-X[/ses-Y]/anat
is one subject and the result is a BIDS derivative,
ROOT/derivatives/mrisynthesis/sub-X[/ses-Y]/anat/sub-X[_ses-Y]_desc-synthetic_FLAIR.nii.gz
with ROOT/derivatives/mrisynthesis/dataset_description.json, where ROOT is --output-dir when
given, else the dataset itself.

Brain mask (MRISynthesisLib.brainmask): a mask file in the subject's folder (mask, brainmask)
is used as given (unless --no-mask); otherwise --brain-mask auto (default: the T1's non-zero
voxels when it is already skull-stripped, else the brain is extracted with deepbet) or none.
The line of each subject says which way it went. --save-mask also writes the mask used
(1 = brain) beside the output: <subject>_brainmask.<ext>, in BIDS sub-X[_ses-Y]_desc-brain_mask.nii.gz.
--uncertainty also writes the per-voxel test-time-augmentation spread (MRISynthesisLib.uncertainty;
one network pass per augmentation; docs/uncertainty.md says what it is worth):
<subject>_flair_uncertainty.<ext>, in BIDS sub-X[_ses-Y]_desc-<UNCERTAINTY_DESC>_FLAIR.nii.gz.

Every volume written is marked as MRISynthesis output (MRISynthesisLib.provenance): NIfTI
descrip / intent_name / header extension or NRRD MRISynthesis.* keys, and a JSON sidecar beside
it (X.nii.gz -> X.json) naming the subject's input files with their SHA-256, the model and
its digest, the brain-mask decision, device and precision. A subject's files are written all
together or not at all.

Every subject is read into a fresh MRML scene through storage nodes and synthesised by the
same SynthesisSceneLogic the module uses. One line per subject is printed; subjects with
missing modalities are skipped and reported. Arguments (--inputs, --model, --device,
--brain-mask, the folders, the subjects) are checked before any subject is read. Every path
ends the process with a printed reason (``Slicer --python-script`` would otherwise keep
running): exit status 0 when all subjects were synthesised, 1 when a subject failed or was
skipped or an unexpected error (e.g. an import error) occurred, 2 for bad arguments or
missing Python packages, 130 for Ctrl-C.
"""

import argparse
import os
import sys
import time


def _importModuleSide():
    """The module folder (SlicerMRISynthesisLib beside MRISynthesis.py) is one level up, in the
    source tree (MRISynthesis/Scripts) and in an installed extension (qt-scripted-modules/Scripts);
    importing SlicerMRISynthesisLib makes MRISynthesisLib importable."""
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if moduleDir not in sys.path:
        sys.path.insert(0, moduleDir)
    import SlicerMRISynthesisLib  # noqa: F401


def parseArguments(argv=None):
    from SlicerMRISynthesisLib.scene import (BRAIN_MASK_MODES, DEFAULT_BRAIN_MASK, DEFAULT_PRECISION, PRECISIONS,
                                             SHIPPED_MODEL_NAMES)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", required=True, help="folder with one subfolder per subject, or a BIDS dataset")
    parser.add_argument("--output-dir", default=None,
                        help="where <subject>_flair.<ext> files are written (required for plain folders); for a "
                             "BIDS dataset the root of derivatives/mrisynthesis (default: the dataset itself)")
    parser.add_argument("--model", default=None,
                        help=f"shipped model ({', '.join(SHIPPED_MODEL_NAMES)}) or bundle file; "
                             "default: per subject, the shipped model taking exactly its inputs")
    parser.add_argument("--inputs", default=None,
                        help="comma-separated modalities to use (e.g. t1,t2); default: all found "
                             "(or those the --model needs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz")
    parser.add_argument("--brain-mask", choices=BRAIN_MASK_MODES, default=DEFAULT_BRAIN_MASK,
                        help="for subjects without a mask file: auto (default) extracts the brain from the T1 "
                             "unless it is already skull-stripped; none uses the non-zero voxels")
    parser.add_argument("--no-mask", action="store_true", help="ignore mask files in subject folders")
    parser.add_argument("--save-mask", action="store_true", help="also write the brain mask used beside each output")
    parser.add_argument("--uncertainty", action="store_true",
                        help="also write the per-voxel uncertainty map (test-time-augmentation spread) beside each "
                             "output; one extra network pass per augmentation (docs/uncertainty.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results (and their sidecars) left by an earlier run; without it an existing "
                             "result stops the run before any subject is read")
    parser.add_argument("--subjects", default=None,
                        help="comma-separated subject folder names, or BIDS sub-X / sub-X_ses-Y (default: all)")
    return parser.parse_args(argv)


class ArgumentError(Exception):
    """An argument that cannot work; found before any subject is read."""


class SubjectPlan:
    """One subject to synthesise: its name (folder name, or BIDS sub-X[_ses-Y]), where its
    files are (a folder, or the files BIDS discovery found) and where its results go."""

    def __init__(self, name, outputPath, maskPath, folder=None, files=None, uncertaintyPath=None):
        self.name, self.outputPath, self.maskPath = name, outputPath, maskPath
        self.folder, self.files = folder, files
        self.uncertaintyPath = uncertaintyPath

    def inputFiles(self):
        from SlicerMRISynthesisLib.scene import inputsFromFolder

        return dict(self.files) if self.files is not None else inputsFromFolder(self.folder)


def validateArguments(args):
    """Check everything that can be checked before work; returns the subject folder names."""
    import re

    from MRISynthesisLib.errors import MRISynthesisError
    from MRISynthesisLib.models import resolve_model
    from SlicerMRISynthesisLib.scene import DEVICES, INPUT_MODALITIES, readBundleSources

    if args.device not in DEVICES and not re.fullmatch(r"cuda:\d+", args.device):
        raise ArgumentError(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if args.inputs is not None:
        wanted = [m.strip() for m in args.inputs.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in INPUT_MODALITIES]
        if unknown or not wanted:
            raise ArgumentError(f"--inputs {args.inputs!r}: {', '.join(unknown) or 'nothing'} is not an input "
                                f"modality; choose from {', '.join(INPUT_MODALITIES)} (a mask is found by file name)")
        if "t1" not in wanted:
            raise ArgumentError(f"--inputs {args.inputs!r}: t1 is required (the output is made on its grid)")
        if len(set(wanted)) != len(wanted):
            raise ArgumentError(f"--inputs {args.inputs!r}: a modality is listed twice")
    if args.model:
        try:
            sources = readBundleSources(resolve_model(args.model, []))
        except MRISynthesisError as exc:
            raise ArgumentError(f"--model: {exc}") from None
        if args.inputs is not None and sorted(sources) != sorted(wanted):
            raise ArgumentError(f"--inputs {args.inputs!r} but the model takes {', '.join(sources)}")
    if not os.path.isdir(args.input_dir):
        raise ArgumentError(f"input folder not found: {args.input_dir}")
    from MRISynthesisLib.subjects import is_bids_dataset

    plans = _bidsPlans(args) if is_bids_dataset(args.input_dir) else _folderPlans(args)
    outputRoot = args.output_dir if args.output_dir is not None else args.input_dir
    try:
        os.makedirs(outputRoot, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"cannot create the output folder {outputRoot}: {exc.strerror or exc}") from None
    if not os.access(outputRoot, os.W_OK):
        raise ArgumentError(f"the output folder {outputRoot} is not writable")
    if not args.overwrite:
        existing = [f for plan in plans for f in _planOutputs(args, plan) if os.path.exists(f)]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise ArgumentError(f"{existing[0]}{more} already exist (an earlier run's results); pass --overwrite to "
                                "replace them, or choose another --output-dir")
    return plans


def _planOutputs(args, plan):
    """Every file a subject's run writes: its volumes and their JSON sidecars."""
    from MRISynthesisLib.provenance import output_files

    volumes = [plan.outputPath] + ([plan.maskPath] if args.save_mask else []) + \
        ([plan.uncertaintyPath] if args.uncertainty else [])
    return [f for v in volumes for f in output_files(v)]


def _chosen(args, names, what):
    """The --subjects names in the order given (all when not given); unknown ones are an error."""
    if not args.subjects:
        return list(names)
    chosen = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ArgumentError(f"no {what} {', '.join(unknown)} in {args.input_dir}")
    return chosen


def _folderPlans(args):
    if args.output_dir is None:
        raise ArgumentError("--output-dir is required (the input folder is not a BIDS dataset)")
    subjects = sorted(d for d in os.listdir(args.input_dir) if os.path.isdir(os.path.join(args.input_dir, d)))
    if not subjects:
        raise ArgumentError(f"no subject folders in {args.input_dir}")
    return [SubjectPlan(s, os.path.join(args.output_dir, f"{s}_flair.{args.format}"),
                        os.path.join(args.output_dir, f"{s}_brainmask.{args.format}"),
                        folder=os.path.join(args.input_dir, s),
                        uncertaintyPath=os.path.join(args.output_dir, f"{s}_flair_uncertainty.{args.format}"))
            for s in _chosen(args, subjects, "subject folder")]


def _bidsPlans(args):
    from MRISynthesisLib.errors import MRISynthesisError
    from MRISynthesisLib.subjects import UNCERTAINTY_DESC, bids_derivative_path, bids_subjects

    if args.format != "nii.gz":
        raise ArgumentError(f"--format {args.format}: a BIDS derivative is written as .nii.gz")
    try:
        found = list(bids_subjects(args.input_dir))
    except MRISynthesisError as exc:
        raise ArgumentError(f"BIDS dataset {args.input_dir}: {exc}") from None
    if not found:
        raise ArgumentError(f"BIDS dataset {args.input_dir}: no sub-*/[ses-*/]anat folder with images")
    # --subjects takes sub-X_ses-Y (one session) or sub-X (all its sessions).
    byName = {}
    for subject in found:
        for name in {subject.name, f"sub-{subject.subject}"}:
            byName.setdefault(name, []).append(subject)
    selected = []
    for name in _chosen(args, byName, "BIDS subject") if args.subjects else ():
        selected += [s for s in byName[name] if s not in selected]
    root = args.output_dir if args.output_dir is not None else args.input_dir
    plans = []
    for subject in selected or found:
        flair = bids_derivative_path(root, subject.subject, subject.session)
        mask = os.path.join(os.path.dirname(flair), f"{subject.name}_desc-brain_mask.nii.gz")
        uncertainty = bids_derivative_path(root, subject.subject, subject.session, desc=UNCERTAINTY_DESC)
        plans.append(SubjectPlan(subject.name, flair, mask, files=subject.files, uncertaintyPath=uncertainty))
    return plans


def wantedInputs(args, found):
    if args.inputs:
        return [m.strip() for m in args.inputs.split(",") if m.strip()]
    if args.model:
        from MRISynthesisLib.models import resolve_model
        from SlicerMRISynthesisLib.scene import readBundleSources

        return list(readBundleSources(resolve_model(args.model, [])))
    return [m for m in ("t1", "t2", "t1c") if m in found]


def runSubject(args, logic, plan):
    import numpy as np
    import slicer  # 3D Slicer's, or slicer-core's under plain Python

    from MRISynthesisLib import provenance
    from MRISynthesisLib.volumes import Volume, save_volumes
    from SlicerMRISynthesisLib.scene import MODALITY_LABELS, loadVolumeNode

    found = plan.inputFiles()
    wanted = wantedInputs(args, found)
    missing = [m for m in wanted if m not in found] or ([] if "t1" in found else ["t1"])
    if missing:
        return "SKIPPED", f"missing {', '.join(MODALITY_LABELS.get(m, m) for m in missing)}"
    scene = slicer.vtkMRMLScene()  # one small scene per subject: nothing accumulates
    logic.scene = scene
    nodes = {m: loadVolumeNode(scene, found[m], m) for m in wanted}
    mask = None
    if "mask" in found and not args.no_mask:
        mask = loadVolumeNode(scene, found["mask"], "mask")
    request = logic.prepare(**nodes, mask=mask, brainMask=args.brain_mask, saveMask=args.save_mask,
                            model=args.model, device=args.device, precision=args.precision,
                            uncertainty=args.uncertainty)
    result = logic.compute(request)  # MRISynthesisLib.inference.SynthesisResult
    # The record names the subject's files (the nodes' voxels were read from them).
    sourceFiles = {m: found[m] for m in wanted}
    if mask is not None:
        sourceFiles["mask"] = found["mask"]
    record = provenance.attach_source_files(result.provenance, sourceFiles)
    affine = result.volume.affine
    outputs = [(Volume(result.volume.array, affine, provenance=record), plan.outputPath)]
    written = plan.outputPath
    if args.save_mask:
        outputs.append((Volume((result.brain_mask.array > 0).astype(np.uint8), affine,
                               provenance=provenance.record_for_kind(record, provenance.KIND_MASK)), plan.maskPath))
        written += f" and {plan.maskPath}"
    if args.uncertainty:
        outputs.append((Volume(result.uncertainty.array, affine,
                               provenance=provenance.record_for_kind(record, provenance.KIND_UNCERTAINTY)),
                        plan.uncertaintyPath))
        written += f" and {plan.uncertaintyPath}"
    os.makedirs(os.path.dirname(plan.outputPath) or ".", exist_ok=True)
    save_volumes(outputs)  # each with its JSON sidecar; all of the subject's files or none
    decision = result.mask_decision.description
    if mask is not None:
        decision += f" (the subject's file {os.path.basename(found['mask'])})"
    return "OK", f"{'+'.join(wanted)} -> {written}; {decision}"


def main(argv=None):
    """Exit status: 0 all synthesised, 1 a subject failed or was skipped, 2 bad arguments or setup."""
    _importModuleSide()
    args = parseArguments(argv)
    try:
        plans = validateArguments(args)
    except ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from SlicerMRISynthesisLib.dependencies import checkRequirements

    problems = checkRequirements()
    if problems:
        print("error: " + "; ".join(p.message for p in problems) + ". In Slicer, open the MRISynthesis module and "
              "press Apply once (it offers to install them), or install the PyTorch extension.", file=sys.stderr)
        return 2
    import MRISynthesisLib
    from MRISynthesisLib.errors import MRISynthesisError
    from MRISynthesisLib.subjects import is_bids_dataset, write_derivative_description
    from SlicerMRISynthesisLib.scene import SynthesisSceneLogic

    if is_bids_dataset(args.input_dir):
        root = args.output_dir if args.output_dir is not None else args.input_dir
        print(f"BIDS dataset: writing the derivative {write_derivative_description(root, MRISynthesisLib.__version__)}",
              flush=True)
    # One logic for all subjects: the network is built once.
    logic = SynthesisSceneLogic()
    failures = 0
    for plan in plans:
        start = time.time()
        try:
            status, detail = runSubject(args, logic, plan)
        except MRISynthesisError as exc:
            status, detail = "FAILED", str(exc)
        except Exception as exc:  # report and continue with the next subject
            status, detail = "FAILED", f"{type(exc).__name__}: {exc}"
        failures += status != "OK"
        print(f"{plan.name}: {status} ({time.time() - start:.1f} s) {detail}", flush=True)
    print(f"{len(plans) - failures} of {len(plans)} subjects synthesised", flush=True)
    return 1 if failures else 0


def run(argv=None) -> int:
    """main() with every way out turned into an exit status and a printed reason."""
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    except BaseException as exc:  # an import error, a broken installation...
        import traceback

        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


def _exit(status):
    # Slicer --python-script never exits by itself: quit the application with the status.
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except BaseException:
        app = None
    if app is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(run())
