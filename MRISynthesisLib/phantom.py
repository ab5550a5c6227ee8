"""The demo's default case: multi-contrast brain MRI simulated from real anatomy.

Real patient scans cannot be shipped, so the demo builds its case at run time from the
ICBM 2009c nonlinear symmetric template (Fonov et al., NeuroImage 2011) that nilearn
ships inside its package (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a
_converted.nii.gz``; loaded with ``load_mni152_{template,gm_template,wm_template}``,
offline). Anatomy is real (an average of 152 brains), contrasts are simulated:

1. Tissue fractions per voxel. GM and WM are the template's probability maps; the brain
   mask is the non-zero region of the (already brain-extracted) T1 template with holes
   filled; CSF = mask - GM - WM (clipped to [0, 1]; GM + WM rescaled where they exceed 1).
2. Optional lesions: ``num_lesions`` smooth ellipsoidal white-matter hyperintensities
   (semi-axes 8-12 mm: confluent periventricular lesions, the size of a small tumour's
   oedema) in periventricular white matter, replacing WM. Their long T2 makes them
   bright on T2 and FLAIR, their long T1 slightly dark on T1.
3. Signal = sum over tissues of fraction x signal equation (partial-volume mixing of the
   signed signal, then magnitude), with relaxation at 3 T:

   | tissue | T1 (ms) | T2 (ms) | PD   | source |
   |--------|---------|---------|------|--------|
   | WM     | 1084    | 69      | 0.69 | T1/T2: Stanisz et al., MRM 2005 (3 T, frontal WM); PD: Neeb et al., NeuroImage 2006 |
   | GM     | 1820    | 99      | 0.80 | same (caudate/cortex GM) |
   | CSF    | 4200    | 2000    | 1.00 | order of values reported for CSF at 3 T (close to free water); FLAIR's TI is computed from it, so CSF is nulled whatever value is used |
   | lesion | 2100    | 170     | 0.85 | MS lesions / oedema at 3 T: T1 about 2x and T2 about 2.5x normal-appearing WM, more water; chosen so that the lesion-to-brain-median ratios match real scans (below) |

   Resulting contrasts (pure-tissue means, checked in the tests): FLAIR GM/WM 1.16 (grey
   matter slightly brighter, as in a real 3 T FLAIR), CSF/WM 0.06 (nulled), lesion/WM 1.7;
   T2 CSF > GM > WM; T1 WM > GM > CSF. (The previous values, Wansapura et al. 1999, gave
   a FLAIR GM/WM of 1.27.) Lesion mean / brain median, measured on the 1 mm phantom and on
   the real lesions of ``../shared/data`` (MS: ms-mni-07 and -19, ground-truth labels;
   tumour oedema: brats18-cbica-abm, label 2):

   | contrast | phantom | ms-mni-07 | ms-mni-19 | brats18-cbica-abm |
   |----------|---------|-----------|-----------|-------------------|
   | T1       | 0.95    | 0.94      | 0.81      | 1.03              |
   | T2       | 1.59    | 1.46      | 1.68      | 1.41              |
   | FLAIR    | 1.56    | 1.34      | 1.35      | 1.86              |

   (The lesion values before, T1 1500 / T2 140 / PD 0.80, gave 1.16 / 1.40 / 1.94: a lesion
   brighter than the brain on T1 and far brighter on FLAIR than in any real scan here.)

   Sequences (spin echo; ``SEQUENCES``):
   - T1w:   S = PD (1 - e^(-TR/T1)) e^(-TE/T2), TR 500 ms, TE 10 ms     (WM > GM > CSF)
   - T2w:   same equation, TR 5000 ms, TE 100 ms                        (CSF > GM > WM)
   - FLAIR: S = PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2), TR 9000, TE 120 ms,
            TI = T1_csf ln(2 / (1 + e^(-TR/T1_csf))) (about 2450 ms) nulls CSF (GM > WM > CSF)
   - T1c:   the T1w sequence after gadolinium: 1/T1 += r1 C with r1 = 4.5 /s/mM (order of
            gadoterate/gadobutrol at 3 T, Rohrer et al., Invest Radiol 2005). The blood-brain
            barrier keeps the agent out of normal parenchyma; it enhances a thin patchy
            layer of pial vessels at the brain surface (C = 0.3 mM voxel average) and, with
            ``enhancing_lesions``, the lesions (C = 0.5 mM).
4. Rician noise: magnitude of (S + n1 + i n2), n ~ N(0, sigma), sigma = ``noise`` x the
   99th brain percentile of the noiseless image (default 2 %, i.e. BrainWeb-like), from
   a generator seeded with ``seed``; then everything outside the brain mask is set to 0
   (skull-stripped, as the shipped models expect). Each contrast is scaled so that its
   noiseless 99th brain percentile is 1000; T1c keeps T1's scale, so enhancement shows.

Everything is deterministic for a given seed and resolution. The volumes carry the
template's affine (1 mm, RAS, MNI space) or, with ``resolution`` > 1, the block-averaged
grid (fractions averaged over resolution^3 blocks, the affine scaled accordingly).

    >>> from MRISynthesisLib.phantom import make_phantom, save_phantom
    >>> case = make_phantom(seed=0)
    >>> case.volumes["flair"].array.shape, case.mask.affine
    >>> save_phantom(case, "phantom/")        # t1/t2/t1c/flair/mask/lesion .nii.gz
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .errors import InputError
from .volumes import Volume, save_volume

MODALITIES = ("t1", "t2", "t1c", "flair")


@dataclass(frozen=True)
class Tissue:
    t1: float  # ms
    t2: float  # ms
    pd: float  # relative proton density (water = 1)


TISSUES = {
    "wm": Tissue(1084.0, 69.0, 0.69),
    "gm": Tissue(1820.0, 99.0, 0.80),
    "csf": Tissue(4200.0, 2000.0, 1.00),
    "lesion": Tissue(2100.0, 170.0, 0.85),
}

# TR/TE/TI in ms; TI None = spin echo; "flair" TI is computed to null CSF.
SEQUENCES = {
    "t1": {"tr": 500.0, "te": 10.0, "ti": None},
    "t2": {"tr": 5000.0, "te": 100.0, "ti": None},
    "flair": {"tr": 9000.0, "te": 120.0, "ti": "null_csf"},
    "t1c": {"tr": 500.0, "te": 10.0, "ti": None},
}
LESION_RADII_MM = (8.0, 12.0)  # semi-axes of the ellipsoids, drawn uniformly
GADOLINIUM_R1 = 4.5  # /s/mM
VESSEL_CONCENTRATION = 0.3  # mM averaged over a voxel of the enhancing surface layer
LESION_CONCENTRATION = 0.5  # mM, with enhancing_lesions
OUTPUT_SCALE = 1000.0  # noiseless 99th brain percentile of each contrast -> about this


@dataclass
class Phantom:
    volumes: Dict[str, Volume]  # "t1", "t2", "t1c", "flair", skull-stripped, one grid
    mask: Volume  # 1 inside the brain
    lesion: Volume  # lesion fraction in [0, 1] (all zero without lesions)
    fractions: Dict[str, np.ndarray] = field(repr=False)  # "gm", "wm", "csf", "lesion"
    parameters: dict = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.mask.affine


def flair_null_ti(tr: float, t1_csf: float) -> float:
    """Inversion time (ms) that nulls a tissue of T1 ``t1_csf`` for repetition time ``tr``."""
    return t1_csf * math.log(2.0 / (1.0 + math.exp(-tr / t1_csf)))


def signal(tissue: Tissue, sequence: dict, r1_extra: float = 0.0, t1_csf: Optional[float] = None):
    """Signed signal of one tissue (arrays broadcast: ``r1_extra`` in 1/ms may be an array)."""
    r1 = 1.0 / tissue.t1 + r1_extra
    tr, te, ti = sequence["tr"], sequence["te"], sequence["ti"]
    transverse = tissue.pd * math.exp(-te / tissue.t2)
    if ti is None:
        return transverse * (1.0 - np.exp(-tr * r1))
    if ti == "null_csf":
        ti = flair_null_ti(tr, t1_csf or TISSUES["csf"].t1)
    return transverse * (1.0 - 2.0 * np.exp(-ti * r1) + np.exp(-tr * r1))


def _load_template():
    """(t1, gm, wm, affine) of the ICBM152 2009 template shipped inside nilearn, 1 mm."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise InputError("the demo's default case needs nilearn (pip install nilearn), which ships the "
                         "ICBM152 template it is built from; or pass your own subject folder") from exc
    imgs = [datasets.load_mni152_template(resolution=1), datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1)]
    arrays = [np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32) for img in imgs]
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs[0].affine, dtype=np.float64)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    shape = [n // factor for n in array.shape]
    a = array[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return a.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def _downsample_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * factor
    # The centre of block 0 is voxel (factor - 1) / 2 of the fine grid.
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + affine[:3, 3]
    return out


def _smooth_noise(shape, rng, sigma_vox: float) -> np.ndarray:
    from scipy import ndimage

    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field_ / (field_.std() + 1e-12)


def _place_lesions(wm, csf, mask, spacing, rng, count):
    """Lesion fraction map: smooth ellipsoids centred in periventricular deep WM."""
    from scipy import ndimage

    lesion = np.zeros(wm.shape, dtype=np.float32)
    if count <= 0:
        return lesion
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    ventricles = (csf > 0.9) & (depth > 15.0)  # deep CSF = ventricles, not sulci
    if not ventricles.any():
        ventricles = csf > 0.9
    to_ventricle = ndimage.distance_transform_edt(~ventricles, sampling=spacing)
    candidates = np.argwhere((wm > 0.95) & (to_ventricle > 4.0) & (to_ventricle < 12.0))
    if candidates.size == 0:
        candidates = np.argwhere(wm > 0.9)
    centres = []
    for _ in range(count):
        for _attempt in range(50):  # keep lesions apart so each one is visible
            centre = candidates[rng.integers(len(candidates))]
            if all(np.linalg.norm((centre - c) * spacing) > 2 * LESION_RADII_MM[1] for c in centres):
                break
        centres.append(centre)
        radii = rng.uniform(*LESION_RADII_MM, size=3)
        # Work in a box around the lesion; r = 1 on the ellipsoid surface.
        half = np.ceil((radii + 2.0) / spacing).astype(int)
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, wm.shape)
        axes = [(np.arange(lo[a], hi[a]) - centre[a]) * spacing[a] / radii[a] for a in range(3)]
        r = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
        # About 1 mm wide edge so the lesion has partial volume like a real one.
        blob = np.clip(0.5 + (1.0 - r) * radii.min(), 0.0, 1.0)
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        lesion[box] = np.maximum(lesion[box], blob)
    return np.clip(lesion, 0.0, 1.0) * (wm > 0.5)


def make_phantom(seed: int = 0, num_lesions: int = 3, noise: float = 0.02, resolution: int = 1,
                 enhancing_vessels: bool = True, enhancing_lesions: bool = False) -> Phantom:
    """Simulate skull-stripped T1, T2, T1c and FLAIR of the ICBM152 brain (see module doc).

    seed: noise, lesion positions and vessel pattern; num_lesions: 0 for a healthy brain;
    noise: Rician sigma as a fraction of the brain's bright end (0 = noiseless);
    resolution: voxel size in mm (integer; 2 is eight times smaller, for quick runs).
    """
    from scipy import ndimage

    if int(resolution) != resolution or resolution < 1:
        raise InputError(f"phantom resolution must be a positive integer number of mm, got {resolution}")
    if noise < 0:
        raise InputError(f"phantom noise must be >= 0, got {noise}")
    if num_lesions < 0:
        raise InputError(f"number of lesions must be >= 0, got {num_lesions}")
    resolution = int(resolution)
    rng = np.random.default_rng(seed)
    lesion_rng, vessel_rng, noise_rng = rng.spawn(3)

    t1_template, gm, wm, affine = _load_template()
    mask_fine = ndimage.binary_fill_holes(t1_template > 0)
    if resolution > 1:
        # Averaging fractions over blocks is exact partial-volume downsampling.
        gm, wm = _block_mean(gm * mask_fine, resolution), _block_mean(wm * mask_fine, resolution)
        mask = _block_mean(mask_fine.astype(np.float32), resolution) >= 0.5
        affine = _downsample_affine(affine, resolution)
    else:
        mask = mask_fine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)

    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask

    lesion = _place_lesions(wm, csf, mask, spacing, lesion_rng, num_lesions)
    lesion = lesion * wm  # the lesion replaces white matter, voxel by voxel
    wm = wm - lesion
    fractions = {"gm": gm.astype(np.float32), "wm": wm.astype(np.float32),
                 "csf": csf.astype(np.float32), "lesion": lesion.astype(np.float32)}

    # Gadolinium concentration (mM): patchy pial vessels in the outer ~2 mm of the brain.
    concentration = np.zeros(mask.shape, dtype=np.float32)
    if enhancing_vessels:
        depth = ndimage.distance_transform_edt(mask, sampling=spacing)
        shell = (depth > 0) & (depth <= 2.0)
        patches = _smooth_noise(mask.shape, vessel_rng, 2.0 / resolution) > 1.7  # ~0.3 % of the brain
        concentration[shell & patches] = VESSEL_CONCENTRATION
    lesion_concentration = LESION_CONCENTRATION if enhancing_lesions else 0.0
    r1_per_ms = GADOLINIUM_R1 / 1000.0  # /s/mM -> /ms/mM

    volumes, scales = {}, {}
    t1_csf = TISSUES["csf"].t1
    for name in MODALITIES:
        seq = SEQUENCES[name]
        s = np.zeros(mask.shape, dtype=np.float64)
        for tissue, frac in fractions.items():
            extra = 0.0
            if name == "t1c":
                extra = r1_per_ms * (concentration + (lesion_concentration if tissue == "lesion" else 0.0))
            s += frac * signal(TISSUES[tissue], seq, extra, t1_csf)
        s = np.abs(s)
        # T1c keeps T1's scale (MODALITIES lists t1 first) so that only the enhancement differs.
        scales[name] = scales["t1"] if name == "t1c" else OUTPUT_SCALE / np.percentile(s[mask], 99)
        s *= scales[name]
        if noise > 0:
            sigma = noise * OUTPUT_SCALE
            n1 = noise_rng.standard_normal(s.shape) * sigma
            n2 = noise_rng.standard_normal(s.shape) * sigma
            s = np.sqrt((s + n1) ** 2 + n2 ** 2)
        s[~mask] = 0.0
        volumes[name] = Volume(s.astype(np.float32), affine.copy())

    parameters = {
        "template": "ICBM 2009c nonlinear symmetric (nilearn), GM/WM probability maps",
        "seed": int(seed), "num_lesions": int(num_lesions), "noise": float(noise),
        "resolution_mm": resolution, "enhancing_vessels": bool(enhancing_vessels),
        "enhancing_lesions": bool(enhancing_lesions),
        "tissues_3T": {k: vars(v) for k, v in TISSUES.items()},
        "sequences_ms": {k: dict(v, ti=flair_null_ti(v["tr"], t1_csf) if v["ti"] == "null_csf" else v["ti"])
                         for k, v in SEQUENCES.items()},
        "gadolinium_r1_per_s_per_mM": GADOLINIUM_R1,
    }
    return Phantom(volumes=volumes, mask=Volume(mask.astype(np.float32), affine.copy()),
                   lesion=Volume(lesion.astype(np.float32), affine.copy()), fractions=fractions,
                   parameters=parameters)


def save_phantom(phantom: Phantom, folder, names=MODALITIES) -> Dict[str, str]:
    """Write ``<name>.nii.gz`` for the chosen contrasts plus mask and lesion; returns paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    items = [(n, phantom.volumes[n]) for n in names] + [("mask", phantom.mask), ("lesion", phantom.lesion)]
    for name, volume in items:
        paths[name] = os.path.join(os.fspath(folder), f"{name}.nii.gz")
        save_volume(volume, paths[name])
    return paths
