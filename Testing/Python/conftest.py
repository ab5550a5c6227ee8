"""Shared fixtures: small generated volumes, tiny random bundles, the real-data folder."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from MRISynthesisLib.bundle import bundle_from_generator, save_bundle  # noqa: E402
from MRISynthesisLib.networks import ModelConfig, build_generator, init_weights  # noqa: E402
from MRISynthesisLib.volumes import Volume, save_volume  # noqa: E402

DATA_ENV = "MRISYNTHESIS_DATA"


@pytest.fixture
def one_thread():
    # Two shared cores: more threads than free cores makes torch many times slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def data_dir():
    """The real-data folder, or None."""
    path = os.environ.get(DATA_ENV)
    return Path(path) if path and Path(path).is_dir() else None


@pytest.fixture
def real_data():
    path = data_dir()
    if path is None:
        pytest.skip(f"real data not available: set {DATA_ENV} to the shared data folder "
                    f"(currently {os.environ.get(DATA_ENV)!r})")
    return path


def make_bundle(path, sources=("t1", "t2"), width=4, architecture="fdgan", seed=0, **config):
    torch.manual_seed(seed)
    cfg = ModelConfig(architecture=architecture, num_sources=len(sources), base_width=width, **config)
    bundle = bundle_from_generator(init_weights(build_generator(cfg)), cfg, sources,
                                   provenance={"note": "randomly initialised test bundle"})
    save_bundle(bundle, path)
    return Path(path)


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_bundle(tmp_path / "tiny.safetensors")


def head_phantom(shape=(40, 48, 24), seed=0, affine=None):
    """A blurred ellipsoid 'brain' with a few intensity structures and exact-zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.85, 0.9])[:, None, None, None]) ** 2).sum(0))
    brain = r < 1
    values = (300 + 200 * np.cos(3 * grid[0]) + 100 * grid[2] + rng.normal(0, 10, shape)) * brain
    if affine is None:
        affine = np.diag([1.1, 0.9, 2.0, 1.0])
        affine[:3, 3] = [-20, -25, -20]
    return Volume(values.astype(np.float32), np.asarray(affine, dtype=float))


@pytest.fixture
def subject_files(tmp_path):
    """t1/t2/t1c/flair NIfTI files of a small phantom on one oblique grid."""
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, -1.0, 2.5])  # LPS-like storage, anisotropic
    affine[:3, 3] = [30, 20, -30]
    files = {}
    for i, name in enumerate(("t1", "t2", "t1c", "flair")):
        vol = head_phantom(seed=i, affine=affine)
        vol.array *= (1.0 + 0.5 * i)
        files[name] = tmp_path / f"{name}.nii.gz"
        save_volume(vol, files[name])
    return files


def pid_alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by its parent, is not): for the tests that
    check by process id that no process of a run is left."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pids, limit=10.0):
    """Wait until none of ``pids`` runs (fails after ``limit`` seconds)."""
    import time

    end = time.monotonic() + limit
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < end, f"processes still alive: {[p for p in pids if pid_alive(p)]}"
        time.sleep(0.02)
