import math

import numpy as np
import pytest

from MRISynthesisLib.metrics import aggregate, nrmse, psnr, slice_metrics, ssim, subject_metrics


def test_psnr_by_hand():
    real = np.array([[0.0, 2.0], [4.0, 4.0]])
    fake = np.array([[1.0, 2.0], [4.0, 2.0]])
    # MSE = (1 + 0 + 0 + 4) / 4 = 1.25, MAX = 4
    assert psnr(real, fake) == pytest.approx(10 * math.log10(16 / 1.25))
    mask = np.array([[False, True], [True, True]])
    # masked: MSE = 4 / 3, MAX = 4
    assert psnr(real, fake, mask) == pytest.approx(10 * math.log10(16 / (4 / 3)))
    assert psnr(real, real) == math.inf


def test_nrmse_by_hand():
    real = np.array([[3.0, 4.0]])
    fake = np.array([[3.0, 0.0]])
    assert nrmse(real, fake) == pytest.approx(math.sqrt(16 / 25))
    assert nrmse(real, fake, np.array([[True, False]])) == 0.0


def test_ssim_identity_and_constant_shift():
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 1, (32, 32))
    assert ssim(real, real) == pytest.approx(1.0)
    # A constant image c against a constant image d (no variance): SSIM reduces to the
    # luminance term (2 c d + C1) / (c^2 + d^2 + C1), C1 = (0.01 L)^2, L = data range.
    a, b = np.full((16, 16), 2.0), np.full((16, 16), 1.0)
    a[0, 0] = 0.0  # data range L = 2 of the real image
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 2 * 1 + c1) / (4 + 1 + c1)
    center = np.zeros_like(a, bool)
    center[8:12, 8:12] = True  # windows away from the one different pixel
    assert ssim(a, b, center) == pytest.approx(expected, rel=1e-6)
    assert ssim(real, 1 - real) < 0


def test_subject_aggregation():
    real = np.stack([np.full((8, 8), 2.0), np.full((8, 8), 4.0), np.zeros((8, 8))])
    fake = real.copy()
    fake[0] -= 1.0  # NRMSE slice 0 = 1/2, slice 1 = 0; the empty slice is skipped
    res = subject_metrics(real, fake)
    assert res["num_slices"] == 2
    assert res["nrmse"] == pytest.approx(0.25)
    agg = aggregate([{"psnr": 20.0}, {"psnr": 24.0}])
    assert agg["psnr"]["mean"] == 22.0 and agg["psnr"]["std"] == pytest.approx(math.sqrt(8)) and agg["psnr"]["n"] == 2


def test_slice_metrics_masked_keys():
    real = np.random.default_rng(1).uniform(0, 1, (16, 16))
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    out = slice_metrics(real, real * 0.9, mask)
    assert set(out) == {"psnr", "ssim", "nrmse", "psnr_masked", "ssim_masked", "nrmse_masked"}
    assert out["nrmse"] == pytest.approx(0.1)
    assert out["nrmse_masked"] == pytest.approx(0.1)


def _lesion_case():
    brain = np.zeros((32, 32, 4), bool)
    brain[4:28, 4:28] = True
    lesion = np.zeros_like(brain)
    lesion[12:18, 12:18, 1:3] = True
    real = np.where(brain, 100.0, 0.0)
    real[lesion] = 200.0  # contrast (200 - 100) / 100 = 1
    return real, lesion, brain


def test_lesion_conspicuity_is_the_ratio_of_contrasts():
    from MRISynthesisLib.metrics import lesion_contrast, lesion_metrics

    real, lesion, brain = _lesion_case()
    assert lesion_contrast(real, lesion, brain) == pytest.approx(1.0)
    washed_out = real.copy()
    washed_out[lesion] = 150.0  # contrast 0.5
    m = lesion_metrics(real, washed_out, lesion, brain)
    assert m["lesion_conspicuity"] == pytest.approx(0.5)
    assert m["lesion_contrast_real"] == pytest.approx(1.0) and m["lesion_voxels"] == lesion.sum()
    assert m["psnr_lesion"] == pytest.approx(20 * np.log10(200 / 50))
    assert lesion_metrics(real, real, lesion, brain)["lesion_conspicuity"] == pytest.approx(1.0)
    # The rim next to the lesion is not "normal brain": a bright halo in it changes nothing.
    halo = real.copy()
    halo[11, 12:18, 1:3] = 180.0
    assert lesion_metrics(real, halo, lesion, brain)["lesion_conspicuity"] == pytest.approx(1.0)


