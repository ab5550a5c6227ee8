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
modalities are skipped and reported; the exit status is 1 if any subject was skipped or
failed, 0 otherwise.
"""

import argparse
import os
import sys
import time

# The module folder (MRISynthesisSceneLogic) and the folder holding MRISynthesisLib: the
# same two levels up in the source tree (MRISynthesis/Scripts) and in an installed
# extension (qt-scripted-modules/Scripts).
_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import slicer  # noqa: E402  (3D Slicer's, or slicer-core's under plain Python)

from MRISynthesisLib.errors import MRISynthesisError  # noqa: E402
from MRISynthesisSceneLogic import (  # noqa: E402
    DEFAULT_PRECISION, DEVICES, MODALITY_LABELS, PRECISIONS, SHIPPED_MODEL_NAMES, SynthesisSceneLogic,
    inputsFromFolder, loadVolumeNode, saveVolumeNode,
)


def parseArguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", required=True, help="folder with one subfolder per subject")
    parser.add_argument("--output-dir", required=True, help="where <subject>_flair.<ext> files are written")
    parser.add_argument("--model", default=None,
                        help=f"shipped model ({', '.join(SHIPPED_MODEL_NAMES)}) or bundle file; "
                             "default: per subject, the shipped model taking exactly its inputs")
    parser.add_argument("--inputs", default=None,
                        help="comma-separated modalities to use (e.g. t1,t2); default: all found "
                             "(or those the --model needs)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION)
    parser.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz")
    parser.add_argument("--no-mask", action="store_true", help="ignore mask files in subject folders")
    parser.add_argument("--subjects", default=None, help="comma-separated subject folder names (default: all)")
    return parser.parse_args(argv)


def wantedInputs(args, found):
    if args.inputs:
        return [m.strip() for m in args.inputs.split(",") if m.strip()]
    if args.model:
        from MRISynthesisLib.models import resolve_model
        from MRISynthesisSceneLogic import readBundleSources

        return list(readBundleSources(resolve_model(args.model, [])))
    return [m for m in ("t1", "t2", "t1c") if m in found]


def runSubject(args, subjectDir, outputPath):
    found = inputsFromFolder(subjectDir)
    wanted = wantedInputs(args, found)
    missing = [m for m in wanted if m not in found] or ([] if "t1" in found else ["t1"])
    if missing:
        return "SKIPPED", f"missing {', '.join(MODALITY_LABELS.get(m, m) for m in missing)}"
    scene = slicer.vtkMRMLScene()  # one small scene per subject: nothing accumulates
    nodes = {m: loadVolumeNode(scene, found[m], m) for m in wanted}
    mask = None
    if "mask" in found and not args.no_mask:
        mask = loadVolumeNode(scene, found["mask"], "mask")
    logic = SynthesisSceneLogic(scene)
    output = logic.synthesize(**nodes, mask=mask, model=args.model, device=args.device,
                              precision=args.precision)
    saveVolumeNode(output, outputPath)
    return "OK", f"{'+'.join(wanted)} -> {outputPath}"


def main(argv=None):
    args = parseArguments(argv)
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("error: PyTorch is not installed in this Python. In Slicer, open the MRISynthesis module and "
              "press Apply once (it offers to install PyTorch), or install the PyTorch extension.", file=sys.stderr)
        return 2
    if not os.path.isdir(args.input_dir):
        print(f"error: input folder not found: {args.input_dir}", file=sys.stderr)
        return 2
    subjects = sorted(d for d in os.listdir(args.input_dir) if os.path.isdir(os.path.join(args.input_dir, d)))
    if args.subjects:
        chosen = [s.strip() for s in args.subjects.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in subjects]
        if unknown:
            print(f"error: no subject folder {', '.join(unknown)} in {args.input_dir}", file=sys.stderr)
            return 2
        subjects = chosen
    if not subjects:
        print(f"error: no subject folders in {args.input_dir}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    failures = 0
    for subject in subjects:
        start = time.time()
        outputPath = os.path.join(args.output_dir, f"{subject}_flair.{args.format}")
        try:
            status, detail = runSubject(args, os.path.join(args.input_dir, subject), outputPath)
        except MRISynthesisError as exc:
            status, detail = "FAILED", str(exc)
        except Exception as exc:  # report and continue with the next subject
            status, detail = "FAILED", f"{type(exc).__name__}: {exc}"
        failures += status != "OK"
        print(f"{subject}: {status} ({time.time() - start:.1f} s) {detail}", flush=True)
    print(f"{len(subjects) - failures} of {len(subjects)} subjects synthesised", flush=True)
    return 1 if failures else 0


def _exit(status):
    # Inside Slicer, quit the application with the status; under plain Python, exit normally.
    if hasattr(slicer, "app") and slicer.app is not None:
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(main())
