"""Synthesise FLAIR for every subject folder of a directory, headless.

In 3D Slicer:
    Slicer --no-main-window --python-script batch_synthesize.py --input-dir DIR --output-dir OUT
Under plain Python with the PyPI ``slicer-core`` package (what CI runs):
    python MRISynthesis/Scripts/batch_synthesize.py --input-dir DIR --output-dir OUT

Each subfolder of DIR is one subject; its volumes are recognised by file name (t1, t1n;
t2, t2w; t1c, t1ce, t1gd, post; a "mask" file is used as brain mask). Every subject is read
into a fresh MRML scene through storage nodes and synthesised by the same
SynthesisSceneLogic the module uses; the result is written to OUT/<subject>_flair.nii.gz
(or --format nrrd) on the T1 grid. One line per subject is printed; subjects with missing
modalities are skipped and reported. Arguments (--inputs, --model, --device, the folders)
are checked before any subject is read. Every path ends the process with a printed reason
(``Slicer --python-script`` would otherwise keep running): exit status 0 when all subjects
were synthesised, 1 when a subject failed or was skipped or an unexpected error (e.g. an
import error) occurred, 2 for bad arguments or missing Python packages, 130 for Ctrl-C.
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
    from SlicerMRISynthesisLib.scene import DEFAULT_PRECISION, PRECISIONS, SHIPPED_MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", required=True, help="folder with one subfolder per subject")
    parser.add_argument("--output-dir", required=True, help="where <subject>_flair.<ext> files are written")
    parser.add_argument("--model", default=None,
                        help=f"shipped model ({', '.join(SHIPPED_MODEL_NAMES)}) or bundle file; "
                             "default: per subject, the shipped model taking exactly its inputs")
    parser.add_argument("--inputs", default=None,
                        help="comma-separated modalities to use (e.g. t1,t2); default: all found "
                             "(or those the --model needs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz")
    parser.add_argument("--no-mask", action="store_true", help="ignore mask files in subject folders")
    parser.add_argument("--subjects", default=None, help="comma-separated subject folder names (default: all)")
    return parser.parse_args(argv)


class ArgumentError(Exception):
    """An argument that cannot work; found before any subject is read."""


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
    subjects = sorted(d for d in os.listdir(args.input_dir) if os.path.isdir(os.path.join(args.input_dir, d)))
    if args.subjects:
        chosen = [s.strip() for s in args.subjects.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in subjects]
        if unknown:
            raise ArgumentError(f"no subject folder {', '.join(unknown)} in {args.input_dir}")
        subjects = chosen
    if not subjects:
        raise ArgumentError(f"no subject folders in {args.input_dir}")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"cannot create the output folder {args.output_dir}: {exc.strerror or exc}") from None
    if not os.access(args.output_dir, os.W_OK):
        raise ArgumentError(f"the output folder {args.output_dir} is not writable")
    return subjects


def wantedInputs(args, found):
    if args.inputs:
        return [m.strip() for m in args.inputs.split(",") if m.strip()]
    if args.model:
        from MRISynthesisLib.models import resolve_model
        from SlicerMRISynthesisLib.scene import readBundleSources

        return list(readBundleSources(resolve_model(args.model, [])))
    return [m for m in ("t1", "t2", "t1c") if m in found]


def runSubject(args, logic, subjectDir, outputPath):
    import slicer  # 3D Slicer's, or slicer-core's under plain Python

    from SlicerMRISynthesisLib.scene import MODALITY_LABELS, inputsFromFolder, loadVolumeNode, saveVolumeNode

    found = inputsFromFolder(subjectDir)
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
    output = logic.synthesize(**nodes, mask=mask, model=args.model, device=args.device, precision=args.precision)
    saveVolumeNode(output, outputPath)
    return "OK", f"{'+'.join(wanted)} -> {outputPath}"


def main(argv=None):
    """Exit status: 0 all synthesised, 1 a subject failed or was skipped, 2 bad arguments or setup."""
    _importModuleSide()
    args = parseArguments(argv)
    try:
        subjects = validateArguments(args)
    except ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from SlicerMRISynthesisLib.dependencies import checkRequirements

    problems = checkRequirements()
    if problems:
        print("error: " + "; ".join(p.message for p in problems) + ". In Slicer, open the MRISynthesis module and "
              "press Apply once (it offers to install them), or install the PyTorch extension.", file=sys.stderr)
        return 2
    from MRISynthesisLib.errors import MRISynthesisError
    from SlicerMRISynthesisLib.scene import SynthesisSceneLogic

    logic = SynthesisSceneLogic()  # one logic for all subjects: the network is built once
    failures = 0
    for subject in subjects:
        start = time.time()
        outputPath = os.path.join(args.output_dir, f"{subject}_flair.{args.format}")
        try:
            status, detail = runSubject(args, logic, os.path.join(args.input_dir, subject), outputPath)
        except MRISynthesisError as exc:
            status, detail = "FAILED", str(exc)
        except Exception as exc:  # report and continue with the next subject
            status, detail = "FAILED", f"{type(exc).__name__}: {exc}"
        failures += status != "OK"
        print(f"{subject}: {status} ({time.time() - start:.1f} s) {detail}", flush=True)
    print(f"{len(subjects) - failures} of {len(subjects)} subjects synthesised", flush=True)
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
