import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from MRISynthesisLib.bundle import FORMAT_VERSION, ModelBundle, load_bundle, save_bundle
from MRISynthesisLib.errors import BundleError
from MRISynthesisLib.networks import ModelConfig

from conftest import make_bundle


def test_roundtrip_preserves_everything(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors", sources=("t1", "t2", "t1c"), width=4, laf_grid=4)
    bundle = load_bundle(path)
    assert bundle.sources == ("t1", "t2", "t1c") and bundle.target == "flair"
    assert bundle.model == ModelConfig(num_sources=3, base_width=4, laf_grid=4)
    assert bundle.format_version == FORMAT_VERSION and len(bundle.sha256) == 64
    assert bundle.provenance["note"] == "randomly initialised test bundle"
    net = bundle.build_generator()
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, bundle.state_dict[key])
    assert "t1 + t2 + t1c -> flair" in bundle.describe()


def test_half_precision_bundle_is_smaller_and_loads(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors", width=8)
    bundle = load_bundle(path)
    save_bundle(bundle, tmp_path / "half.safetensors", half_precision=True)
    half = load_bundle(tmp_path / "half.safetensors")
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * path.stat().st_size
    net = half.build_generator()
    assert next(net.parameters()).dtype == torch.float32


def test_missing_file(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(path)


def test_wrong_format(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a bundle" * 10)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(BundleError, match="not an MRISynthesis model bundle"):
        load_bundle(plain)


def test_corrupted_weights_fail_digest(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 mismatch"):
        load_bundle(path)


def _rewrite_metadata(path, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    change(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def test_modified_metadata_fails_digest(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors")

    def change(meta):
        info = json.loads(meta["mrisynthesis_bundle"])
        info["sources"] = ["t1", "t1c"]
        meta["mrisynthesis_bundle"] = json.dumps(info, sort_keys=True)

    _rewrite_metadata(path, change)
    with pytest.raises(BundleError, match="SHA-256 mismatch"):
        load_bundle(path)


def test_future_format_version_is_refused(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors")
    bundle = load_bundle(path)
    bundle.format_version = FORMAT_VERSION + 1
    save_bundle(bundle, path)
    with pytest.raises(BundleError, match="format version"):
        load_bundle(path)


def test_weights_not_matching_architecture(tmp_path):
    path = make_bundle(tmp_path / "m.safetensors", width=4)
    bundle = load_bundle(path)
    wrong = ModelBundle(model=ModelConfig(num_sources=2, base_width=8), sources=bundle.sources,
                        target="flair", preprocessing=bundle.preprocessing, state_dict=bundle.state_dict)
    save_bundle(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(BundleError, match="shape"):
        load_bundle(tmp_path / "wrong.safetensors").build_generator()


def test_sources_must_match_model():
    with pytest.raises(BundleError, match="takes 2"):
        ModelBundle(model=ModelConfig(num_sources=2), sources=("t1",), target="flair",
                    preprocessing=None, state_dict={})
    with pytest.raises(BundleError, match="unknown modality"):
        ModelBundle(model=ModelConfig(num_sources=1), sources=("pd",), target="flair",
                    preprocessing=None, state_dict={})


def test_models_registry_suffix_matches_bundle_format():
    # models.py keeps its own copy so that listing models never imports torch.
    from MRISynthesisLib import bundle, models

    assert models.BUNDLE_SUFFIX == bundle.BUNDLE_SUFFIX
