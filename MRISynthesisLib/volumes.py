"""Volumes with geometry: reading, writing, validation and physical-space resampling.

A ``Volume`` is a 3D numpy array indexed (i, j, k) like the file's voxel axes, plus the
4x4 voxel-to-RAS affine (NIfTI convention, millimetres). NIfTI goes through nibabel
(.nii.gz (de)compressed in one call by ISA-L where python-isal is installed: ``_gzip``),
everything else (NRRD, MHA, ...) through SimpleITK, whose LPS geometry is converted. A
folder holding one DICOM series is read with SimpleITK's ImageSeriesReader (GDCM sorts
the slices by position), giving the grid the same series gives once converted to NIfTI.
"""

from __future__ import annotations

import contextlib
import locale
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Affines equal to this tolerance (mm, and direction cosines) count as the same grid.
GEOMETRY_ATOL = 1e-4
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray  # (I, J, K)
    affine: np.ndarray  # 4x4 voxel (i, j, k) -> RAS mm
    # What MRISynthesis made this volume from (MRISynthesisLib.provenance: a record of kind
    # "synthetic", "brain mask" or "uncertainty"); None for images read from files. Written
    # into the file's header and a JSON sidecar by ``save_volume``.
    provenance: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def shape(self):
        return self.array.shape

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def same_grid(self, other: "Volume") -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=GEOMETRY_ATOL)


