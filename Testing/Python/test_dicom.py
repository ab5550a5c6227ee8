"""DICOM series folders as inputs: geometry equal to the same series as NIfTI, clear errors."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from MRISynthesisLib.cli import main
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.volumes import Volume, keep_locale, load_volume, resample_to_reference, volume_to_sitk

from conftest import data_dir, head_phantom

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1.1"


def write_dicom_series(volume: Volume, folder, description: str, series_number: int = 1):
    """Write ``volume`` (rounded to int16) as an MR DICOM series, one file per slice, the
    way SimpleITK's series-writing example does it."""
    os.makedirs(folder, exist_ok=True)
    image = volume_to_sitk(Volume(np.round(volume.array).astype(np.int16), volume.affine))
    d = image.GetDirection()
    uid = f"{STUDY_UID}.{series_number}"
    common = {
        "0008|0060": "MR", "0008|0008": "ORIGINAL\\PRIMARY", "0008|103e": description,
        "0020|000d": STUDY_UID, "0020|000e": uid, "0020|0011": str(series_number),
        "0010|0010": "Phantom^Test", "0010|0020": "TEST",
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with keep_locale():
        _write_slices(writer, image, common, uid, folder, series_number)


def _write_slices(writer, image, common, uid, folder, series_number):
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        for tag, value in common.items():
            slice_image.SetMetaData(tag, value)
        slice_image.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(os.path.join(os.fspath(folder), f"{series_number:02d}_{k:04d}.dcm"))
        writer.Execute(slice_image)


def _as_nifti_by_itk(folder, tmp_path) -> Volume:
    """The series converted to NIfTI by SimpleITK and read back: the reference geometry."""
    reader = sitk.ImageSeriesReader()
    with keep_locale():
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image = reader.Execute()
    path = tmp_path / "converted.nii.gz"
    sitk.WriteImage(image, str(path))
    return load_volume(path)


def _oblique_phantom():
    theta = np.deg2rad(12)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                               [0, 0, 1]]) @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-20, -30, -35]
    return head_phantom((40, 48, 12), 0, affine)


def test_series_geometry_equals_nifti_conversion(tmp_path):
    volume = _oblique_phantom()
    write_dicom_series(volume, tmp_path / "t1", "T1 oblique")
    read = load_volume(tmp_path / "t1", "t1")
    nifti = _as_nifti_by_itk(tmp_path / "t1", tmp_path)
    assert read.shape == nifti.shape and np.allclose(read.affine, nifti.affine, atol=1e-4)
    assert np.array_equal(read.array, nifti.array)
    # ... and the same image in physical space as the volume written.
    assert np.allclose(read.affine, volume.affine, atol=1e-4)
    assert np.array_equal(read.array, np.round(volume.array))


def test_real_volume_round_trip(tmp_path):
    data = data_dir()
    if data is None or not (data / "ms-long-04a" / "t1.nii.gz").is_file():
        pytest.skip("real data not available: set MRISYNTHESIS_DATA to the shared data folder (needs ms-long-04a)")
    original = load_volume(data / "ms-long-04a" / "t1.nii.gz")
    write_dicom_series(original, tmp_path / "t1", "T1 SE 3mm")
    read = load_volume(tmp_path / "t1", "t1")
    nifti = _as_nifti_by_itk(tmp_path / "t1", tmp_path)
    assert read.shape == nifti.shape and np.allclose(read.affine, nifti.affine, atol=1e-4)
    assert np.array_equal(read.array, nifti.array)
    # Whatever order the slices come back in, they hold the original image where it was.
    back = resample_to_reference(read, original, interpolation="nearest")
    assert np.array_equal(back.array, np.round(original.array))


def test_several_series_are_listed_by_description(tmp_path):
    volume = _oblique_phantom()
    write_dicom_series(volume, tmp_path / "mixed", "T1 SE axial", series_number=1)
    write_dicom_series(volume, tmp_path / "mixed", "T2 TSE axial", series_number=2)
    with pytest.raises(InputError) as info:
        load_volume(tmp_path / "mixed", "t1")
    message = str(info.value)
    assert "2 DICOM series" in message and "T1 SE axial" in message and "T2 TSE axial" in message
    assert "\n" not in message


def test_reading_keeps_the_locale(tmp_path):
    import locale

    before = locale.setlocale(locale.LC_ALL, None)
    write_dicom_series(_oblique_phantom(), tmp_path / "t1", "T1")
    load_volume(tmp_path / "t1")
    with pytest.raises(InputError):
        load_volume(tmp_path, "t1")  # no series directly in tmp_path
    assert locale.setlocale(locale.LC_ALL, None) == before


def test_folder_without_series(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    for folder in ("empty", "notes"):
        with pytest.raises(InputError, match="holds no DICOM series"):
            load_volume(tmp_path / folder, "t1")


def test_cli_takes_dicom_folders(capsys, tmp_path, tiny_bundle):
    t1, t2 = _oblique_phantom(), head_phantom((40, 48, 12), 1, _oblique_phantom().affine)
    write_dicom_series(t1, tmp_path / "t1", "T1")
    write_dicom_series(t2, tmp_path / "t2", "T2")
    out = tmp_path / "flair.nii.gz"
    code = main(["predict", "--t1", str(tmp_path / "t1"), "--t2", str(tmp_path / "t2"), "--model", str(tiny_bundle),
                 "--brain-mask", "none", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    result, nifti = load_volume(out), _as_nifti_by_itk(tmp_path / "t1", tmp_path)
    assert result.shape == nifti.shape and np.allclose(result.affine, nifti.affine, atol=1e-4)

    (tmp_path / "none").mkdir()
    out2 = tmp_path / "flair2.nii.gz"
    code = main(["predict", "--t1", str(tmp_path / "none"), "--t2", str(tmp_path / "t2"), "--model",
                 str(tiny_bundle), "-o", str(out2)])
    err = capsys.readouterr().err
    assert code == 2 and "holds no DICOM series" in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()
