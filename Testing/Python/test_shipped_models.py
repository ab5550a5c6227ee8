"""The shipped model bundles (Resources/Models): digest, metadata, size, and on a held-out
real subjects of the fixed test split (MRISYNTHESIS_DATA) brain PSNR/SSIM above the
per-voxel linear baseline."""

import json

import numpy as np
import pytest

from MRISynthesisLib.bundle import load_bundle
from MRISynthesisLib.inference import synthesize
from MRISynthesisLib.metrics import subject_metrics
from MRISynthesisLib.models import bundle_name, models_dirs, shipped_bundles
from MRISynthesisLib.preprocessing import AxialReorientation, SliceStack, real_target_in_output_units
from MRISynthesisLib.volumes import load_volume

from conftest import REPO

SHIPPED = {("t1",): "t1_to_flair", ("t1", "t2"): "t1_t2_to_flair", ("t1", "t2", "t1c"): "t1_t2_t1c_to_flair"}
MODELS_DIR = REPO / "Resources" / "Models"
MAX_BYTES = 25 * 1024 * 1024


@pytest.mark.parametrize("sources,name", SHIPPED.items())
def test_bundle_metadata(sources, name):
    path = MODELS_DIR / f"{name}.safetensors"
    assert path.is_file(), f"shipped model {path} is missing"
    assert path.stat().st_size <= MAX_BYTES
    bundle = load_bundle(path)  # verifies the SHA-256 digest
    assert bundle.sources == sources and bundle.target == "flair" and bundle_name(sources) == name
    assert bundle.model.architecture == "fdgan"  # the paper's architecture is the default
    prov = bundle.provenance
    assert prov["trained_by"] == "python -m training train"
    assert prov["split"]["train"] and prov["split"]["test"]
    assert not set(prov["split"]["train"]) & set(prov["split"]["test"])
    assert "Model card" in prov["model_card"] and "Known limits" in prov["model_card"]
    assert prov["held_out_evaluation"]
    described = bundle.describe()  # what `mrisynthesis info` prints
    assert "held-out:      fdgan: PSNR" in described and "## Known limits" in described
    assert shipped_bundles()[name] == path or MODELS_DIR not in models_dirs()


def _brain_slices_metrics(real, pred, mask, affine):
    reo = AxialReorientation(affine)
    real, pred, mask = (reo.forward(a) for a in (real, pred, mask))
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    t = lambda a: a[..., z].transpose(2, 0, 1)  # noqa: E731
    return subject_metrics(t(real), t(pred), t(mask))


def _linear_coefficients(bundle):
    """The per-voxel linear baseline of the bundle's held-out evaluation (fit on its
    training subjects): y = a0 + sum a_i x_i on the normalised sources."""
    for method in bundle.provenance["held_out_evaluation"]["methods"]:
        if method["kind"] == "linear" and tuple(method["sources"]) == bundle.sources:
            return np.asarray(method["coefficients"])
    pytest.fail(f"{bundle.path}: no linear baseline over {bundle.sources} in its held-out evaluation")


# Held-out subjects of the fixed split (docs/split.json), cheapest first; two per model
# keep the test short. Each must also be outside the bundle's own training/validation data.
TEST_SUBJECTS_PREFERRED = ("ms-long-04a", "brats-met-00110", "ms-mni-07")


# Measured: today's T1-only bundle (7 training subjects, width 16, 24 CPU epochs) scores a
# brain PSNR of 12.1 dB on brats-met-00110 against 13.9 dB for the linear fit of T1; it is
# to be replaced by the retraining of issue 12. strict: the mark must go once it passes.
KNOWN_BELOW_LINEAR = {"t1_to_flair": "today's T1 model is below the linear baseline on brats-met-00110 "
                                     "(brain PSNR 12.1 vs 13.9 dB); retraining pending (issue 12)"}


@pytest.mark.parametrize("sources,name", [
    pytest.param(sources, name, marks=pytest.mark.xfail(reason=KNOWN_BELOW_LINEAR[name], strict=True))
    if name in KNOWN_BELOW_LINEAR else (sources, name) for sources, name in SHIPPED.items()])
def test_beats_the_linear_baseline_on_held_out_subjects(real_data, sources, name):
    bundle = load_bundle(MODELS_DIR / f"{name}.safetensors")
    split = json.loads((REPO / "docs" / "split.json").read_text())
    seen = set(bundle.provenance["split"]["train"]) | set(bundle.provenance["split"].get("val", []))
    subjects = [s for s in TEST_SUBJECTS_PREFERRED if s in split["test"] and s not in seen
                and all((real_data / s / f"{m}.nii.gz").is_file() for m in (*sources, "flair"))][:2]
    assert subjects, "no held-out subject with these modalities in the data folder"
    coefficients = _linear_coefficients(bundle)
    for subject_name in subjects:
        subject = real_data / subject_name
        mask_path = subject / "mask.nii.gz"
        inputs = {m: load_volume(subject / f"{m}.nii.gz", m) for m in sources}
        mask = load_volume(mask_path).array > 0 if mask_path.is_file() else None
        flair = load_volume(subject / "flair.nii.gz", "flair")
        pred = synthesize(inputs, bundle, mask=mask_path if mask is not None else None, precision="bf16")
        brain = mask if mask is not None else (np.stack([v.array for v in inputs.values()]) != 0).any(0)
        real = real_target_in_output_units(flair.array, brain, bundle.preprocessing)
        stack = SliceStack([inputs[m].array for m in sources], flair.affine, bundle.preprocessing, mask=brain)
        linear = stack.finish((coefficients[0] + np.tensordot(coefficients[1:], stack.channels, axes=1))
                              .astype(np.float32))
        model = _brain_slices_metrics(real, pred.array, brain, flair.affine)
        reference = _brain_slices_metrics(real, linear, brain, flair.affine)
        assert model["psnr_masked"] > reference["psnr_masked"], (subject_name, model, reference)
        assert model["ssim_masked"] > reference["ssim_masked"], (subject_name, model, reference)