def _in_memory_order(array: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``array`` viewed with the axes (and directions) of ``like`` reordered so that ``like``
    is walked in its memory order (a C-contiguous view when ``like`` is contiguous)."""
    flips = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in like.strides)
    axes = sorted(range(like.ndim), key=lambda i: -abs(like.strides[i]))
    return array[flips].transpose(axes)


def masked_values(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The values of ``array`` where ``mask`` is true, in the array's memory order: the
    same values as ``array[mask]`` (in another order; right for percentiles and sums).
    ``array[mask]`` walks a Fortran-ordered volume (NIfTI's order) against its memory
    layout: 46 ms for a 240x240x155 volume, against 3 ms this way."""
    if array.shape != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the array's {array.shape}")
    if mask.dtype != bool:  # an integer array would index, not mask
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    return _in_memory_order(array, array).ravel()[_in_memory_order(mask, array).ravel()]


def mask_bounding_box(mask: np.ndarray):
    """(first, last) index of the mask along each axis, or None for an empty mask; from
    the mask's projections (np.nonzero would list every voxel: 25x slower)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(i for i in range(mask.ndim) if i != axis)))
        if hit.size == 0:
            return None
        box.append((int(hit[0]), int(hit[-1])))
    return box


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _gzip():
    """The gzip codec for .nii.gz: python-isal's igzip (Intel ISA-L) where installed, the
    standard library's gzip otherwise (same format, same files). ISA-L compresses a
    240x240x155 float32 output at level 1 in 22 ms instead of 250 ms, and decompresses an
    input in 18 ms instead of 50 (docs/performance.md)."""
    try:
        from isal import igzip
    except ImportError:
        import gzip

        return gzip
    return igzip


def _is_gzipped_name(path: str) -> bool:
    return path.lower().endswith(".nii.gz")


def _load_nifti(path: str):
    """A NIfTI image read with nibabel; a .nii.gz is decompressed in one call (``_gzip``)
    rather than through nibabel's gzip stream, then parsed from memory."""
    import nibabel as nib

    if not _is_gzipped_name(path):
        return nib.load(path)  # memory-mapped
    with open(path, "rb") as f:
        data = _gzip().decompress(f.read())
    # sizeof_hdr, the first int32 (either byte order), says NIfTI-1 (348) or NIfTI-2 (540).
    sizes = {int.from_bytes(data[:4], order) for order in ("little", "big")}
    image_class = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if image_class is None:
        raise ValueError(f"not a NIfTI file (header size {sorted(sizes)}, expected 348 or 540)")
    return image_class.from_bytes(data)


def load_volume(path, name: str = "volume") -> Volume:
    """Read a 3D image file, or a folder holding one DICOM series; ``name`` (e.g. "t2") is
    used in error messages."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return validate_volume(load_dicom_series(path, name), name=f"{name} ({path})")
    if not os.path.isfile(path):
        raise InputError(f"{name}: file not found: {path}")
    try:
        if is_nifti(path):
            img = _load_nifti(path)
            array = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            import SimpleITK as sitk

            image = sitk.ReadImage(path)
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"{name}: {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume")
            array, affine = _array_affine_from_sitk(image)
    except InputError:
        raise
    except Exception as exc:  # nibabel/ITK raise many types for unreadable files
        raise InputError(f"{name}: cannot read {path}: {exc}") from exc
    return validate_volume(Volume(array, affine), name=f"{name} ({path})")


DICOM_SERIES_DESCRIPTION = "0008|103e"


@contextlib.contextmanager
def keep_locale():
    """Restore the process locale afterwards: GDCM (SimpleITK's DICOM IO) sets it to "C",
    which would make every later text open() in this process ASCII-only."""
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def dicom_series(folder) -> dict:
    """{series instance UID: [file names in slice order]} of the DICOM series in ``folder``
    (not its sub-folders)."""
    import SimpleITK as sitk

    folder = os.fspath(folder)
    with keep_locale():
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def _series_description(first_file: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        with keep_locale():
            reader.ReadImageInformation()
        if reader.HasMetaDataKey(DICOM_SERIES_DESCRIPTION):
            return reader.GetMetaData(DICOM_SERIES_DESCRIPTION).strip() or "no description"
    except RuntimeError:
        pass
    return "no description"


def load_dicom_series(folder, name: str = "volume") -> Volume:
    """The one DICOM series in ``folder`` as a Volume. No series, or several (listed with
    their SeriesDescription and file counts), is an InputError."""
    import SimpleITK as sitk

    folder = os.fspath(folder)
    series = dicom_series(folder)
    if not series:
        raise InputError(f"{name}: folder {folder} holds no DICOM series (expected the .dcm files of one series)")
    if len(series) > 1:
        listing = "; ".join(f"'{_series_description(files[0])}' ({len(files)} files, UID {uid})"
                            for uid, files in sorted(series.items()))
        raise InputError(f"{name}: folder {folder} holds {len(series)} DICOM series ({listing}); "
                         "put the wanted series in a folder of its own")
    (files,) = series.values()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with keep_locale():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{name}: cannot read the DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: the DICOM series in {folder} is not a 3D scalar volume")
    return volume_from_sitk(image)


def save_volume(volume: Volume, path, sidecar: bool = True) -> None:
    """Write NIfTI (.nii/.nii.gz) with nibabel, any other extension ITK knows with SimpleITK.
    A volume that MRISynthesis made (``volume.provenance``) is marked: NIfTI descrip,
    intent_name and the record in a header extension, NRRD/MHA ``MRISynthesis.*`` keys,
    and (``sidecar``) a JSON sidecar beside it (MRISynthesisLib.provenance)."""
    save_volumes([(volume, path)], sidecars=sidecar)


def save_volumes(items, sidecars: bool = True) -> None:
    """Write several ``(volume, path)`` at once, all or nothing: every file (volumes and
    their sidecars) is first written next to its target under a temporary name, then all
    are renamed; a failure leaves none of them. uint8/bool arrays are written as uint8
    (masks), everything else as float32."""
    staged = []  # (temporary, final)
    try:
        for volume, path in items:
            path = os.fspath(path)
            tmp = _temporary_name(path)
            staged.append((tmp, path))
            _write_volume(volume, tmp, path)
            if sidecars and volume.provenance is not None:
                from .provenance import sidecar_path, sidecar_text

                final = sidecar_path(path)
                tmp = _temporary_name(final)
                staged.append((tmp, final))
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(sidecar_text(volume.provenance))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _temporary_name(path: str) -> str:
    # Next to the target, same suffix (so the writers pick the same format), then renamed:
    # a failed write never leaves a half file at ``path``.
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{os.getpid()}-{base}")


def _write_volume(volume: Volume, tmp: str, path: str) -> None:
    """Write ``volume`` to ``tmp`` in the format of ``path``'s suffix, with its provenance marks."""
    array = np.asarray(volume.array)
    array = array.astype(np.uint8) if array.dtype in (np.bool_, np.uint8) else array.astype(np.float32, copy=False)
    record = volume.provenance
    if is_nifti(path):
        import nibabel as nib

        img = nib.Nifti1Image(array, volume.affine)
        img.set_qform(volume.affine, code=1)
        img.set_sform(volume.affine, code=1)
        if record is not None:
            from .provenance import NIFTI_COMMENT_EXTENSION, nifti_descrip, nifti_intent_name, record_json

            img.header["descrip"] = nifti_descrip(record).encode("ascii")
            img.header.set_intent(0, (), name=nifti_intent_name(record))
            img.header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_COMMENT_EXTENSION,
                                                                    record_json(record).encode("ascii")))
        if _is_gzipped_name(path):
            with open(tmp, "wb") as f:  # level 1, nibabel's own default for .nii.gz
                f.write(_gzip().compress(img.to_bytes(), compresslevel=1))
        else:
            nib.save(img, tmp)
    else:
        import SimpleITK as sitk

        image = volume_to_sitk(Volume(array, volume.affine))
        if record is not None:
            from .provenance import header_keys

            for key, value in header_keys(record).items():
                image.SetMetaData(key, value)
        sitk.WriteImage(image, tmp, True)


