import pytest
import torch

from MRISynthesisLib.networks import (LAF_GRIDS, AdaptiveInstanceNorm2d, LocalAdaptiveFusion, ModelConfig,
                                      build_discriminator, build_generator, count_parameters,
                                      get_num_adain_params, init_generator, init_weights)

# Parameter counts of the paper configuration (base width 64, 4 residual blocks, style 8,
# MLP 256, LAF 2x2), computed from METHOD.md's layer list: they change only if the
# architecture changes.
PAPER_GENERATOR_PARAMETERS = {1: 15_228_433, 2: 21_197_845, 3: 27_167_257}
PAPER_DISCRIMINATOR_PARAMETERS_M2 = 2_765_633
PIX2PIX_UNET_PARAMETERS_M2 = 54_408_833


@pytest.mark.parametrize("m", [1, 2, 3])
def test_paper_configuration_parameter_count(m):
    gen = build_generator(ModelConfig(num_sources=m))
    assert count_parameters(gen) == PAPER_GENERATOR_PARAMETERS[m]
    # Per-source SREs have separate weights of identical size.
    sizes = {count_parameters(e) for e in gen.shared_encoders}
    assert len(gen.shared_encoders) == m and len(sizes) == 1


def test_discriminator_and_unet_parameter_counts():
    assert count_parameters(build_discriminator(2)) == PAPER_DISCRIMINATOR_PARAMETERS_M2
    unet = build_generator(ModelConfig(architecture="pix2pix_unet", num_sources=2))
    assert count_parameters(unet) == PIX2PIX_UNET_PARAMETERS_M2


def test_adain_parameters_sized_from_decoder():
    gen = build_generator(ModelConfig(num_sources=2, base_width=8, num_res_blocks=3))
    n_adain = sum(isinstance(m, AdaptiveInstanceNorm2d) for m in gen.decoder.modules())
    assert n_adain == 6  # two per residual block
    assert get_num_adain_params(gen.decoder) == 6 * 2 * 32
    assert gen.specific_encoder.mlp[-1].out_features == 6 * 2 * 32


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("grid", LAF_GRIDS)
def test_generator_shapes_every_grid(m, grid):
    gen = build_generator(ModelConfig(num_sources=m, base_width=4, laf_grid=grid, image_size=64))
    x = torch.rand(2, m, 64, 64) * 2 - 1
    out = gen(x)
    assert out.synthetic.shape == (2, 1, 64, 64)
    assert out.pseudo_target.shape == (2, 1, 64, 64)
    assert out.synthetic.abs().max() <= 1.0  # tanh output
    d = build_discriminator(m, width=4)
    assert d(x, out.synthetic).shape == (2, 1, 6, 6)


def test_paper_discriminator_patch_grid():
    d = build_discriminator(2, width=8)
    assert d(torch.zeros(1, 2, 256, 256), torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)


def test_every_subnetwork_gets_gradient_from_objective():
    torch.manual_seed(0)
    m = 3
    gen = init_weights(build_generator(ModelConfig(num_sources=m, base_width=4, image_size=64)))
    disc = init_weights(build_discriminator(m, width=4))
    x, y = torch.rand(2, m, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1
    out = gen(x)
    logits = disc(x, out.synthetic)
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            + 0.1 * (out.synthetic - y).abs().mean() + 0.1 * (out.pseudo_target - y).abs().mean())
    loss.backward()
    parts = {"sre": gen.shared_encoders, "cat_conv": gen.cat_conv, "laf": gen.laf,
             "spe": gen.specific_encoder.encoder, "mlp": gen.specific_encoder.mlp, "decoder": gen.decoder}
    for name, module in parts.items():
        params = list(module.parameters())
        assert params and all(p.grad is not None for p in params), name
        assert sum(p.grad.abs().sum() for p in params) > 0, name
    for i, enc in enumerate(gen.shared_encoders):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()), f"SRE {i}"