def test_lesion_metrics_undefined_cases():
    from MRISynthesisLib.metrics import lesion_metrics

    real, lesion, brain = _lesion_case()
    assert lesion_metrics(real, real, np.zeros_like(lesion), brain) == {}
    flat = np.where(brain, 100.0, 0.0)  # lesion not hyperintense in the real image
    assert np.isnan(lesion_metrics(flat, real, lesion, brain)["lesion_conspicuity"])
    agg = aggregate([{"lesion_conspicuity": float("nan")}, {"lesion_conspicuity": 0.8}, {"lesion_conspicuity": 1.0}])
    assert agg["lesion_conspicuity"]["n"] == 2 and agg["lesion_conspicuity"]["mean"] == pytest.approx(0.9)


# --------------------------------------------------------------------- blur-sensitive figures

def _pattern():
    yy, xx = np.mgrid[0:37, 0:50].astype(np.float64)
    real = 500 + 300 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + 100 * (xx > 25)
    fake = 480 + 250 * np.sin(xx / 3.3) * np.cos(yy / 5.0) + 60 * (xx > 27)
    return real, fake


def test_gmsd_matches_piq():
    from MRISynthesisLib.metrics import gmsd

    real, fake = _pattern()
    # piq 0.8.0: float(piq.gmsd(t(fake), t(real), data_range=1000.0, reduction="none")) with
    # t = torch.from_numpy(a)[None, None], on these two images (odd size: piq pads, then pools).
    assert gmsd(real, fake, 1000.0) == pytest.approx(0.1496980868642529, rel=1e-9)
    assert gmsd(real, real, 1000.0) == 0.0
    try:
        import piq  # optional: compare live where it is installed
    except Exception:
        return
    import torch

    t = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    assert gmsd(real, fake, 1000.0) == pytest.approx(float(piq.gmsd(t(fake), t(real), data_range=1000.0,
                                                                    reduction="none")), rel=1e-9)


def test_gmsd_masked_ignores_outside():
    from MRISynthesisLib.metrics import gmsd

    real, fake = _pattern()
    mask = np.zeros(real.shape, bool)
    mask[4:30, 4:20] = True
    spoiled = fake.copy()
    # Beyond the reach of the pooled mask's Prewitt neighbourhood (one pooled pixel = 2 voxels).
    spoiled[:, 24:] = 0.0
    spoiled[34:, :] = 0.0
    assert gmsd(real, spoiled, 1000.0, mask) == pytest.approx(gmsd(real, fake, 1000.0, mask))
    assert gmsd(real, spoiled, 1000.0) > gmsd(real, fake, 1000.0)


def _brain_volume():
    rng = np.random.default_rng(3)
    zz, yy, xx = np.mgrid[0:6, 0:48, 0:48].astype(np.float64)
    real = 500 + 150 * np.sin(xx / 4.0 + zz) * np.cos(yy / 6.0) + 100 * (xx > 24) + rng.normal(0, 10, xx.shape)
    brain = np.zeros(real.shape, bool)
    brain[:, 6:42, 6:42] = True
    real[~brain] = 0.0
    return real, brain


def test_sharpness_identity_blur_and_scale():
    from scipy.ndimage import gaussian_filter

    from MRISynthesisLib.metrics import sharpness

    real, brain = _brain_volume()
    assert sharpness(real, real, brain) == pytest.approx(1.0)
    # Each volume is scaled to its own percentiles: an affine change of intensity is not blur.
    assert sharpness(real, 3 * real + 7, brain) == pytest.approx(1.0)
    blurred = np.stack([gaussian_filter(s, 1.0) for s in real])
    sharper = np.stack([gaussian_filter(s, 0.5) for s in real])
    s1, s05 = sharpness(real, blurred, brain), sharpness(real, sharper, brain)
    assert s1 < s05 < 1.0
    assert sharpness(real, real + np.random.default_rng(0).normal(0, 200, real.shape), brain) > 1.0
    assert math.isnan(sharpness(real, real, np.zeros_like(brain)))


def test_median_scaled_sharpness_is_not_set_by_lesion_brightness():
    from scipy.ndimage import gaussian_filter

    from MRISynthesisLib.metrics import sharpness, subject_metrics

    real, brain = _brain_volume()
    for scale in ("percentile", "median"):
        assert sharpness(real, real, brain, scale=scale) == pytest.approx(1.0)
        assert sharpness(real, 3 * real + 7, brain, scale=scale) == pytest.approx(1.0)
        blurred = np.stack([gaussian_filter(s, 1.0) for s in real])
        assert sharpness(real, blurred, brain, scale=scale) < 0.9
    # A bright band (6 % of the brain) in the rim that the 3-voxel erosion leaves out of the
    # gradient mean: the edges measured are the real ones, only the scale changes. It becomes
    # the 99.5th percentile and shrinks the percentile-scaled gradients, not the median-scaled.
    bright = real.copy()
    bright[:, 6:8, 6:42] = 3.0 * real[brain].max()
    by_percentile = sharpness(real, bright, brain)
    by_median = sharpness(real, bright, brain, scale="median")
    assert by_percentile < 0.8
    assert by_median == pytest.approx(1.0, abs=0.05)
    assert subject_metrics(real, bright, brain)["sharpness_median"] == pytest.approx(by_median)
    with pytest.raises(ValueError, match="unknown sharpness scale"):
        sharpness(real, real, brain, scale="max")


