import numpy as np
import pytest

from MRISynthesisLib.errors import Cancelled, InputError
from MRISynthesisLib.inference import synthesize
from MRISynthesisLib.volumes import Volume, load_volume

from conftest import head_phantom, make_bundle


def _inputs(shape=(40, 48, 24), affine=None):
    return {"t1": head_phantom(shape, 0, affine), "t2": head_phantom(shape, 1, affine)}


def test_output_on_reference_grid(tiny_bundle):
    inputs = _inputs()
    out = synthesize(inputs, tiny_bundle, device="cpu")
    assert out.array.shape == inputs["t1"].shape and out.array.dtype == np.float32
    assert np.array_equal(out.affine, inputs["t1"].affine)
    assert out.array.min() >= 0 and out.array.max() <= 1000
    assert np.all(out.array[inputs["t1"].array == 0] == 0)  # background stays background
    assert out.array[inputs["t1"].array != 0].std() > 0


def test_batch_size_does_not_change_result(tiny_bundle):
    inputs = _inputs()
    a = synthesize(inputs, tiny_bundle, batch_size=1, device="cpu")
    b = synthesize(inputs, tiny_bundle, batch_size=7, device="cpu")
    assert np.allclose(a.array, b.array, atol=1e-3)


def test_bf16_close_to_fp32(tiny_bundle):
    inputs = _inputs()
    a = synthesize(inputs, tiny_bundle, precision="fp32", device="cpu")
    b = synthesize(inputs, tiny_bundle, precision="bf16", device="cpu")
    assert np.abs(a.array - b.array).mean() < 10  # on a 0..1000 scale


