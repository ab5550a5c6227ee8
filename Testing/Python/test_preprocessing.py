import numpy as np
import pytest
import torch
from nibabel import orientations

from MRISynthesisLib.errors import InputError
from MRISynthesisLib.preprocessing import (HISTOGRAM_PERCENTILES, AxialReorientation, PreprocessingConfig,
                                           SliceResizer, SliceStack, histogram_landmarks, normalize_intensity,
                                           select_middle_slices, to_output_scale)

CFG = PreprocessingConfig()


def test_normalisation_maps_brain_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[5:15, 5:15, 5:15] = rng.uniform(100, 1100, (10, 10, 10))
    out = normalize_intensity(vol, None, CFG)
    inside = vol != 0
    lo, hi = np.percentile(vol[inside], [0.5, 99.5])
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    assert np.all(out[~inside] == -1.0)
    v = vol[7, 7, 7]
    assert out[7, 7, 7] == pytest.approx(np.clip((v - lo) / (hi - lo) * 2 - 1, -1, 1), abs=1e-5)


def test_normalisation_is_scale_and_offset_invariant():
    rng = np.random.default_rng(1)
    vol = np.zeros((16, 16, 16), np.float32)
    vol[3:13, 3:13, 3:13] = rng.uniform(1, 2, (10, 10, 10))
    mask = vol != 0
    a = normalize_intensity(vol, mask, CFG)
    b = normalize_intensity(vol * 37.0 - 5.0, mask, CFG)  # raw scanner scale with negatives
    assert np.allclose(a, b, atol=1e-5)


