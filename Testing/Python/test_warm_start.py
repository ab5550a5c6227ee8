"""Warm start (train --init-from): weights mapped source by source between source sets."""

import json

import pytest
import torch

from MRISynthesisLib.bundle import bundle_from_generator, load_bundle, save_bundle
from MRISynthesisLib.errors import InputError
from MRISynthesisLib.networks import ModelConfig, build_discriminator, build_generator, init_generator, init_weights
from test_training_unit import gen_data, small_run  # noqa: F401  (module fixture and helper)
from training import warm_start as ws

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(arch, sources, width=8, seed=0, **extra):
    """A 'trained' model: random weights with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    config = ModelConfig(architecture=arch, num_sources=len(sources), base_width=width,
                         image_size=64 if arch == "fdgan" else 256, **extra)
    G = init_generator(build_generator(config))
    D = init_weights(build_discriminator(config.input_channels, width))
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return config, G.eval(), D.eval()


def fresh(config_like, sources, width=8, **extra):
    config = ModelConfig(architecture=config_like.architecture, num_sources=len(sources), base_width=width,
                         image_size=config_like.image_size, **extra)
    torch.manual_seed(123)
    return (config, init_generator(build_generator(config)),
            init_weights(build_discriminator(config.input_channels, width)))


@pytest.mark.parametrize("arch", ["fdgan", "pix2pix_unet"])
def test_an_added_source_starts_at_zero_weight_so_the_old_function_is_kept(arch):
    old_config, G_old, D_old = trained(arch, ["t1", "t2"])
    old = ws.TrainedModel(old_config, ["t1", "t2"], G_old.state_dict(), D_old.state_dict(), "old")
    config, G, D = fresh(old_config, ["t1", "t2", "t1c"])
    G.load_state_dict(ws.map_generator(G.state_dict(), old, config, ["t1", "t2", "t1c"]))
    D.load_state_dict(ws.map_discriminator(D.state_dict(), old, config, ["t1", "t2", "t1c"]))
    G.eval(), D.eval()
    size = old_config.image_size
    x = torch.rand(2, 2, size, size) * 2 - 1
    t1c = torch.rand(2, 1, size, size) * 2 - 1
    y = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(G(torch.cat([x, t1c], 1)).synthetic, G_old(x).synthetic, atol=1e-5, rtol=0)
        torch.testing.assert_close(D(torch.cat([x, t1c], 1), y), D_old(x, y), atol=1e-5, rtol=0)
        # ... and the new source is wired in: a non-zero weight makes it count.
        if arch == "fdgan":
            G.cat_conv.weight[:, -4 * 8:].normal_(0, 0.1)
        else:
            G.model.model[0].weight[:, 2].normal_(0, 0.1)
        assert not torch.allclose(G(torch.cat([x, t1c], 1)).synthetic, G_old(x).synthetic, atol=1e-3)
    if arch == "fdgan":  # the new source's encoder is a copy of T1's
        for a, b in zip(G.shared_encoders[2].parameters(), G_old.shared_encoders[0].parameters()):
            assert torch.equal(a, b)


def test_a_dropped_source_leaves_its_blocks_behind_and_a_kept_one_moves_with_its_weights():
    old_config, G_old, D_old = trained("fdgan", ["t1", "t2"])
    old = ws.TrainedModel(old_config, ["t1", "t2"], G_old.state_dict(), D_old.state_dict(), "old")
    config, G, D = fresh(old_config, ["t2"])
    G.load_state_dict(ws.map_generator(G.state_dict(), old, config, ["t2"]))
    D.load_state_dict(ws.map_discriminator(D.state_dict(), old, config, ["t2"]))
    for a, b in zip(G.shared_encoders[0].parameters(), G_old.shared_encoders[1].parameters()):
        assert torch.equal(a, b)  # T2's encoder, not T1's
    assert torch.equal(G.cat_conv.weight, G_old.cat_conv.weight[:, 32:])
    assert torch.equal(G.laf.weight[..., 0], G_old.laf.weight[..., 1])
    assert torch.equal(D.model[0].weight[:, 0], D_old.model[0].weight[:, 1])  # T2's channel
    assert torch.equal(D.model[0].weight[:, 1], D_old.model[0].weight[:, 2])  # the target's channel
    assert torch.equal(G.decoder.model[-2].weight, G_old.decoder.model[-2].weight)


def test_from_a_bundle_the_generator_is_taken_and_the_discriminator_stays_fresh(tmp_path):
    old_config, G_old, _ = trained("fdgan", ["t1", "t2"])
    path = tmp_path / "t1_t2.safetensors"
    save_bundle(bundle_from_generator(G_old, old_config, ["t1", "t2"]), path)
    config, G, D = fresh(old_config, ["t1"])
    D_before = {k: v.clone() for k, v in D.state_dict().items()}
    message = ws.warm_start(G, D, path, config, ["t1"])
    assert "kept t1" in message and "dropped t2" in message and "discriminator fresh" in message
    assert torch.equal(G.shared_encoders[0].model[0][0].weight, G_old.shared_encoders[0].model[0][0].weight)
    assert all(torch.equal(v, D_before[k]) for k, v in D.state_dict().items())


def test_a_narrower_model_or_a_missing_file_is_refused_by_name(tmp_path):
    old_config, G_old, _ = trained("fdgan", ["t1", "t2"], width=16)
    path = tmp_path / "w16.safetensors"
    save_bundle(bundle_from_generator(G_old, old_config, ["t1", "t2"]), path)
    config, G, D = fresh(old_config, ["t1"], width=8)
    with pytest.raises(InputError, match="base_width 16 .new run: 8; the width can only grow"):
        ws.warm_start(G, D, path, config, ["t1"])
    with pytest.raises(InputError, match="no model bundle or training checkpoint"):
        ws.warm_start(G, D, tmp_path / "missing", config, ["t1"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt is neither"):
        ws.warm_start(G, D, tmp_path / "junk.pt", config, ["t1"])


def test_a_run_warm_started_from_another_runs_folder(gen_data, tmp_path):  # noqa: F811
    first = tmp_path / "t1_t2"
    small_run(gen_data, first, epochs=1)
    second = tmp_path / "t1"
    small_run(gen_data, second, epochs=1, sources="t1", init_from=str(first))
    log = (second / "train.log").read_text()
    assert "warm start from t1_t2 (t1+t2): kept t1; dropped t2; discriminator taken" in log
    assert json.loads((second / "config.json").read_text())["init_from"] == str(first.resolve())


@pytest.mark.parametrize("arch", ["fdgan", "pix2pix_unet"])
def test_a_2d_model_starts_a_2_5d_run_as_its_own_function(arch):
    old_config, G_old, D_old = trained(arch, ["t1", "t2"])
    old = ws.TrainedModel(old_config, ["t1", "t2"], G_old.state_dict(), D_old.state_dict(), "old")
    config, G, D = fresh(old_config, ["t1", "t2"], context_slices=2)
    ws.check_compatible(config, old_config)
    G.load_state_dict(ws.map_generator(G.state_dict(), old, config, ["t1", "t2"]))
    D.load_state_dict(ws.map_discriminator(D.state_dict(), old, config, ["t1", "t2"]))
    G.eval(), D.eval()
    size = old_config.image_size
    torch.manual_seed(1)
    stack = torch.rand(2, 10, size, size) * 2 - 1  # t1 then t2, five slices each, the centre third
    centre = stack[:, config.centre_channels()]
    y = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(G(stack).synthetic, G_old(centre).synthetic, atol=1e-5, rtol=0)
        torch.testing.assert_close(D(stack, y), D_old(centre, y), atol=1e-5, rtol=0)
        # The neighbours are wired in: a non-zero weight on one makes it count.
        first = G.shared_encoders[1].model[0][0] if arch == "fdgan" else G.model.model[0]
        first.weight[:, 6 if arch == "pix2pix_unet" else 1].normal_(0, 0.1)
        assert not torch.allclose(G(stack).synthetic, G_old(centre).synthetic, atol=1e-3)
    with pytest.raises(InputError, match="context can only grow"):
        ws.check_compatible(old_config, config)


def test_a_wider_paper_model_starts_as_the_narrower_ones_function(tmp_path):
    old_config, G_old, _ = trained("fdgan", ["t1", "t2"], width=8)
    path = tmp_path / "w8.safetensors"
    save_bundle(bundle_from_generator(G_old, old_config, ["t1", "t2"]), path)
    config, G, D = fresh(old_config, ["t1", "t2", "t1c"], width=12)  # wider, and a source added
    message = ws.warm_start(G, D, path, config, ["t1", "t2", "t1c"])
    assert "generator width 8 -> 12" in message
    G.eval()
    size = old_config.image_size
    torch.manual_seed(2)
    x, t1c = torch.rand(2, 2, size, size) * 2 - 1, torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        out, out_old = G(torch.cat([x, t1c], 1)), G_old(x)
        torch.testing.assert_close(out.synthetic, out_old.synthetic, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pseudo_target, out_old.pseudo_target, atol=1e-5, rtol=0)
        # The old channels kept their weights where they sit (T2's block of Cat-Conv's input)...
        torch.testing.assert_close(G.cat_conv.weight[:32, 48:80], G_old.cat_conv.weight[:, 32:64], atol=0, rtol=0)
        # ... the new channels start alive, with zero weight into the old ones, and are wired in.
        last_res = G.decoder.model[3].block[5]
        assert last_res.weight[32:].abs().sum() > 0 and last_res.weight[:32, 32:].abs().sum() == 0
        last_res.weight[:32, 32:].normal_(0, 0.1)
        assert not torch.allclose(G(torch.cat([x, t1c], 1)).synthetic, out_old.synthetic, atol=1e-3)


def test_only_the_paper_model_grows_wider():
    old_config, _, _ = trained("pix2pix_unet", ["t1", "t2"], width=8)
    config, _, _ = fresh(old_config, ["t1", "t2"], width=12)
    with pytest.raises(InputError, match="only the paper model's generator can grow wider"):
        ws.check_compatible(config, old_config)


def test_a_bundle_fine_tune_takes_its_discriminator_from_another_run(gen_data, tmp_path):  # noqa: F811
    donor = tmp_path / "donor"
    small_run(gen_data, donor, epochs=1)  # a pix2pix run at width 4
    old_config, G_old, _ = trained("pix2pix_unet", ["t1", "t2"], width=4)
    bundle = tmp_path / "t1_t2.safetensors"
    save_bundle(bundle_from_generator(G_old, old_config, ["t1", "t2"]), bundle)
    config, G, D = fresh(old_config, ["t1", "t2"], width=4)
    message = ws.warm_start(G, D, bundle, config, ["t1", "t2"], discriminator_from=donor)
    assert "discriminator taken from donor (t1+t2)" in message
    donor_D = torch.load(donor / "checkpoint.pt", map_location="cpu", weights_only=False)["D"]
    assert all(torch.equal(v, donor_D[k]) for k, v in D.state_dict().items())
    assert all(torch.equal(v, G_old.state_dict()[k]) for k, v in G.state_dict().items())
    with pytest.raises(InputError, match="--init-discriminator-from: .*t1_t2.safetensors is a bundle, which holds no"):
        ws.warm_start(G, D, bundle, config, ["t1", "t2"], discriminator_from=bundle)
    with pytest.raises(InputError, match="--init-discriminator-from: no model bundle or training checkpoint"):
        ws.warm_start(G, D, bundle, config, ["t1", "t2"], discriminator_from=tmp_path / "missing")
    with pytest.raises(InputError, match="--init-discriminator-from goes with --init-from"):
        small_run(gen_data, tmp_path / "no_generator", init_discriminator_from=str(donor))
    # A run: the log says where each network came from; the bundle names both portably.
    run = tmp_path / "fine_tune"
    small_run(gen_data, run, epochs=1, init_from=str(bundle), init_discriminator_from=str(donor))
    assert "discriminator taken from donor (t1+t2)" in (run / "train.log").read_text()
    options = load_bundle(run / "model.safetensors").provenance["options"]
    assert options["init_discriminator_from"] == "<elsewhere>/donor" and str(tmp_path) not in json.dumps(options)
