"""training/recipe.py: weighted L1, gradient-difference loss, feature matching and augmentation."""

import pytest
import torch

from training import recipe


def test_weighted_l1_down_weights_background():
    pred = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0  # error 1 in the top half
    brain = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    brain[..., :2, :] = True  # ... which is the brain
    assert float(recipe.weighted_l1(pred, target, brain, 1.0)) == pytest.approx(0.5)
    assert float(recipe.weighted_l1(pred, target, brain, 0.0)) == pytest.approx(1.0)
    assert float(recipe.weighted_l1(pred, target, ~brain, 0.1)) == pytest.approx(0.8 / 8.8)


def test_weighted_l1_up_weights_lesions_and_the_training_step_reads_them_from_a_second_mask():
    pred = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[..., 0, :] = 1.0  # error 1 in the top row only
    brain = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    lesion = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    lesion[..., 0, :] = True  # ... which is the lesion
    assert float(recipe.weighted_l1(pred, target, brain, 1.0, lesion=lesion)) == pytest.approx(4 / 16)
    assert float(recipe.weighted_l1(pred, target, brain, 1.0, lesion=lesion, lesion_weight=4.0)) == pytest.approx(
        16 / 28)
    assert float(recipe.weighted_l1(pred, target, brain, 1.0, "sum", lesion, 4.0)) == pytest.approx(16.0)
    # The training step: the lesion map rides as a second channel of the brain mask.
    from contextlib import nullcontext

    from MRISynthesisLib.networks import ModelConfig, build_discriminator, build_generator, init_generator, init_weights
    from training.trainer import Objective, train_step

    x, y = torch.rand(2, 2, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1
    brain = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    spot = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    spot[..., 20:30, 20:30] = True

    def l1(masks, weight):
        torch.manual_seed(1)
        G = init_generator(build_generator(ModelConfig(num_sources=2, base_width=4, image_size=64)))
        D = init_weights(build_discriminator(2, 4))
        opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
        return float(train_step(G, D, D, opt_G, opt_D, x, y, masks, nullcontext, Objective(lesion_weight=weight))[3].detach())

    plain = l1(brain, 1.0)
    assert l1(torch.cat([brain, spot], 1), 1.0) == plain  # weight 1: the paper's L1, labels or not
    assert l1(torch.cat([brain, spot], 1), 5.0) != plain


def test_gradient_difference_sees_edges_not_offsets():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 4:] = 1.0
    assert float(recipe.gradient_difference(target + 0.3, target)) < 1e-6
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1, count_include_pad=False)
    assert float(recipe.gradient_difference(blurred, target)) > 0.01


def test_feature_matching_compares_the_discriminators_layers():
    from MRISynthesisLib.networks import build_discriminator, init_weights
    from training.trainer import Objective, train_step

    torch.manual_seed(0)
    D = init_weights(build_discriminator(2, 8)).eval()
    x, y = torch.rand(2, 2, 64, 64), torch.rand(2, 1, 64, 64)
    logits, features = D.forward_with_features(x, y)
    assert torch.equal(logits, D(x, y)) and len(features) == 4  # one per LeakyReLU
    assert float(recipe.feature_matching(features, features).detach()) == 0.0
    _, other = D.forward_with_features(x, y.flip(-1))
    fake = [f.detach().clone().requires_grad_(True) for f in other]
    loss = recipe.feature_matching(fake, features)
    loss.backward()
    assert float(loss.detach()) > 0 and all(f.grad is not None for f in fake)
    # In the training step it adds to G's loss and nothing to D's.
    from MRISynthesisLib.networks import ModelConfig, build_generator, init_generator
    from contextlib import nullcontext

    def step(fm):
        torch.manual_seed(1)
        G = init_generator(build_generator(ModelConfig(num_sources=2, base_width=4, image_size=64)))
        D = init_weights(build_discriminator(2, 4))
        opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
        brain = torch.ones(2, 1, 64, 64, dtype=torch.bool)
        return train_step(G, D, D, opt_G, opt_D, x * 2 - 1, y * 2 - 1, brain, nullcontext, Objective(fm_weight=fm))

    plain, matched = step(0.0), step(10.0)
    plain, matched = [float(v.detach()) for v in plain], [float(v.detach()) for v in matched]
    assert plain[0] == matched[0]  # loss_D
    assert matched[1] > plain[1]  # loss_G gains the feature term