def test_progress_and_cancel(tiny_bundle):
    calls = []
    synthesize(_inputs(), tiny_bundle, batch_size=5, progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 1

    with pytest.raises(Cancelled):
        synthesize(_inputs(), tiny_bundle, batch_size=5, cancel=cancel)


def test_inputs_on_other_grid_are_resampled_with_warning(tiny_bundle):
    inputs = _inputs()
    t1 = inputs["t1"]
    # the T2 on a coarser grid over the same physical region
    coarse_affine = t1.affine.copy()
    coarse_affine[:3, :3] *= 2
    coarse_affine[:3, 3] += np.diag(t1.affine)[:3] * 0.5
    t2_coarse = Volume(inputs["t2"].array[::2, ::2, ::2].copy(), coarse_affine)
    with pytest.warns(UserWarning, match="resampling"):
        out = synthesize({"t1": t1, "t2": t2_coarse}, tiny_bundle)
    assert out.shape == t1.shape and np.array_equal(out.affine, t1.affine)


def test_non_overlapping_inputs_refused(tiny_bundle):
    inputs = _inputs()
    far = inputs["t2"].affine.copy()
    far[:3, 3] += 500.0
    with pytest.raises(InputError, match="does not overlap"):
        synthesize({"t1": inputs["t1"], "t2": Volume(inputs["t2"].array, far)}, tiny_bundle)


def test_modality_errors(tiny_bundle):
    inputs = _inputs()
    with pytest.raises(InputError, match="t2 was not given"):
        synthesize({"t1": inputs["t1"]}, tiny_bundle)
    with pytest.raises(InputError, match="cannot use t1c"):
        synthesize({**inputs, "t1c": inputs["t1"]}, tiny_bundle)


def test_bad_volumes(tiny_bundle):
    good = _inputs()["t1"]
    cases = {
        "expected a 3D volume": Volume(good.array[:, :, 0], good.affine),
        "NaN": Volume(np.where(good.array > 400, np.nan, good.array).astype(np.float32), good.affine),
        "all voxels are zero": Volume(np.zeros_like(good.array), good.affine),
    }
    for message, bad in cases.items():
        with pytest.raises(InputError, match=message):
            synthesize({"t1": good, "t2": bad}, tiny_bundle)


def test_mask_restricts_output(tiny_bundle):
    inputs = _inputs()
    mask = np.zeros(inputs["t1"].shape, np.float32)
    mask[10:30, 10:38, 6:18] = 1
    out = synthesize(inputs, tiny_bundle, mask=Volume(mask, inputs["t1"].affine))
    assert np.all(out.array[mask == 0] == 0)
    assert np.all(out.array[:, :, :6] == 0)


def test_three_source_bundle_and_reference_choice(tmp_path, subject_files):
    bundle = make_bundle(tmp_path / "m3.safetensors", sources=("t1", "t2", "t1c"))
    files = {k: subject_files[k] for k in ("t1", "t2", "t1c")}
    out = synthesize(files, bundle, reference="t2")
    t2 = load_volume(subject_files["t2"])
    assert np.allclose(out.affine, t2.affine) and out.shape == t2.shape


def test_precision_auto_follows_the_hardware(tiny_bundle):
    import torch

    from MRISynthesisLib.inference import preferred_precision, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == preferred_precision(cpu) in ("fp32", "bf16")
    assert resolve_precision(cpu, "fp32") == "fp32"
    with pytest.raises(InputError, match="unknown precision"):
        synthesize(_inputs(), tiny_bundle, precision="fp16")
    auto = synthesize(_inputs(), tiny_bundle, precision="auto")
    same = synthesize(_inputs(), tiny_bundle, precision=preferred_precision(cpu))
    assert np.array_equal(auto.array, same.array)


# ----------------------------------------------------------------- speed-path internals


def test_workers_give_the_result_of_one_worker(tiny_bundle):
    """Two workers of one thread each (the default on a free 2-core machine) compute what
    one worker does, slice for slice; and the caller's torch thread count is restored."""
    import torch

    before = torch.get_num_threads()
    inputs = _inputs()
    for precision in ("fp32", "bf16"):
        one = synthesize(inputs, tiny_bundle, device="cpu", precision=precision, threads=1, batch_size=3)
        two = synthesize(inputs, tiny_bundle, device="cpu", precision=precision, threads=2, batch_size=3)
        assert np.array_equal(one.array, two.array), precision
    assert torch.get_num_threads() == before


def test_progress_and_cancel_with_workers(tiny_bundle):
    calls = []
    synthesize(_inputs(), tiny_bundle, batch_size=2, threads=2, progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(Cancelled):
        synthesize(_inputs(), tiny_bundle, batch_size=2, threads=2, cancel=lambda: True)


def test_timings_report_every_stage(tiny_bundle):
    from MRISynthesisLib.inference import STAGES

    timings = {}
    out = synthesize(_inputs(), tiny_bundle, device="cpu", timings=timings)
    assert set(timings) == set(STAGES)
    assert all(v >= 0 for v in timings.values()) and timings["network"] > 0
    assert out.array.flags["F_CONTIGUOUS"]  # NIfTI's order; Slicer's (k, j, i) view needs no copy


def test_native_bf16_matches_autocast(tiny_bundle):
    """bf16 on the CPU runs bf16 weights instead of autocast: the same numbers within bf16
    rounding (autocast computes the convolutions in bf16 too)."""
    import torch

    from MRISynthesisLib import inference

    inputs = _inputs()
    native = synthesize(inputs, tiny_bundle, device="cpu", precision="bf16")
    # autocast, as before: run_native_bf16 off
    orig = inference.runs_native_bf16
    inference.runs_native_bf16 = lambda device, precision: False
    try:
        autocast = synthesize(inputs, tiny_bundle, device="cpu", precision="bf16")
    finally:
        inference.runs_native_bf16 = orig
    fp32 = synthesize(inputs, tiny_bundle, device="cpu", precision="fp32")
    brain = inputs["t1"].array != 0
    err_native = np.abs(native.array - fp32.array)[brain].mean()
    err_autocast = np.abs(autocast.array - fp32.array)[brain].mean()
    assert err_native < 10 and err_autocast < 10
    assert np.abs(native.array - autocast.array)[brain].mean() < 10
    assert torch.get_default_dtype() == torch.float32


def test_cpu_layouts_give_the_same_result(tiny_bundle, monkeypatch):
    """bf16 on the CPU in channels-last (chosen with AMX) or channels-first layout: the same
    network, so the same numbers up to the convolution kernels' summation order."""
    import torch

    from MRISynthesisLib import inference
    from MRISynthesisLib.bundle import load_bundle

    inputs = _inputs()
    results = {}
    for layout in ("contiguous", "channels_last"):
        monkeypatch.setattr(inference, "CPU_LAYOUT", layout)
        assert inference.cpu_channels_last(torch.device("cpu"), "bf16") == (layout == "channels_last")
        assert not inference.cpu_channels_last(torch.device("cpu"), "fp32")  # fp32 keeps channels-first
        net = inference.cached_generator(load_bundle(tiny_bundle), "cpu", "bf16")
        weight = next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        results[layout] = synthesize(inputs, tiny_bundle, device="cpu", precision="bf16").array
    brain = inputs["t1"].array != 0
    assert np.abs(results["contiguous"] - results["channels_last"])[brain].mean() < 1.0  # of 0-1000
    monkeypatch.setattr(inference, "CPU_LAYOUT", "nhwc")
    with pytest.raises(InputError, match="unknown CPU layout"):
        synthesize(inputs, tiny_bundle, device="cpu", precision="bf16")


def test_cached_generator_is_reused_per_bundle_device_precision(tiny_bundle, tmp_path):
    from MRISynthesisLib.bundle import load_bundle
    from MRISynthesisLib.inference import cached_generator

    bundle = load_bundle(tiny_bundle)
    a = cached_generator(bundle, "cpu", "fp32")
    assert cached_generator(load_bundle(tiny_bundle), "cpu", "fp32") is a  # same digest
    assert cached_generator(bundle, "cpu", "bf16") is not a
    other = load_bundle(make_bundle(tmp_path / "other.safetensors", seed=1))
    assert cached_generator(other, "cpu", "fp32") is not a
    assert next(cached_generator(bundle, "cpu", "bf16").parameters()).dtype.is_floating_point


def test_thread_choice_order(monkeypatch):
    from MRISynthesisLib import inference as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.choose_threads(3).count == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads().reason == "$OMP_NUM_THREADS"
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.choose_threads() == threads.ThreadChoice(1, f"${threads.THREADS_ENV}")
    assert threads.choose_threads(2).count == 2  # explicit beats the environment
    monkeypatch.setenv(threads.THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="MRISYNTHESIS_THREADS"):
        threads.choose_threads()
    monkeypatch.delenv(threads.THREADS_ENV)
    monkeypatch.delenv("OMP_NUM_THREADS")
    # Default: one worker per CPU this process may use.
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.choose_threads() == threads.ThreadChoice(2, "2 usable CPUs")
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    assert threads.choose_threads().count == 1


def test_2_5d_bundle_reads_the_neighbouring_slices(tmp_path):
    """A 2.5D bundle's output at slice k depends on slices k-1..k+1 and no further; a 2D
    bundle's only on slice k. Flipping one axial slice in-plane keeps every intensity
    statistic (same voxel values), so only the network sees the change."""
    shape = (40, 48, 24)
    inputs = _inputs(shape)
    flipped = {name: Volume(v.array.copy(), v.affine) for name, v in inputs.items()}
    j = 12
    for v in flipped.values():
        v.array[:, :, j] = v.array[::-1, ::-1, j]
    changed = {}
    for context in (0, 1):
        bundle = make_bundle(tmp_path / f"ctx{context}.safetensors", context_slices=context)
        a = synthesize(inputs, bundle, device="cpu", precision="fp32").array
        b = synthesize(flipped, bundle, device="cpu", precision="fp32").array
        diff = np.abs(a - b).max(axis=(0, 1))
        changed[context] = set(np.flatnonzero(diff > 1e-3).tolist())
    assert changed[0] == {j}
    assert changed[1] == {j - 1, j, j + 1}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_network_feed_matches_the_prepared_generator(monkeypatch, layout):
    """bf16 on the CPU: bf16 weights and bf16 input in the weights' layout, no autocast;
    fp32: fp32 input, no autocast on the CPU."""
    import torch

    from MRISynthesisLib import inference
    from MRISynthesisLib.inference import NetworkFeed, prepare_generator
    from MRISynthesisLib.networks import ModelConfig, build_generator

    monkeypatch.setattr(inference, "CPU_LAYOUT", layout)
    net = build_generator(ModelConfig(num_sources=2, base_width=4)).eval()
    x = torch.rand(2, 2, 32, 32) * 2 - 1
    bf16 = NetworkFeed.of("cpu", "bf16")
    assert bf16.native_bf16 and bf16.channels_last == (layout == "channels_last")
    fed = bf16.input(x)
    assert fed.dtype == torch.bfloat16
    assert fed.is_contiguous(memory_format=torch.channels_last) == bf16.channels_last
    prepared = prepare_generator(net, torch.device("cpu"), "bf16")
    weight = next(prepared.parameters())
    assert weight.dtype == torch.bfloat16
    with torch.inference_mode(), bf16.context():
        out = prepared(fed).synthetic
    with torch.inference_mode():
        ref = net(x).synthetic
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
    fp32 = NetworkFeed.of("cpu", "fp32")
    assert not fp32.native_bf16 and not fp32.channels_last and fp32.input(x).dtype == torch.float32
    for feed in (bf16, fp32):
        with feed.context():
            assert not torch.is_autocast_enabled("cpu")  # the CPU never needs autocast


def test_synthesis_keeps_few_volume_sized_arrays(tmp_path):
    """Peak numpy memory of a synthesis from files, in volume-sized float32 arrays: the
    inputs are dropped once normalised and the channels once the network is done (6.4
    volumes before that, 5.2 now on this case; tracemalloc sees numpy's arrays, not torch's)."""
    import tracemalloc

    from MRISynthesisLib.inference import synthesize_with_details
    from MRISynthesisLib.volumes import save_volume

    affine = np.diag([-1.0, -1.0, 1.5, 1.0])  # flipped axes: the result is a reordered copy
    shape = (120, 128, 60)
    files = {}
    for seed, name in enumerate(("t1", "t2"), start=1):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        save_volume(head_phantom(shape, seed=seed, affine=affine), files[name])
    bundle = make_bundle(tmp_path / "b.safetensors")
    synthesize_with_details(files, bundle, mask="none")  # model built and cached outside the measurement
    tracemalloc.start()
    try:
        result = synthesize_with_details(files, bundle, mask="none")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    volume_bytes = np.prod(shape) * 4
    assert result.volume.array.shape == shape
    assert peak / volume_bytes < 5.6