def test_normalisation_uses_mask_and_refuses_constant():
    vol = np.full((10, 10, 10), 50.0, np.float32)  # not skull-stripped: no zero background
    mask = np.zeros(vol.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    vol[mask] = np.linspace(100, 200, mask.sum())
    out = normalize_intensity(vol, mask, CFG)
    assert np.all(out[~mask] == -1.0) and out[mask].max() == 1.0
    with pytest.raises(InputError, match="constant intensity"):
        normalize_intensity(np.ones((4, 4, 4), np.float32), None, CFG)


def test_output_scale():
    assert to_output_scale(np.array([-1.0, 0.0, 1.0]), CFG).tolist() == [0.0, 500.0, 1000.0]


AFFINES = {
    "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0, 1.0]),
    # stored coronal: voxel axes (i, j, k) = (R, S, P)
    "coronal": np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
    # stored sagittal with anisotropic voxels: (i, j, k) = (A, S, L)
    "sagittal": np.array([[0, 0, -2.0, 0], [0.9, 0, 0, 0], [0, 1.1, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", AFFINES)
def test_axial_slices_are_truly_axial_and_invertible(name):
    affine = AFFINES[name]
    shape = (6, 7, 8)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    height = world[..., 2].astype(np.float32)  # the superior coordinate of every voxel
    reo = AxialReorientation(affine)
    ras = reo.forward(height)
    for k in range(ras.shape[2]):  # each axial slice has one S coordinate
        assert np.ptp(ras[:, :, k]) == 0
    assert np.all(np.diff(ras[0, 0, :]) > 0)  # inferior -> superior
    right = (ijk @ affine[:3, :3].T)[..., 0]
    assert np.all(np.diff(reo.forward(right)[:, 0, 0]) > 0)  # left -> right along X
    assert np.array_equal(reo.inverse(ras), height)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert sorted(reo.ras_spacing) == sorted(spacing)
    assert orientations.aff2axcodes(affine) is not None


@pytest.mark.parametrize("shape,spacing", [((240, 240), (1.0, 1.0)), ((182, 218), (1.0, 1.0)),
                                           ((334, 352), (0.72, 0.72)), ((256, 256), (0.9375, 0.9375)),
                                           ((100, 60), (1.0, 2.0))])
def test_resizer_roundtrip(shape, spacing):
    resizer = SliceResizer(shape, spacing, CFG)
    x = torch.full((2, 1, *shape), -1.0)
    x[:, :, shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] = 1.0
    y = resizer.forward(x)
    assert y.shape == (2, 1, 256, 256)
    back = resizer.inverse(y)
    assert back.shape == x.shape
    assert (back - x).abs().mean() < 0.1
    # padding is background and the square field of view keeps the aspect ratio
    assert y[0, 0, 0, 0] == -1.0
    fov = max(shape[0] * spacing[0], shape[1] * spacing[1], CFG.min_field_of_view_mm)
    pixel_mm = fov / 256
    extent_x = (y[0, 0, :, 128] > 0).sum().item() * pixel_mm
    assert extent_x == pytest.approx(shape[0] * spacing[0] / 2, rel=0.05, abs=2 * pixel_mm)


def test_slice_stack_skips_slices_without_brain():
    vol = np.zeros((30, 30, 12), np.float32)
    vol[5:25, 5:25, 3:9] = np.random.default_rng(0).uniform(1, 2, (20, 20, 6))
    stack = SliceStack([vol, vol * 2], np.eye(4), CFG, names=["t1", "t2"])
    assert stack.brain_slices.tolist() == [3, 4, 5, 6, 7, 8]
    batch = stack.batch([3, 4])
    assert batch.shape == (2, 2, 256, 256) and batch.min() >= -1 and batch.max() <= 1
    out = stack.empty_output()
    stack.put(out, [3, 4], torch.ones(2, 1, 256, 256))
    stack.release_channels()  # what synthesize does once the network is done: finishing still works
    with pytest.raises(RuntimeError, match="released"):
        stack.batch([3])
    assert stack.num_slices == 12 and stack.empty_output().shape == vol.shape
    final = stack.finish(out)
    assert final.shape == vol.shape
    assert np.all(final[:, :, :3] == 0) and np.all(final[vol == 0] == 0)
    assert np.allclose(final[10, 10, 3:5], 1000.0)


def test_select_middle_slices():
    assert select_middle_slices(np.arange(10, 110), 80).tolist() == list(range(20, 100))
    assert select_middle_slices(np.arange(5), 80).tolist() == list(range(5))


def test_median_reference_is_robust_to_a_large_bright_lesion():
    """A lesion covering 20% of the brain shifts the percentile window, so normal brain
    comes out darker; the median reference moves it about a third as much."""
    rng = np.random.default_rng(2)
    vol = np.zeros((30, 30, 30), np.float32)
    vol[3:27, 3:27, 3:27] = rng.normal(100, 8, (24, 24, 24))
    vol[3:27, 3:6, 3:27] = rng.normal(20, 3, (24, 3, 24))  # FLAIR-dark CSF, an eighth of the brain
    lesioned = vol.copy()
    lesioned[3:27, 6:27, 3:8] = rng.normal(180, 10, (24, 21, 5))
    normal = np.zeros(vol.shape, bool)
    normal[3:27, 3:27, 10:27] = True
    median = PreprocessingConfig(intensity_reference="median")
    shift = {}
    for name, config in (("percentile", CFG), ("median", median)):
        shift[name] = abs(normalize_intensity(lesioned, None, config)[normal].mean()
                          - normalize_intensity(vol, None, config)[normal].mean())
    assert shift["percentile"] > 0.3 and shift["median"] < shift["percentile"] / 3, shift
    out = normalize_intensity(lesioned, None, median)
    assert out[5, 10, 5] < 0.9  # headroom: the lesion (1.8x normal brain) is not clipped
    assert PreprocessingConfig.from_dict({"lower_percentile": 0.5}).intensity_reference == "percentile"
    with pytest.raises(ValueError, match="intensity_reference"):
        PreprocessingConfig(intensity_reference="mode")


def test_slice_stack_context_brings_neighbours_and_repeats_the_ends():
    rng = np.random.default_rng(0)
    arrays = [rng.random((20, 20, 10)).astype(np.float32) + 1 for _ in range(2)]
    stack = SliceStack(arrays, np.eye(4), CFG)
    flat = stack.batch([0, 5, 9])
    ctx = stack.batch([0, 5, 9], context=1)
    assert ctx.shape == (3, 6) + flat.shape[2:]
    assert torch.equal(ctx[:, [1, 4]], flat)  # centre channels = the 2D batch
    assert torch.equal(ctx[1, 0], stack.batch([4])[0, 0]) and torch.equal(ctx[1, 5], stack.batch([6])[0, 1])
    assert torch.equal(ctx[0, 0], ctx[0, 1]) and torch.equal(ctx[2, 5], ctx[2, 4])  # ends repeat
    # the resize's vector path differs with the batch size on one thread: one float32 ulp
    assert torch.allclose(stack.batch([5], channels=[1], context=1)[0], ctx[1, 3:], rtol=0, atol=1e-6)


def _gradient(a):
    a = a[0, 0].double()
    return ((a[1:, :-1] - a[:-1, :-1]) ** 2 + (a[:-1, 1:] - a[:-1, :-1]) ** 2).sqrt().mean().item()


def test_resizer_inverse_keeps_detail_and_filters_only_strong_reductions():
    """A 240 -> 256 -> 240 round trip keeps more of a fine texture's gradient (0.77; the
    old bilinear, antialiased inverse kept 0.65), while a grid much coarser than the
    network's is filtered rather than aliased."""
    texture = torch.nn.functional.avg_pool2d(torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 240, 240))),
                                             3, 1, 1).float()
    resizer = SliceResizer((240, 240), (1.0, 1.0), CFG)
    back = resizer.inverse(resizer.forward(texture, fill=0.0))
    assert _gradient(back) / _gradient(texture) > 0.72
    coarse = SliceResizer((100, 100), (2.4, 2.4), CFG)
    i = torch.arange(256)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).float()[None, None]
    assert coarse.inverse(checker).abs().mean() < 0.1


def test_bicubic_resize_keeps_more_detail_and_the_range():
    texture = torch.nn.functional.avg_pool2d(torch.from_numpy(np.random.default_rng(1).normal(size=(1, 1, 240, 240))),
                                             3, 1, 1).float().clamp(-1, 1)
    texture[..., :20, :] = -1.0  # background beside signal: bicubic overshoots there
    ratios = {}
    for mode in ("bilinear", "bicubic"):
        resizer = SliceResizer((240, 240), (1.0, 1.0), PreprocessingConfig(resize_interpolation=mode))
        up = resizer.forward(texture, fill=-1.0)
        assert up.min() >= -1.0 and up.max() <= 1.0
        ratios[mode] = _gradient(resizer.inverse(up)) / _gradient(texture)
    assert ratios["bicubic"] > ratios["bilinear"] + 0.05
    assert PreprocessingConfig.from_dict({}).resize_interpolation == "bilinear"  # bundles made before the setting
    with pytest.raises(ValueError, match="resize_interpolation"):
        PreprocessingConfig(resize_interpolation="nearest")


def test_a_256_mm_field_of_view_passes_one_mm_slices_to_the_network_unresampled():
    texture = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, size=(1, 1, 240, 200))).float()
    native = SliceResizer((240, 200), (1.0, 1.0), PreprocessingConfig(min_field_of_view_mm=256.0,
                                                                      resize_interpolation="bicubic"))
    up = native.forward(texture, fill=-1.0)
    assert up.shape[-2:] == (256, 256)
    assert torch.equal(up[..., 8:248, 28:228], texture)  # only padded, centred
    assert torch.equal(native.inverse(up), texture)  # the round trip loses nothing
    resized = SliceResizer((240, 200), (1.0, 1.0), PreprocessingConfig(resize_interpolation="bicubic"))
    assert not torch.allclose(resized.inverse(resized.forward(texture)), texture, atol=0.05)  # 240 mm: resampled
    # A larger field of view is still resized down onto the grid, at the same scale for any spacing.
    assert SliceResizer((300, 300), (1.0, 1.0), PreprocessingConfig(min_field_of_view_mm=256.0)).padded == (300, 300)
    assert SliceResizer((240, 240), (0.5, 0.5), PreprocessingConfig(min_field_of_view_mm=256.0)).padded == (512, 512)
    with pytest.raises(ValueError, match="min_field_of_view_mm"):
        PreprocessingConfig(min_field_of_view_mm=0.0)


