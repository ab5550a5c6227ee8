"""Every output says it is synthetic and how it was made (MRISynthesisLib.provenance): the
command line and the Python API, round trips through the saved files read back with
nibabel, SimpleITK and plain json; `mrisynthesis info FILE`; a constant input refused by name."""

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MRISynthesisLib import __version__, provenance
from MRISynthesisLib.bundle import load_bundle
from MRISynthesisLib.cli import main
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.inference import synthesize, synthesize_with_details
from MRISynthesisLib.volumes import Volume, load_volume, save_volume

from conftest import head_phantom, make_bundle


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def error_line(capsys, *args):
    code, _, err = run(capsys, *args)
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("mrisynthesis: error:")]
    assert len(lines) == 1, err
    return lines[0]


def nifti_marks(path):
    header = nib.load(str(path)).header
    descrip = bytes(header["descrip"]).rstrip(b"\0").decode()
    intent = bytes(header["intent_name"]).rstrip(b"\0").decode()
    records = [json.loads(bytes(e.get_content())) for e in header.extensions if e.get_code() == 6]
    return descrip, intent, records


def test_predict_nifti_is_marked_with_sidecar_and_info_reads_it_back(capsys, tmp_path, subject_files, tiny_bundle):
    out = tmp_path / "flair_synth.nii.gz"
    code, stdout, err = run(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"],
                            "--model", tiny_bundle, "-o", out, "--brain-mask", "none", "--save-mask",
                            tmp_path / "mask.nii.gz")
    assert code == 0, err
    bundle = load_bundle(tiny_bundle)
    # The header, read by nibabel itself.
    descrip, intent, records = nifti_marks(out)
    assert descrip.startswith("MRISynthesis synthetic FLAIR") and f"v{__version__}" in descrip
    assert "tiny" in descrip and bundle.sha256[:12] in descrip and len(descrip.encode()) < 80
    assert intent == "synthetic FLAIR"
    assert len(records) == 1 and records[0]["Kind"] == "synthetic"
    # The sidecar, read as plain JSON.
    sidecar = tmp_path / "flair_synth.json"
    record = json.loads(sidecar.read_text())
    assert record == records[0]
    assert record["Synthetic"] is True and "not acquired" in record["Statement"]
    assert "Not for diagnosis on its own" in record["Statement"]
    assert record["Sources"] == [str(subject_files["t1"]), str(subject_files["t2"])]
    assert [(s["Modality"], s["Path"], s["SHA256"]) for s in record["SourceFiles"]] == [
        ("t1", str(subject_files["t1"]), sha256(subject_files["t1"])),
        ("t2", str(subject_files["t2"]), sha256(subject_files["t2"]))]
    generated = record["GeneratedBy"][0]
    assert generated["Name"] == "MRISynthesis" and generated["Version"] == __version__
    assert generated["Model"]["Name"] == "tiny" and generated["Model"]["SHA256"] == bundle.sha256
    assert record["BrainMask"]["Source"] == "none" and record["BrainMask"]["Description"].startswith("brain mask")
    assert record["Device"] == "cpu" and record["Precision"] in ("bf16", "fp32")
    assert "Uncertainty" not in record
    # The brain mask written beside it is marked as what it is.
    descrip, intent, (mask_record,) = nifti_marks(tmp_path / "mask.nii.gz")
    assert intent == "brain mask" and descrip.startswith("MRISynthesis brain mask")
    assert mask_record["Synthetic"] is False and json.loads((tmp_path / "mask.json").read_text()) == mask_record
    # The image itself is unchanged by the marks.
    assert np.allclose(load_volume(out).affine, load_volume(subject_files["t1"]).affine, atol=1e-5)
    # `mrisynthesis info` reads it back from the volume and from the sidecar.
    for path in (out, sidecar):
        code, stdout, _ = run(capsys, "info", path)
        assert code == 0
        assert "SYNTHETIC FLAIR" in stdout and "not acquired" in stdout and bundle.sha256 in stdout
        assert sha256(subject_files["t2"]) in stdout and "brain mask: none" in stdout
    code, stdout, _ = run(capsys, "info", out)
    assert "NIfTI header extension" in stdout and "JSON sidecar" in stdout
    # An acquired image carries none: said, with exit status 1.
    code, stdout, _ = run(capsys, "info", subject_files["t1"])
    assert code == 1 and "provenance:    none" in stdout