def test_augment_is_deterministic_bounded_and_keeps_background():
    torch.manual_seed(0)
    b, m, s = 3, 2, 64
    brain = torch.zeros(b, 1, s, s, dtype=torch.bool)
    brain[..., 16:48, 12:52] = True
    sources = torch.where(brain, torch.rand(b, m, s, s) * 2 - 1, torch.full((b, m, s, s), -1.0))
    target = torch.where(brain, torch.rand(b, 1, s, s) * 2 - 1, torch.full((b, 1, s, s), -1.0))
    first = recipe.augment(sources, target, brain, recipe.augment_generator(0, 1, 2))
    again = recipe.augment(sources, target, brain, recipe.augment_generator(0, 1, 2))
    other = recipe.augment(sources, target, brain, recipe.augment_generator(0, 1, 3))
    for a, b_ in zip(first, again):
        assert torch.equal(a, b_)
    assert not torch.equal(first[0], other[0])
    src, tgt, msk = first
    assert src.shape == sources.shape and tgt.shape == target.shape and msk.dtype == torch.bool
    assert src.min() >= -1 and src.max() <= 1 and tgt.min() >= -1 and tgt.max() <= 1
    assert torch.all(src[~msk.expand_as(src)] == -1.0)
    # A geometric transform, not a new image: the brain keeps about its area.
    assert abs(msk.float().sum() / brain.float().sum() - 1) < 0.35


def test_augment_moves_every_mask_with_the_brain():
    """A lesion map given as a second mask channel gets the brain's geometric transform,
    and the images come out as without it."""
    b, s = 2, 48
    brain = torch.zeros(b, 1, s, s, dtype=torch.bool)
    brain[..., 8:40, 6:42] = True
    lesion = torch.zeros(b, 1, s, s, dtype=torch.bool)
    lesion[..., 12:20, 10:30] = True
    sources = torch.where(brain, torch.rand(b, 2, s, s) * 2 - 1, torch.full((b, 2, s, s), -1.0))
    target = torch.where(brain, torch.rand(b, 1, s, s) * 2 - 1, torch.full((b, 1, s, s), -1.0))
    alone = recipe.augment(sources, target, brain, recipe.augment_generator(0, 2, 5))
    both = recipe.augment(sources, target, torch.cat([brain, lesion], 1), recipe.augment_generator(0, 2, 5))
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[1])
    assert both[2].shape == (b, 2, s, s) and torch.equal(both[2][:, :1], alone[2])
    as_brain = recipe.augment(sources, target, lesion, recipe.augment_generator(0, 2, 5))[2]
    assert torch.equal(both[2][:, 1:], as_brain) and not torch.equal(as_brain, lesion)


def test_augment_flip_only_mirrors():
    config = recipe.AugmentConfig(flip_probability=1.0, max_rotation_degrees=0, max_scale=0, max_gamma=0,
                                  max_intensity_scale=0, max_bias=0)
    brain = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    sources = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    src, tgt, _ = recipe.augment(sources, sources.clone(), brain, recipe.augment_generator(0, 0, 0), config)
    assert torch.allclose(src, sources.flip(-1), atol=1e-5) and torch.allclose(tgt, sources.flip(-1), atol=1e-5)


def test_augment_jitters_the_slices_of_one_source_alike():
    """2.5D input: a source's neighbouring slices get one intensity draw, so identical
    slices stay identical; different sources still get their own."""
    b, s = 2, 64
    brain = torch.zeros(b, 1, s, s, dtype=torch.bool)
    brain[..., 8:56, 8:56] = True
    one = torch.where(brain, torch.rand(b, 1, s, s) * 2 - 1, torch.full((b, 1, s, s), -1.0))
    sources = torch.cat([one] * 6, dim=1)  # two sources of three identical slices each
    src, _, _ = recipe.augment(sources, one, brain, recipe.augment_generator(0, 0, 0), slices_per_source=3)
    assert torch.equal(src[:, 0], src[:, 2]) and torch.equal(src[:, 3], src[:, 5])
    assert not torch.equal(src[:, 0], src[:, 3])
    # One slice per source draws exactly as before the option existed.
    two = torch.cat([one, one], dim=1)
    assert torch.equal(recipe.augment(two, one, brain, recipe.augment_generator(0, 0, 0))[0],
                       recipe.augment(two, one, brain, recipe.augment_generator(0, 0, 0), slices_per_source=1)[0])
    with pytest.raises(ValueError, match="whole groups"):
        recipe.augment(sources[:, :5], one, brain, recipe.augment_generator(0, 0, 0), slices_per_source=3)