def _tissue_volume(contrast, seed=0):
    """A brain of CSF, grey and white matter whose grey/white contrast is scaled by
    ``contrast`` (as an old scanner's T1; not an affine change, which normalisation alone
    undoes), plus a bright lesion."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((24, 24, 24), np.float32)
    brain = np.zeros(vol.shape, bool)
    brain[2:22, 2:22, 2:22] = True
    labels = rng.choice(3, size=vol.shape, p=[0.15, 0.4, 0.45])  # CSF, grey, white
    means = np.array([300.0, 900.0 - contrast * 300.0, 900.0])
    vol[brain] = means[labels[brain]] + rng.normal(0, 20, brain.sum())
    vol[10:13, 10:13, 10:13] = 1300.0
    return vol, brain


def test_histogram_standardisation_maps_a_low_contrast_scan_onto_the_landmarks():
    """Landmarks of a typical scan; a half-contrast scan standardised onto them has the
    typical scan's landmarks (piecewise linear: exactly at the landmarks), while without
    landmarks normalisation is unchanged to the bit."""
    median = PreprocessingConfig(intensity_reference="median")
    typical, brain = _tissue_volume(1.0)
    flat, _ = _tissue_volume(0.5, seed=1)
    target = histogram_landmarks(typical, brain, median)
    assert len(target) == len(HISTOGRAM_PERCENTILES) and np.all(np.diff(target) > 0)
    own = histogram_landmarks(flat, brain, median)
    assert np.abs(own - target).max() > 0.3  # the white matter sits lower in the window
    config = PreprocessingConfig(intensity_reference="median", histogram_landmarks={"t1": target.tolist()})
    out = normalize_intensity(flat, brain, config, "t1", landmarks=config.landmarks_for("t1"))
    got = np.percentile(out[brain], HISTOGRAM_PERCENTILES)
    assert np.allclose(got, np.clip(target, -1, 1), atol=0.02), (got, target)
    # monotonic: the lesion stays the brightest tissue, CSF the darkest
    order = np.argsort(flat[brain], kind="stable")
    assert np.all(np.diff(out[brain][order]) >= -1e-6)
    assert out[11, 11, 11] > np.percentile(out[brain], 98)
    assert np.all(out[~brain] == -1.0)
    assert np.array_equal(normalize_intensity(flat, brain, config, "t1"), normalize_intensity(flat, brain, median, "t1"))
    # a scan already at the landmarks is left as it is
    same = normalize_intensity(typical, brain, config, "t1", landmarks=config.landmarks_for("t1"))
    assert np.allclose(same, normalize_intensity(typical, brain, median, "t1"), atol=1e-4)


def test_slice_stack_standardises_only_the_modalities_with_landmarks():
    median = PreprocessingConfig(intensity_reference="median")
    typical, brain = _tissue_volume(1.0)
    flat, _ = _tissue_volume(0.5, seed=1)
    config = PreprocessingConfig(intensity_reference="median",
                                 histogram_landmarks={"t1": histogram_landmarks(typical, brain, median).tolist()})
    affine = np.eye(4)
    plain = SliceStack([flat, flat], affine, median, mask=brain)
    stack = SliceStack([flat, flat], affine, config, mask=brain, modalities=["t1", "t2"])
    assert np.array_equal(stack.channels[1], plain.channels[1])  # no T2 landmarks: as before
    assert not np.allclose(stack.channels[0], plain.channels[0], atol=0.05)
    assert np.array_equal(SliceStack([flat], affine, config, mask=brain).channels, plain.channels[:1])


def test_histogram_landmarks_round_trip_and_validation():
    values = np.linspace(-0.8, 0.4, len(HISTOGRAM_PERCENTILES)).tolist()
    config = PreprocessingConfig(intensity_reference="median", histogram_landmarks={"t1": values})
    again = PreprocessingConfig.from_dict(config.to_dict())
    assert again == config and again.landmarks_for("t1").tolist() == pytest.approx(values)
    assert again.landmarks_for("t2") is None and "T1 histogram standardised" in again.window_text()
    assert "histogram_landmarks" not in PreprocessingConfig().to_dict()  # older bundles' keys unchanged
    with pytest.raises(ValueError, match="increase strictly"):
        PreprocessingConfig(histogram_landmarks={"t1": values[::-1]})
    with pytest.raises(ValueError, match="expected 13"):
        PreprocessingConfig(histogram_landmarks={"t1": values[:5]})
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:8, 2:8, 2:8] = 5.0
    vol[2:4, 2:8, 2:8] = 1.0  # two values: no histogram to map
    with pytest.raises(InputError, match="t1: too few distinct intensities"):
        normalize_intensity(vol, None, config, "t1", landmarks=config.landmarks_for("t1"))