def test_nifti_marks_survive_without_the_sidecar(capsys, tmp_path, subject_files, tiny_bundle):
    out = tmp_path / "o.nii"
    assert run(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"], "--model", tiny_bundle,
               "-o", out, "--brain-mask", "none")[0] == 0
    os.remove(tmp_path / "o.json")  # the file travels alone (a PACS import, an e-mail)
    report = provenance.read_provenance(out)
    assert report.marked and report.sidecar is None and report.record["ImageType"] == "synthetic FLAIR"
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "SYNTHETIC FLAIR" in stdout


def test_predict_nrrd_has_header_keys_and_sidecar(capsys, tmp_path, subject_files, tiny_bundle):
    out = tmp_path / "o.nrrd"
    assert run(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"], "--model", tiny_bundle,
               "-o", out, "--brain-mask", "none")[0] == 0
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    keys = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    assert keys["MRISynthesis.Synthetic"] == "true" and keys["MRISynthesis.ImageType"] == "synthetic FLAIR"
    assert keys["MRISynthesis.Model"] == "tiny"
    assert keys["MRISynthesis.ModelSHA256"] == load_bundle(tiny_bundle).sha256
    assert "not acquired" in keys["MRISynthesis.Statement"]
    record = json.loads(keys["MRISynthesis.Provenance"])
    assert record == json.loads((tmp_path / "o.json").read_text())
    assert provenance.record_from_header_keys(keys) == record
    # The raw header holds them as NRRD key/value lines.
    with open(out, "rb") as f:
        head = f.read(20000)
    assert b"MRISynthesis.Synthetic:=true" in head
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "header keys MRISynthesis.*" in stdout