def test_spectral_ratios_tell_blur_from_a_checkerboard():
    from scipy.ndimage import gaussian_filter

    from MRISynthesisLib.metrics import spectral_ratios, subject_metrics

    rng = np.random.default_rng(5)
    real = np.stack([gaussian_filter(rng.normal(0, 100, (96, 96)), 0.7) + 500 for _ in range(4)])
    brain = np.zeros(real.shape, bool)
    brain[:, 8:88, 8:88] = True
    same = spectral_ratios(real, real, brain)
    assert same["spectrum_crops"] == 4
    for band in ("spectrum_low", "spectrum_mid", "spectrum_high", "spectrum_checkerboard"):
        assert same[band] == pytest.approx(1.0)
    blurred = spectral_ratios(real, np.stack([gaussian_filter(s, 1.5) for s in real]), brain)
    assert blurred["spectrum_high"] < 0.01 < blurred["spectrum_mid"] < blurred["spectrum_low"] <= 1.0
    # A period-2 checkerboard of 5 % of the texture's amplitude: invisible in the low and mid
    # bands, many times the real power where it lives.
    yy, xx = np.mgrid[0:96, 0:96]
    checkered = real + 5.0 * (-1.0) ** (xx + yy)
    checker = spectral_ratios(real, checkered, brain)
    assert checker["spectrum_low"] == pytest.approx(1.0, abs=0.01)
    assert checker["spectrum_mid"] == pytest.approx(1.0, abs=0.01)
    assert checker["spectrum_checkerboard"] > 5.0
    # Too little brain for a crop: undefined, not a number from the background.
    small = np.zeros_like(brain)
    small[:, 30:60, 30:60] = True
    none = spectral_ratios(real, real, small)
    assert none["spectrum_crops"] == 0 and math.isnan(none["spectrum_mid"])
    figures = subject_metrics(real, checkered, brain)
    assert figures["spectrum_checkerboard"] == pytest.approx(checker["spectrum_checkerboard"])


def test_scale_free_psnr_ignores_the_intensity_scale():
    real, brain = _brain_volume()
    noisy = real + np.random.default_rng(1).normal(0, 20, real.shape)
    a = subject_metrics(real, noisy, brain)
    b = subject_metrics(real, 0.5 * noisy + 100, brain)
    assert b["psnr_masked"] < a["psnr_masked"] - 3  # the plain brain PSNR is hurt by the scale
    assert b["psnr_masked_scale_free"] == pytest.approx(a["psnr_masked_scale_free"], abs=1e-6)
    # The line is the least-squares one: it can only lower the pooled brain error.
    from MRISynthesisLib.metrics import scale_free_fit

    assert scale_free_fit(real, 0.5 * real + 100, brain) == pytest.approx((2.0, -200.0), rel=1e-9)
    slope, offset = scale_free_fit(real, 0.5 * noisy + 100, brain)
    fitted = slope * (0.5 * noisy + 100) + offset
    assert np.mean((fitted - real)[brain] ** 2) <= np.mean((noisy - real)[brain] ** 2) + 1e-9
    assert {"sharpness", "gmsd", "gmsd_masked"} <= set(a)


def test_blanked_brain_counts_tissue_drawn_black_and_not_dark_csf():
    from MRISynthesisLib.metrics import blanked_brain

    real, brain = _brain_volume()  # tissue at 200-850 inside the brain
    real[:, 10:14, 10:14] = 0.0  # a dark (CSF-like) pocket in the real image
    assert blanked_brain(real, real, brain) == 0.0
    fake = real.copy()
    fake[:, 6:24, 6:42] = 0.0  # the front half of the brain rendered black
    front = brain[:, 6:24, 6:42].sum() - 6 * 16  # less the pocket, black in both
    assert blanked_brain(real, fake, brain) == pytest.approx(100.0 * front / brain.sum(), rel=0.02)
    # Blur or a dimmer image is not blanking; NaN without brain.
    assert blanked_brain(real, 0.7 * real + 50, brain) == 0.0
    assert math.isnan(blanked_brain(real, fake, np.zeros_like(brain)))
    # It is one of the subject figures.
    assert subject_metrics(real, fake, brain)["blanked_brain"] == pytest.approx(blanked_brain(real, fake, brain))
