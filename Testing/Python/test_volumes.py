"""Volume files and array helpers: the .nii.gz codec, masked values and bounding boxes."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from MRISynthesisLib import volumes
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.volumes import Volume, load_volume, mask_bounding_box, masked_values, save_volume

AFFINE = np.array([[-0.9, 0, 0, 90], [0, 1.1, 0, -120], [0, 0, 2.0, -60], [0, 0, 0, 1]])


def _layouts(array):
    """The same values in the layouts volumes arrive in: C, Fortran (NIfTI), flipped, permuted."""
    yield "C", np.ascontiguousarray(array)
    yield "F", np.asfortranarray(array)
    yield "flipped", np.asfortranarray(array)[::-1, :, ::-1]
    yield "permuted", np.asfortranarray(array.transpose(2, 0, 1)).transpose(1, 2, 0)


@pytest.mark.parametrize("mask_layout", ["C", "F", "flipped", "permuted"])
def test_masked_values_are_the_values_inside_the_mask_in_any_layout(mask_layout):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(7, 9, 5)).astype(np.float32)
    base_mask = rng.random((7, 9, 5)) > 0.6
    mask = dict(_layouts(base_mask))[mask_layout]
    for layout, array in _layouts(base):
        expected = np.sort(np.ascontiguousarray(array)[np.ascontiguousarray(mask)])
        got = masked_values(array, mask)
        assert np.array_equal(np.sort(got), expected), (layout, mask_layout)
    with pytest.raises(ValueError, match="shape"):
        masked_values(base, base_mask[:, :, :4])
    with pytest.raises(ValueError, match="boolean"):
        masked_values(base, base_mask.astype(np.uint8))


def test_mask_bounding_box_matches_nonzero():
    mask = np.zeros((10, 12, 8), bool)
    assert mask_bounding_box(mask) is None
    mask[2, 3, 1] = mask[6, 10, 5] = True
    idx = np.nonzero(mask)
    assert mask_bounding_box(mask) == [(int(i.min()), int(i.max())) for i in idx]


@pytest.mark.parametrize("codec", ["isal", "standard gzip"])
@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_nifti_gz_reads_as_nibabel_does(tmp_path, monkeypatch, codec, image_class):
    """Scaled int16 data (as scanners write it), NIfTI-1 and -2, with and without isal."""
    if codec == "standard gzip":
        monkeypatch.setattr(volumes, "_gzip", lambda: gzip)
    else:
        pytest.importorskip("isal")
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 3000, size=(6, 7, 5)).astype(np.int16)
    img = image_class(raw, AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "t2.nii.gz"
    nib.save(img, path)
    expected = nib.load(path)
    volume = load_volume(path, "t2")
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array, np.asarray(expected.dataobj, dtype=np.float32))
    assert np.allclose(volume.affine, expected.affine)
    assert np.array_equal(volume.array, raw * 0.5 + 10.0)


@pytest.mark.parametrize("codec", ["isal", "standard gzip"])
def test_saved_nifti_gz_is_standard_gzip_nibabel_reads(tmp_path, monkeypatch, codec):
    if codec == "standard gzip":
        monkeypatch.setattr(volumes, "_gzip", lambda: gzip)
    else:
        pytest.importorskip("isal")
    array = np.random.default_rng(2).random((8, 6, 4)).astype(np.float32)
    path = tmp_path / "out.nii.gz"
    save_volume(Volume(np.asfortranarray(array), AFFINE), path)
    with gzip.open(path) as f:  # the standard library reads it
        assert len(f.read()) > array.nbytes
    back = nib.load(path)
    assert np.array_equal(np.asarray(back.dataobj), array)
    assert np.allclose(back.affine, AFFINE)
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temporary left


def test_unreadable_nifti_gz_names_the_input(tmp_path):
    not_gzip = tmp_path / "a.nii.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"^t2: cannot read .*a\.nii\.gz"):
        load_volume(not_gzip, "t2")
    not_nifti = tmp_path / "b.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"x" * 400))
    with pytest.raises(InputError, match=r"^t1c: cannot read .*b\.nii\.gz: not a NIfTI file"):
        load_volume(not_nifti, "t1c")