def test_laf_blocks_are_independent():
    laf = LocalAdaptiveFusion(num_sources=2, grid=2)
    x = torch.rand(1, 2, 8, 8)
    with torch.no_grad():
        laf.weight.zero_()
        laf.weight[0, 1] = torch.tensor([1.0, 0.0])  # top-right block copies source 0
        laf.weight[1, 0] = torch.tensor([0.0, 1.0])  # bottom-left block copies source 1
        laf.bias[1, 1] = 0.5
    out = laf(x)[0, 0]
    assert torch.allclose(out[:4, 4:], x[0, 0, :4, 4:])
    assert torch.allclose(out[4:, :4], x[0, 1, 4:, :4])
    assert torch.all(out[:4, :4] == 0) and torch.allclose(out[4:, 4:], torch.full((4, 4), 0.5))


def test_grid_one_is_plain_1x1_fusion():
    laf = LocalAdaptiveFusion(num_sources=3, grid=1)
    x = torch.rand(2, 3, 16, 16)
    expected = torch.einsum("bmhw,m->bhw", x, laf.weight[0, 0]) + laf.bias[0, 0]
    assert torch.allclose(laf(x)[:, 0], expected, atol=1e-6)


def test_shared_only_ablation_and_unet():
    gen = build_generator(ModelConfig(num_sources=2, base_width=4, specific_encoder=False, image_size=64))
    out = gen(torch.zeros(1, 2, 64, 64))
    assert out.pseudo_target is None and gen.specific_encoder is None
    assert not any(isinstance(m, AdaptiveInstanceNorm2d) for m in gen.modules())
    unet = build_generator(ModelConfig(architecture="pix2pix_unet", num_sources=3, base_width=4)).eval()
    out = unet(torch.zeros(1, 3, 256, 256))
    assert out.synthetic.shape == (1, 1, 256, 256) and out.pseudo_target is None


def test_config_validation_and_roundtrip():
    cfg = ModelConfig(num_sources=3, base_width=16, laf_grid=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="laf_grid"):
        ModelConfig(laf_grid=3)
    with pytest.raises(ValueError, match="num_sources"):
        ModelConfig(num_sources=0)
    with pytest.raises(ValueError, match="unknown model configuration keys"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="expected sources"):
        build_generator(ModelConfig(num_sources=2, base_width=4))(torch.zeros(1, 3, 64, 64))


def test_init_weights_normal():
    gen = init_weights(build_generator(ModelConfig(num_sources=1, base_width=16)))
    w = gen.shared_encoders[0].model[0][0].weight
    assert abs(w.mean().item()) < 0.01 and 0.015 < w.std().item() < 0.025


def _smooth_slices(b, m, size, seed):
    """Blurry random images in [-1, 1]: closer to MR slices than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, m, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def _mean_abs_gradients(gen, m, size=128):
    x, y = _smooth_slices(2, m, size, 1), _smooth_slices(2, 1, size, 2)
    out = gen(x)
    ((out.synthetic - y).abs().mean() + (out.pseudo_target - y).abs().mean()).backward()
    parts = {"sre": gen.shared_encoders, "cat_conv": gen.cat_conv, "spe": gen.specific_encoder.encoder,
             "mlp": gen.specific_encoder.mlp, "decoder_res": gen.decoder.model[:4], "decoder_up": gen.decoder.model[4:]}
    return {k: torch.cat([p.grad.flatten() for p in mod.parameters()]).abs().mean().item() for k, mod in parts.items()}


# At initialisation every sub-network's mean |gradient| is within this factor of the
# largest one, and at least 10x Adam's eps (1e-8): the style path learns from step one.
# With the paper's literal form (N(0, 0.02) SPE/MLP, std' = MLP output) the SPE gets
# ~1e-12 and the decoder's AdaIN blocks ~1e-18 (measured), which this test rejects.
GRADIENT_RATIO = 1000.0


@pytest.mark.parametrize("m", [1, 2])
def test_style_path_is_alive_at_initialisation(m):
    torch.manual_seed(0)
    gen = init_generator(build_generator(ModelConfig(num_sources=m, base_width=16, image_size=128)))
    grads = _mean_abs_gradients(gen, m)
    largest = max(grads.values())
    for name, value in grads.items():
        assert value >= 1e-7 and value * GRADIENT_RATIO >= largest, (name, grads)


def test_paper_literal_init_has_a_dead_style_path():
    """The check above can fail: the paper's literal init is what it rejects."""
    torch.manual_seed(0)
    config = ModelConfig(num_sources=2, base_width=16, image_size=128, adain_scale="direct")
    grads = _mean_abs_gradients(init_generator(build_generator(config), "normal"), 2)
    assert grads["spe"] < 1e-9 and grads["decoder_res"] < 1e-9, grads


