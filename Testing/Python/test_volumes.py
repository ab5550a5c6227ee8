"""Array helpers of volumes: masked values and bounding boxes."""

import numpy as np
import pytest

from MRISynthesisLib.volumes import mask_bounding_box, masked_values


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


def test_mask_bounding_box_matches_nonzero():
    mask = np.zeros((10, 12, 8), bool)
    assert mask_bounding_box(mask) is None
    mask[2, 3, 1] = mask[6, 10, 5] = True
    idx = np.nonzero(mask)
    assert mask_bounding_box(mask) == [(int(i.min()), int(i.max())) for i in idx]