def check_not_constant(volume: Volume, name: str = "volume") -> None:
    """Refuse a volume with one value everywhere (an export error, a blank series): it holds
    no image, and brain extraction or normalisation would fail later with their own words."""
    array = np.asarray(volume.array)
    first = array.flat[0]
    if not np.any(array != first):
        raise InputError(f"{name}: the input is constant (every voxel is {float(first):g}): not an image; "
                         "check the file")


def validate_volume(volume: Volume, name: str = "volume") -> Volume:
    """Refuse what cannot be a 3D scalar MRI: wrong dimensionality, NaN/inf, all zero."""
    array = np.asarray(volume.array)
    # A trailing singleton time axis (X, Y, Z, 1) is still one 3D volume.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got {array.ndim}D with shape {array.shape}")
    if min(array.shape) < 1:
        raise InputError(f"{name}: empty volume with shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{name}: unsupported voxel type {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name}: contains NaN or infinite values ({int(np.sum(~np.isfinite(array)))} voxels)")
    if not np.any(array):
        raise InputError(f"{name}: all voxels are zero")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{name}: invalid voxel-to-world matrix")
    return Volume(array, affine)


# ----------------------------------------------------------------------------- ITK


def _array_affine_from_sitk(image):
    import SimpleITK as sitk

    array = np.asarray(sitk.GetArrayFromImage(image), dtype=np.float32).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FROM_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_FROM_RAS @ origin
    return array, affine


def volume_to_sitk(volume: Volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
    spacing = volume.spacing
    lps = _LPS_FROM_RAS @ volume.affine[:3, :]
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:, 3]])
    return image


def volume_from_sitk(image) -> Volume:
    return Volume(*_array_affine_from_sitk(image))


def _world_corners(volume: Volume) -> np.ndarray:
    i, j, k = (np.array([-0.5, n - 0.5]) for n in volume.shape)
    corners = np.array([[a, b, c, 1.0] for a in i for b in j for c in k])
    return (volume.affine @ corners.T).T[:, :3]


def fields_of_view_overlap(a: Volume, b: Volume) -> bool:
    """True if the physical bounding boxes of the two voxel grids intersect."""
    ca, cb = _world_corners(a), _world_corners(b)
    return bool(np.all(ca.min(0) < cb.max(0)) and np.all(cb.min(0) < ca.max(0)))


def resample_to_reference(moving: Volume, reference: Volume, name: str = "volume",
                          interpolation: str = "linear") -> Volume:
    """Resample ``moving`` onto ``reference``'s grid in physical space (outside -> 0)."""
    import SimpleITK as sitk

    if not fields_of_view_overlap(moving, reference):
        raise InputError(f"{name}: its field of view does not overlap the reference volume; "
                         "inputs must be co-registered scans of the same head")
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    out = sitk.Resample(volume_to_sitk(moving), volume_to_sitk(reference), sitk.Transform(), interp, 0.0,
                        sitk.sitkFloat32)
    result = volume_from_sitk(out)
    return Volume(result.array, reference.affine.copy())


def align_to_reference(volumes: dict, reference_name: str) -> dict:
    """Return ``volumes`` with every volume on the reference grid, resampling (with a warning)
    those on another grid."""
    reference = volumes[reference_name]
    aligned = {}
    for name, vol in volumes.items():
        if name == reference_name or vol.same_grid(reference):
            aligned[name] = vol if name == reference_name else Volume(vol.array, reference.affine.copy())
            continue
        if not fields_of_view_overlap(vol, reference):
            raise InputError(f"{name}: its field of view does not overlap {reference_name}'s; "
                             "inputs must be co-registered scans of the same head")
        message = (f"{name} is on a different grid than {reference_name} (shape {vol.shape} vs "
                   f"{reference.shape}, or another position/orientation); resampling it onto "
                   f"{reference_name} in physical space")
        log.warning(message)
        warnings.warn(message, stacklevel=2)
        aligned[name] = resample_to_reference(vol, reference, name=name)
    return aligned