def test_median_anchored_contrast_keeps_black_and_the_median_and_squeezes_tissue():
    brain = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    brain[..., 2:14, 2:14] = True
    unit = torch.where(brain, torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(1)), 0.0)
    unit[0, :, 2, 2] = 0.0  # a black voxel inside the brain
    out = recipe.median_anchored_contrast(unit, brain, torch.tensor([0.5, 2.0])[None, :, None, None])
    inside = brain.expand_as(unit)
    for c, squeezed in ((0, True), (1, False)):
        before, after = unit[0, c][inside[0, c]], out[0, c][inside[0, c]]
        assert after.min() == 0.0
        assert torch.isclose(after.median(), before.median(), atol=1e-6)
        iqr = [torch.quantile(v, 0.75) - torch.quantile(v, 0.25) for v in (before, after)]
        assert (iqr[1] < 0.8 * iqr[0]) if squeezed else (iqr[1] > 1.2 * iqr[0])
    # An image without brain passes through.
    empty = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    assert torch.equal(recipe.median_anchored_contrast(unit, empty, torch.full((1, 2, 1, 1), 0.5)), unit)


@pytest.mark.parametrize("option", [dict(max_contrast=0.7), dict(max_blur=1.5)])
def test_augment_intensity_options_are_drawn_only_when_on_and_change_only_sources(option):
    b, s = 2, 32
    brain = torch.zeros(b, 1, s, s, dtype=torch.bool)
    brain[..., 4:28, 4:28] = True
    sources = torch.where(brain, torch.rand(b, 2, s, s) * 2 - 1, torch.full((b, 2, s, s), -1.0))
    target = torch.where(brain, torch.rand(b, 1, s, s) * 2 - 1, torch.full((b, 1, s, s), -1.0))
    plain = recipe.augment(sources, target, brain, recipe.augment_generator(0, 0, 0))
    off = recipe.augment(sources, target, brain, recipe.augment_generator(0, 0, 0),
                         recipe.AugmentConfig(**{k: 0.0 for k in option}))
    on = recipe.augment(sources, target, brain, recipe.augment_generator(0, 0, 0), recipe.AugmentConfig(**option))
    assert all(torch.equal(x, y) for x, y in zip(plain, off))
    assert torch.equal(on[1], plain[1]) and torch.equal(on[2], plain[2])  # same geometry, same target
    assert not torch.equal(on[0], plain[0])
    assert on[0].min() >= -1 and on[0].max() <= 1 and torch.all(on[0][~on[2].expand_as(on[0])] == -1.0)


def test_blur_inside_smooths_the_brain_without_darkening_its_rim():
    brain = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    brain[..., 8:24, 8:24] = True
    flat = torch.where(brain, 0.6, 0.0).expand(1, 2, 32, 32).clone()
    out = recipe.blur_inside(flat, brain, torch.tensor([[1.5, 0.0]]))
    assert torch.allclose(out[brain.expand_as(out)], torch.tensor(0.6), atol=1e-5)  # no background bleeds in
    textured = torch.where(brain, torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(0)), 0.0)
    out = recipe.blur_inside(textured, brain, torch.tensor([[1.5, 0.0]]))
    assert torch.equal(out[:, 1], textured[:, 1])  # sigma 0: unchanged
    assert torch.equal(out[~brain.expand_as(out)], textured[~brain.expand_as(out)])
    grad = lambda x: (x[..., 9:23, 10:23] - x[..., 9:23, 9:22]).abs().mean()  # noqa: E731
    assert grad(out[:, 0]) < 0.5 * grad(textured[:, 0])
