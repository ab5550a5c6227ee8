"""The shipped model bundles (Resources/Models): digest, metadata, size, and on a held-out
real case (MRISYNTHESIS_DATA) a PSNR above a trivial reference."""

import numpy as np
import pytest

from MRISynthesisLib.bundle import load_bundle
from MRISynthesisLib.inference import synthesize
from MRISynthesisLib.metrics import subject_metrics
from MRISynthesisLib.models import bundle_name, models_dirs, shipped_bundles
from MRISynthesisLib.preprocessing import AxialReorientation, real_target_in_output_units
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


@pytest.mark.parametrize("sources,name", SHIPPED.items())
def test_beats_trivial_reference_on_held_out_case(real_data, sources, name):
    bundle = load_bundle(MODELS_DIR / f"{name}.safetensors")
    test_subjects = [s for s in bundle.provenance["split"]["test"]
                     if all((real_data / s / f"{m}.nii.gz").is_file() for m in (*sources, "flair"))]
    assert test_subjects, "no held-out subject with these modalities in the data folder"
    subject = real_data / test_subjects[0]
    mask_path = subject / "mask.nii.gz"
    inputs = {m: load_volume(subject / f"{m}.nii.gz", m) for m in sources}
    mask = load_volume(mask_path).array > 0 if mask_path.is_file() else None
    flair = load_volume(subject / "flair.nii.gz", "flair")
    pred = synthesize(inputs, bundle, mask=mask_path if mask is not None else None, precision="bf16")
    brain = mask if mask is not None else (np.stack([v.array for v in inputs.values()]) != 0).any(0)
    real = real_target_in_output_units(flair.array, brain, bundle.preprocessing)
    # Trivial reference: the normalised T2 when the model has it, else the normalised T1.
    trivial_source = "t2" if "t2" in sources else "t1"
    trivial = real_target_in_output_units(inputs[trivial_source].array, brain, bundle.preprocessing)
    model = _brain_slices_metrics(real, pred.array, brain, flair.affine)
    reference = _brain_slices_metrics(real, trivial, brain, flair.affine)
    assert model["psnr"] > reference["psnr"], (model, reference)
    assert model["psnr_masked"] > reference["psnr_masked"], (model, reference)