def test_adain_scale_starts_at_one():
    torch.manual_seed(0)
    gen = init_generator(build_generator(ModelConfig(num_sources=2, base_width=8, image_size=64)))
    gen(_smooth_slices(2, 2, 64, 3))
    scales = torch.cat([(m.weight + m.scale_offset).flatten() for m in gen.decoder.modules()
                        if isinstance(m, AdaptiveInstanceNorm2d)])
    assert 0.8 < scales.mean().item() < 1.2 and (scales > 0).all()


def test_swapping_the_style_code_changes_the_output():
    torch.manual_seed(0)
    gen = init_generator(build_generator(ModelConfig(num_sources=2, base_width=16, image_size=128))).eval()
    a, b = _smooth_slices(1, 2, 128, 4), _smooth_slices(1, 2, 128, 5)
    with torch.no_grad():
        content = gen.encode_content(a)
        own, _ = gen.encode_style(a)
        other, _ = gen.encode_style(b)
        same = gen.decode(content, own)
        swapped = gen.decode(content, other)
        assert torch.equal(same, gen(a).synthetic)
    change = (swapped - same).abs().mean().item()
    assert change > 1e-3 * same.abs().mean().item() and change > 1e-4, change


def test_bundles_saved_before_adain_scale_read_as_direct():
    values = ModelConfig(num_sources=2).to_dict()
    del values["adain_scale"]
    assert ModelConfig.from_dict(values).adain_scale == "direct"
    assert ModelConfig().adain_scale == "one_plus_delta"
    with pytest.raises(ValueError, match="adain_scale"):
        ModelConfig(adain_scale="bogus")


@pytest.mark.parametrize("architecture", ["fdgan", "pix2pix_unet"])
def test_2_5d_input_takes_each_sources_neighbours(architecture):
    """context_slices k: 2k + 1 channels per source, source by source; the fdgan's LAF
    pseudo-target comes from the centre slices alone, the synthetic image sees them all."""
    cfg = ModelConfig(architecture=architecture, num_sources=2, base_width=4, context_slices=1)
    assert cfg.input_channels == 6 and cfg.centre_channels() == [1, 4]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    gen = init_generator(build_generator(cfg)).eval()
    x = torch.rand(2, 6, 256, 256) * 2 - 1
    with pytest.raises(ValueError, match=r"expected sources of shape \(B, 6"):
        gen(x[:, :2])
    moved = x.clone()
    moved[:, [0, 2, 3, 5]] = torch.rand(2, 4, 256, 256) * 2 - 1  # the neighbours only
    with torch.no_grad():
        a, b = gen(x), gen(moved)
    assert (a.synthetic - b.synthetic).abs().mean() > 1e-4  # the neighbours reach the output
    if architecture == "fdgan":
        assert torch.equal(a.pseudo_target, b.pseudo_target)
    with pytest.raises(ValueError, match="context_slices"):
        ModelConfig(context_slices=-1)


def test_2d_configs_saved_before_2_5d_read_as_single_slice():
    values = ModelConfig(num_sources=2, base_width=4).to_dict()
    del values["context_slices"]
    assert ModelConfig.from_dict(values).context_slices == 0


def test_instance_norm_is_the_same_in_both_layouts_and_keeps_channels_last():
    from MRISynthesisLib.networks import instance_norm

    torch.manual_seed(0)
    x = torch.randn(3, 8, 16, 12) * 4 + 2
    cl = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.instance_norm(x, eps=1e-5)
    out = instance_norm(cl)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(instance_norm(x), expected)  # channels-first: F.instance_norm itself
    gen = build_generator(ModelConfig(num_sources=2, base_width=4, image_size=64)).eval()
    inp = torch.rand(2, 2, 64, 64) * 2 - 1
    with torch.no_grad():
        a = gen(inp).synthetic
        b = gen.to(memory_format=torch.channels_last)(inp.contiguous(memory_format=torch.channels_last)).synthetic
    assert torch.allclose(a, b, atol=1e-5)