def test_every_output_file_is_checked_before_any_is_written(capsys, tmp_path, subject_files, tiny_bundle):
    base = ("predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"], "--model", tiny_bundle,
            "--brain-mask", "none")
    out = tmp_path / "o.nii.gz"
    # The sidecar counts as an output: an existing one is not overwritten without --overwrite.
    (tmp_path / "o.json").write_text("precious")
    assert "o.json exists; pass --overwrite" in error_line(capsys, *base, "-o", out)
    assert not out.exists() and (tmp_path / "o.json").read_text() == "precious"
    # So does the uncertainty map and its sidecar, checked before anything is written.
    (tmp_path / "u.json").write_text("precious")
    line = error_line(capsys, *base, "-o", tmp_path / "p.nii.gz", "--uncertainty", tmp_path / "u.nii.gz")
    assert "--uncertainty's sidecar" in line and "u.json exists" in line
    assert not (tmp_path / "p.nii.gz").exists() and not (tmp_path / "p.json").exists()
    # Two outputs whose sidecars would be one file.
    line = error_line(capsys, *base, "-o", tmp_path / "q.nii.gz", "--uncertainty", tmp_path / "q.nrrd")
    assert "would both write" in line and "q.json" in line
    assert "--uncertainty x.txt: unsupported extension" in error_line(capsys, *base, "-o", tmp_path / "r.nii.gz",
                                                                          "--uncertainty", "x.txt")
    assert sorted(os.listdir(tmp_path)) == sorted(["o.json", "u.json", "t1.nii.gz", "t2.nii.gz", "t1c.nii.gz",
                                                   "flair.nii.gz", "tiny.safetensors"])
    # With --overwrite all are replaced.
    code, _, err = run(capsys, *base, "-o", out, "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "o.json").read_text())["Kind"] == "synthetic"


def test_sidecar_of_an_input_is_not_overwritten(capsys, tmp_path, subject_files, tiny_bundle):
    """An input's own JSON sidecar (a BIDS T1w.json) is never replaced, even with --overwrite."""
    sidecar_input = tmp_path / "t1.json"
    sidecar_input.write_text("{}")
    for extra in ((), ("--overwrite",)):
        line = error_line(capsys, "predict", "--t1", subject_files["t1"], "--t2", subject_files["t2"], "--model",
                          tiny_bundle, "--brain-mask", "none", "-o", tmp_path / "out.nii.gz", "--save-mask",
                          tmp_path / "t1.nrrd", *extra)
        assert "t1.json" in line and "--t1 input's sidecar; refusing to overwrite an input" in line
    assert sidecar_input.read_text() == "{}" and not (tmp_path / "out.nii.gz").exists()


def test_python_api_marks_what_save_volume_writes(tmp_path, subject_files, tiny_bundle):
    flair = synthesize({"t1": str(subject_files["t1"]), "t2": str(subject_files["t2"])}, str(tiny_bundle),
                       mask="none", device="cpu")
    assert flair.provenance["Kind"] == "synthetic"
    save_volume(flair, tmp_path / "api.nii.gz")  # the README's two lines
    descrip, intent, (record,) = nifti_marks(tmp_path / "api.nii.gz")
    assert intent == "synthetic FLAIR" and record == json.loads((tmp_path / "api.json").read_text())
    assert record["SourceFiles"][0]["SHA256"] == sha256(subject_files["t1"])
    # A volume read back from the file is an image like any other: saved again it carries no
    # claim of its own (the record describes the file MRISynthesis wrote, not copies).
    again = load_volume(tmp_path / "api.nii.gz")
    assert again.provenance is None
    # sidecar=False writes only the volume (the header is still marked).
    save_volume(flair, tmp_path / "nosidecar.nii.gz", sidecar=False)
    assert not (tmp_path / "nosidecar.json").exists() and nifti_marks(tmp_path / "nosidecar.nii.gz")[1]


def test_in_memory_inputs_are_identified_by_their_voxels_and_files_can_be_attached(tmp_path, tiny_bundle):
    t1, t2 = head_phantom(seed=0), head_phantom(seed=1)
    result = synthesize_with_details({"t1": t1, "t2": t2}, str(tiny_bundle), mask="none", device="cpu")
    entries = result.provenance["SourceFiles"]
    assert [e["Path"] for e in entries] == [None, None]
    assert entries[0]["VoxelSHA256"] == provenance.voxel_sha256(t1) != entries[1]["VoxelSHA256"]
    assert result.provenance["Sources"][0] == f"voxels:t1:{entries[0]['VoxelSHA256']}"
    save_volume(t1, tmp_path / "t1.nii.gz")
    mask_file = tmp_path / "m.nii.gz"
    save_volume(Volume((t1.array > 0).astype(np.float32), t1.affine), mask_file)
    attached = provenance.attach_source_files(result.provenance, {"t1": tmp_path / "t1.nii.gz", "mask": mask_file})
    assert attached["SourceFiles"][0]["SHA256"] == sha256(tmp_path / "t1.nii.gz")
    assert attached["SourceFiles"][0]["VoxelSHA256"] == entries[0]["VoxelSHA256"]
    assert attached["Sources"][0] == str(tmp_path / "t1.nii.gz") and attached["Sources"][1].startswith("voxels:t2")
    assert attached["BrainMask"]["File"]["SHA256"] == sha256(mask_file)
    assert result.provenance["SourceFiles"][0]["Path"] is None  # the original is left as it was


def test_given_mask_file_is_named_in_the_record(tmp_path, subject_files, tiny_bundle):
    t1 = load_volume(subject_files["t1"])
    mask_file = tmp_path / "brainmask.nii.gz"
    save_volume(Volume((t1.array > 0).astype(np.float32), t1.affine), mask_file)
    result = synthesize_with_details({"t1": str(subject_files["t1"]), "t2": str(subject_files["t2"])},
                                     str(tiny_bundle), mask=str(mask_file), device="cpu")
    assert result.provenance["BrainMask"]["Source"] == "given"
    assert result.provenance["BrainMask"]["File"] == {"Path": str(mask_file), "SHA256": sha256(mask_file)}


def test_header_fields_fit_and_keys_round_trip(tmp_path):
    long_name = make_bundle(tmp_path / ("a_very_long_model_name_" * 6 + ".safetensors"))
    result = synthesize_with_details({"t1": head_phantom(seed=0), "t2": head_phantom(seed=1)}, str(long_name),
                                     mask="none", device="cpu")
    for kind in provenance.KINDS[:2]:
        record = provenance.record_for_kind(result.provenance, kind)
        descrip, intent = provenance.nifti_descrip(record), provenance.nifti_intent_name(record)
        assert len(descrip.encode("ascii")) < provenance.DESCRIP_BYTES and descrip.startswith("MRISynthesis ")
        assert result.provenance["GeneratedBy"][0]["Model"]["SHA256"][:12] in descrip  # the digest survives the cut
        assert len(intent.encode("ascii")) <= provenance.INTENT_NAME_BYTES
        keys = provenance.header_keys(record)
        assert all("\n" not in v and v.isascii() for v in keys.values())
        assert provenance.record_from_header_keys(keys) == record
    path = tmp_path / "long.nii.gz"
    save_volume(result.volume, path)  # nibabel refuses a descrip over 80 bytes: it was written
    assert nifti_marks(path)[0] == provenance.nifti_descrip(result.provenance)
    with pytest.raises(ValueError, match="no uncertainty map"):
        provenance.record_for_kind(result.provenance, provenance.KIND_UNCERTAINTY)
    assert provenance.record_from_header_keys({"MRISynthesis.Provenance": "{not json"}) is None
    assert provenance.sidecar_path("a/b.nii.gz") == "a/b.json" and provenance.sidecar_path("c.NRRD") == "c.json"


# ----------------------------------------------------------------------------- constant input


def test_constant_input_is_refused_by_name_before_brain_extraction(capsys, tmp_path, subject_files, tiny_bundle,
                                                                   monkeypatch):
    import MRISynthesisLib.brainmask as brainmask

    def no_extraction(*args, **kwargs):
        raise AssertionError("brain extraction was reached")

    monkeypatch.setattr(brainmask, "extract_brain", no_extraction)
    t1 = load_volume(subject_files["t1"])
    constant = tmp_path / "constant.nii.gz"
    save_volume(Volume(np.full(t1.shape, 100.0, np.float32), t1.affine), constant)
    out = tmp_path / "o.nii.gz"
    line = error_line(capsys, "predict", "--t1", constant, "--t2", subject_files["t2"], "--model", tiny_bundle,
                      "-o", out, "--brain-mask", "auto")
    assert "t1" in line and "the input is constant (every voxel is 100)" in line
    assert not out.exists() and not (tmp_path / "o.json").exists()
    line = error_line(capsys, "predict", "--t1", subject_files["t1"], "--t2", constant, "--model", tiny_bundle,
                      "-o", out, "--brain-mask", "none")
    assert "t2" in line and "constant" in line
    with pytest.raises(InputError, match=r"^t1: the input is constant \(every voxel is -3\.5\)"):
        synthesize({"t1": Volume(np.full(t1.shape, -3.5, np.float32), t1.affine), "t2": t1}, str(tiny_bundle))
    # Masks may be one value everywhere (a whole-field mask is a mask).
    result = synthesize_with_details({"t1": t1, "t2": load_volume(subject_files["t2"])}, str(tiny_bundle),
                                     mask=Volume(np.ones(t1.shape, np.float32), t1.affine))
    assert result.mask_decision.source == "given"


def test_write_sidecar_for_other_writers(tmp_path, tiny_bundle):
    """A volume saved by another writer (Slicer's storage node) gets the same sidecar."""
    result = synthesize_with_details({"t1": head_phantom(seed=0), "t2": head_phantom(seed=1)}, str(tiny_bundle),
                                     mask="none", device="cpu")
    path = provenance.write_sidecar(result.provenance, tmp_path / "saved by slicer.nrrd")
    assert path == str(tmp_path / "saved by slicer.json")
    assert json.loads(open(path).read()) == result.provenance
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved by slicer.json", "tiny.safetensors"]  # no temporary
