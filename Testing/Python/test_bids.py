"""BIDS names and datasets: one naming rule (MRISynthesisLib.subjects) for training, the demo
and the batch script; derivative output paths."""

import json

import numpy as np
import pytest

from MRISynthesisLib import __version__
from MRISynthesisLib.demo import find_subject_files
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.subjects import (bids_derivative_path, bids_subjects, is_bids_dataset, modality_of,
                                      subject_files, write_derivative_description)
from training.data import discover


@pytest.mark.parametrize("name, modality", [
    ("sub-01_T1w.nii.gz", "t1"), ("sub-01_ses-pre_T1w.nii", "t1"), ("sub-01_run-1_T2w.nii.gz", "t2"),
    ("sub-01_ses-1_FLAIR.nii.gz", "flair"), ("sub-01_ce-gadolinium_T1w.nii.gz", "t1c"),
    ("sub-01_ses-1_acq-mprage_ce-gd_rec-norm_T1w.nii.gz", "t1c"), ("sub-01_acq-ce_T1w.nii.gz", "t1"),
    ("sub-01_desc-brain_mask.nii.gz", "mask"), ("sub-01_T1w.json", None), ("sub-01_T2star.nii.gz", None),
    ("sub-01_dwi.nii.gz", None),
    # this project's and the BraTS names still mean what they meant
    ("t1.nii.gz", "t1"), ("BraTS19_x_t1ce.nii.gz", "t1c"), ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
])
def test_bids_names(name, modality):
    assert modality_of(name) == modality


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def bids_root(tmp_path):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for name in ("sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz", "sub-01_FLAIR.nii.gz", "sub-01_ce-gd_T1w.nii.gz",
                 "sub-01_T1w.json"):
        _touch(root / "sub-01" / "anat" / name)
    for ses in ("a", "b"):
        _touch(root / "sub-02" / f"ses-{ses}" / "anat" / f"sub-02_ses-{ses}_T1w.nii.gz")
        _touch(root / "sub-02" / f"ses-{ses}" / "func" / f"sub-02_ses-{ses}_task-rest_bold.nii.gz")
    _touch(root / "sub-03" / "dwi" / "sub-03_dwi.nii.gz")  # no anat: not a subject here
    _touch(root / "derivatives" / "mrisynthesis" / "sub-01" / "anat" / "sub-01_desc-synthetic_FLAIR.nii.gz")
    return root


def test_walker(bids_root):
    assert is_bids_dataset(bids_root)
    found = list(bids_subjects(bids_root))
    assert [(s.subject, s.session, s.name) for s in found] == [
        ("01", None, "sub-01"), ("02", "a", "sub-02_ses-a"), ("02", "b", "sub-02_ses-b")]
    assert sorted(found[0].files) == ["flair", "t1", "t1c", "t2"]
    assert found[0].files["t1c"].endswith("sub-01_ce-gd_T1w.nii.gz")
    assert found[1].files == {"t1": str(bids_root / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_T1w.nii.gz")}


def test_subject_folder_may_be_a_bids_subject(bids_root):
    assert subject_files(bids_root / "sub-01") == subject_files(bids_root / "sub-01" / "anat")
    assert find_subject_files(bids_root / "sub-01")["t2"].endswith("sub-01_T2w.nii.gz")  # the demo's --subject
    assert subject_files(bids_root / "sub-02" / "ses-b")["t1"].endswith("sub-02_ses-b_T1w.nii.gz")
    with pytest.raises(InputError, match="several BIDS sessions.*ses-a, ses-b"):
        subject_files(bids_root / "sub-02")


def test_training_discovers_bids(bids_root):
    subjects = discover(bids_root)
    assert [s.name for s in subjects] == ["sub-01", "sub-02_ses-a", "sub-02_ses-b"]
    assert subjects[0].files["flair"].name == "sub-01_FLAIR.nii.gz"


def test_plain_data_folder_is_not_bids(tmp_path):
    _touch(tmp_path / "case1" / "t1.nii.gz")
    assert not is_bids_dataset(tmp_path)
    assert [s.name for s in discover(tmp_path)] == ["case1"]


def test_derivative_path_and_description(bids_root):
    assert bids_derivative_path(bids_root, "01") == str(
        bids_root / "derivatives" / "mrisynthesis" / "sub-01" / "anat" / "sub-01_desc-synthetic_FLAIR.nii.gz")
    assert bids_derivative_path(bids_root, "sub-02", "ses-a") == bids_derivative_path(bids_root, "02", "a") == str(
        bids_root / "derivatives" / "mrisynthesis" / "sub-02" / "ses-a" / "anat"
        / "sub-02_ses-a_desc-synthetic_FLAIR.nii.gz")
    path = write_derivative_description(bids_root, __version__)
    description = json.loads(open(path).read())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "MRISynthesis"
    assert description["GeneratedBy"][0]["Version"] == __version__
    # An existing description is the dataset's own: never overwritten.
    with open(path, "w") as f:
        json.dump({"Name": "mine"}, f)
    write_derivative_description(bids_root, __version__)
    assert json.loads(open(path).read()) == {"Name": "mine"}
    # The derivatives folder is not walked as subjects.
    assert all("derivatives" not in s.folder for s in bids_subjects(bids_root))
    assert np.all([s.subject != "mrisynthesis" for s in bids_subjects(bids_root)])


def test_derivative_paths_of_the_other_outputs(bids_root):
    from MRISynthesisLib.provenance import sidecar_path
    from MRISynthesisLib.subjects import UNCERTAINTY_DESC

    flair = bids_derivative_path(bids_root, "02", "a")
    spread = bids_derivative_path(bids_root, "02", "a", desc=UNCERTAINTY_DESC)
    assert spread == flair.replace("desc-synthetic_FLAIR", f"desc-{UNCERTAINTY_DESC}_FLAIR") != flair
    assert sidecar_path(flair) == flair[: -len(".nii.gz")] + ".json"  # BIDS: same name, .json
    with pytest.raises(ValueError, match="alphanumeric"):
        bids_derivative_path(bids_root, "02", desc="tta-spread")
    description = json.loads(open(write_derivative_description(bids_root / "fresh", __version__)).read())
    assert "not acquired" in description["Description"] and "SHA-256" in description["Description"]
