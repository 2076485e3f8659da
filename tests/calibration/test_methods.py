"""Each calibration method against an answer computed independently here."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eightbit import QuantConfig, int8_weights, qmath, quantize, uint8_activations
from eightbit.calibration.methods import (
    METHODS,
    admm_scale,
    ema_range,
    kl_range,
    kl_threshold,
    mse_range,
    power_of_two,
    weight_admm,
    weight_mse,
)
from eightbit.calibration.observers import Observer, Statistic
from tests.helpers import DepthwiseNet, calibration_batches


def _observe(spec, *batches):
    obs = Observer(spec, None, "t", needs=METHODS[spec.method].needs)
    for b in batches:
        obs(b)
    return obs


def _fq_mse(x: torch.Tensor, lo: float, hi: float, spec) -> float:
    scale, zp = qmath.qparams_from_range(
        torch.tensor(lo), torch.tensor(hi), qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric
    )
    return float(((qmath.fake_quantize(x, scale, zp, spec.qmin, spec.qmax) - x) ** 2).mean())


def test_mse_matches_brute_force_clip_of_laplace_sample():
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    spec = int8_weights(bits=4, granularity=__import__("eightbit").Granularity.PER_TENSOR, method="mse")
    lo, hi = mse_range(_observe(spec, x).stats, spec)
    bound = float(x.abs().max())
    grid = np.linspace(0.05 * bound, bound, 400)
    errors = [_fq_mse(x, -c, c, spec) for c in grid]
    best = grid[int(np.argmin(errors))]
    # The histogram method lands near the brute-force optimum and is nearly as good.
    assert abs(float(hi) - best) < 0.1 * best
    assert _fq_mse(x, float(lo), float(hi), spec) <= 1.05 * min(errors)
    assert _fq_mse(x, float(lo), float(hi), spec) < 0.5 * _fq_mse(x, -bound, bound, spec)


def _reference_kl_threshold(counts: np.ndarray, levels: int) -> int:
    """Straightforward TensorRT entropy calibration, written independently of eightbit's version."""
    best, best_kl = len(counts), math.inf
    for i in range(levels, len(counts) + 1):
        p = counts[:i].astype(np.float64).copy()
        p[-1] += counts[i:].sum()
        q = np.zeros(i)
        merged = i // levels  # MXNet's reference: equal groups, the remainder joins the last one
        edges = [j * merged for j in range(levels)] + [i]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            chunk = counts[a:b]
            nz = chunk > 0
            if nz.any():
                q[a:b][nz] = chunk.sum() / nz.sum()
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_kl_threshold_matches_reference_on_small_histogram():
    rng = np.random.default_rng(0)
    counts = np.round(rng.exponential(50, 64) * np.exp(-np.arange(64) / 12)).astype(np.int64)
    counts[60] += 3  # a few outliers
    assert kl_threshold(torch.tensor(counts), levels=8) == _reference_kl_threshold(counts, 8)


def test_kl_clips_outliers_of_relu_like_data():
    x = torch.cat([torch.rand(100_000).pow(3), torch.tensor([20.0])])  # mass in [0, 1], one outlier at 20
    spec = uint8_activations(method="kl")
    lo, hi = kl_range(_observe(spec, x).stats, spec)
    # 256 levels on a 2048-bin histogram cannot clip below 256 bins (2.5): the outlier is clipped that far.
    assert abs(float(lo)) < 1e-6 and float(hi) < 3.0


def test_ema_follows_the_moving_average_formula():
    spec = uint8_activations(method="ema")
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0]), torch.tensor([0.0, 1.0])]
    lo, hi = ema_range(_observe(spec, *batches).stats, spec)
    want_hi = 0.9 * (0.9 * 2.0 + 0.1 * 4.0) + 0.1 * 1.0
    want_lo = 0.9 * (0.9 * -1.0 + 0.1 * -3.0) + 0.1 * 0.0
    assert abs(float(hi) - want_hi) < 1e-6 and abs(float(lo) - want_lo) < 1e-6


def test_admm_scale_is_a_fixed_point_and_beats_minmax():
    w = torch.randn(16, 64)
    scale = admm_scale(w, -127, 127)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    assert torch.allclose(scale, (w * q).sum(1) / (q * q).sum(1), rtol=1e-5)
    spec = int8_weights(method="admm", bits=4)
    lo, hi = weight_admm(w, spec, 0)
    minmax_err = _per_row_err(w, w.abs().amax(1), spec)
    assert torch.equal(-lo, hi)
    assert (_per_row_err(w, hi, spec) <= minmax_err + 1e-9).all()


def _per_row_err(w, bound, spec):
    scale, zp = qmath.qparams_from_range(-bound, bound, qmin=spec.qmin, qmax=spec.qmax, symmetric=True)
    return ((qmath.fake_quantize(w, scale, zp, spec.qmin, spec.qmax, axis=0) - w) ** 2).sum(1)


def test_weight_mse_is_no_worse_than_minmax_per_channel():
    w = torch.distributions.Laplace(0.0, 1.0).sample((8, 256))
    spec = int8_weights(method="mse", bits=4)
    lo, hi = weight_mse(w, spec, 0)
    assert (_per_row_err(w, torch.maximum(-lo, hi), spec) <= _per_row_err(w, w.abs().amax(1), spec) + 1e-9).all()


def test_power_of_two_scales_pick_the_better_neighbour():
    spec = uint8_activations(power_of_two=True)
    lo, hi = torch.tensor(0.0), torch.tensor(3.0)
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=0, qmax=255, symmetric=False)
    s, z = power_of_two(lo, hi, scale, zp, spec)
    assert float(s) == 2.0 ** math.ceil(math.log2(3.0 / 255))
    x = torch.rand(10_000) * 2.0  # data well inside the range: the finer (floor) scale is better
    err = lambda s, z: ((qmath.fake_quantize(x, s, z, 0, 255) - x) ** 2).sum().reshape(1)  # noqa: E731
    s2, _ = power_of_two(lo, hi, scale, zp, spec, err)
    assert float(s2) == 2.0 ** math.floor(math.log2(3.0 / 255))


@pytest.mark.parametrize(
    "act_method, weight_method", [("kl", "minmax"), ("mse", "mse"), ("ema", "admm"), ("percentile", "percentile")]
)
def test_methods_run_end_to_end(act_method, weight_method):
    config = QuantConfig(activations=uint8_activations(method=act_method), weights=int8_weights(method=weight_method))
    model = DepthwiseNet().eval()
    qm = quantize(model, calibration_batches(), config=config, progress=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x), qm(x)).min() > 0.95


def test_pow2_model_exports_and_runs_on_both_runtimes(tmp_path):
    from eightbit.runtime.backends import Backend, load

    config = QuantConfig(
        activations=uint8_activations(method="mse", power_of_two=True), weights=int8_weights(power_of_two=True)
    )
    qm = quantize(DepthwiseNet().eval(), calibration_batches(), config=config, progress=False)
    scales = [s for e in [*qm.activation_encodings.values(), *qm.weight_encodings.values()] for s in e.scale]
    assert all(math.log2(s) == round(math.log2(s)) for s in scales)
    path = tmp_path / "pow2.onnx"
    assert qm.export_onnx(path).parity.max_steps < 3
    x = torch.randn(2, 3, 16, 16)
    want = qm(x).detach().numpy()
    for backend in (Backend.ORT, Backend.OPENVINO):
        runner = load(path, backend)
        got = runner.run({runner.input_names[0]: x.numpy()})[0]
        assert np.abs(got - want).max() <= 3 * (want.max() - want.min()) / 255


def test_role_checks_name_the_valid_methods():
    with pytest.raises(ValueError, match="for activations only"):
        QuantConfig(weights=int8_weights(method="kl"))
    with pytest.raises(ValueError, match="for weights only"):
        QuantConfig(activations=uint8_activations(method="admm"))
    assert Statistic.HISTOGRAM in METHODS["kl"].needs


def test_output_aware_methods_declare_their_samples():
    eq, ce = METHODS["eq"], METHODS["cross_entropy"]
    assert eq.output_aware and ce.output_aware and not METHODS["mse"].output_aware
    assert Statistic.INPUT_SAMPLES in eq.needs and Statistic.HISTOGRAM in ce.needs  # ce starts from mse
    assert eq.activation_range is not None and eq.weight_range is not None and ce.weight_range is None


def test_kl_after_histogram_growth_keeps_uniform_data_unclipped():
    # The second batch doubles the range, halving the histogram's resolution over the data; KL must search at
    # that resolution (re-binning finer created empty-bin combs and absurd clips: regression test).
    spec = uint8_activations(method="kl")
    torch.manual_seed(0)
    obs = _observe(spec, torch.rand(50_000) * 3, torch.rand(50_000) * 6, torch.rand(50_000) * 6)
    lo, hi = kl_range(obs.stats, spec)
    assert float(hi) > 4.5


@pytest.mark.parametrize("seed", range(6))
def test_kl_threshold_matches_reference_on_random_histograms_with_empty_bins(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        bins, levels = int(rng.integers(20, 160)), int(rng.integers(2, 12))
        counts = np.round(rng.exponential(50, bins) * np.exp(-np.arange(bins) / rng.uniform(3, 40))).astype(np.int64)
        counts[rng.random(bins) < 0.2] = 0  # empty bins, and exact ties between thresholds past the data
        if counts.sum() == 0:
            continue
        assert kl_threshold(torch.tensor(counts), levels) == _reference_kl_threshold(counts, levels)


def test_kl_histogram_resolution_follows_the_bit_width():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            -torch.log(torch.rand(200000, generator=g)) * torch.sign(torch.randn(200000, generator=g)),
            torch.tensor([40.0]),
        ]
    )  # Laplace(0, 1) and one far outlier
    thresholds = []
    for bits in (8, 12):
        spec = uint8_activations(method="kl", bits=bits, signed=True, symmetric=True)
        obs = _observe(spec, x)
        assert obs.stats[Statistic.HISTOGRAM].bins == {8: 2048, 12: 32768}[bits]
        thresholds.append(float(kl_range(obs.stats, spec)[1]))
    # Both clip the lone outlier and keep the body (P(|x| > 6) is 0.25% for Laplace(0, 1)).
    assert all(6.0 < t < 40.0 for t in thresholds)


# ---------------------------------------------------------------------------------------- issue 10: edge cases


@pytest.mark.parametrize("value", [0.7, -0.7, 3.0])
@pytest.mark.parametrize("signed", [False, True])
def test_kl_keeps_a_constant_activation(value, signed):
    # A constant 0.7 gave (0.7, 0.125): lo > hi, and the constant clipped to 0.125.
    spec = uint8_activations(method="kl", signed=signed, symmetric=signed)
    lo, hi = kl_range(_observe(spec, torch.full((1000,), value)).stats, spec)
    assert float(lo) <= 0.0 <= float(hi)
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric)
    got = float(qmath.fake_quantize(torch.tensor(value), scale, zp, spec.qmin, spec.qmax))
    assert abs(got - value) <= float(scale) / 2 * (1 + 1e-5)


def test_kl_never_clips_below_the_smallest_magnitude():
    # Two nearby values far from zero: every clip below them scores KL 0, and the tie went to the smallest.
    spec = uint8_activations(method="kl")
    x = torch.cat([torch.full((500,), 0.7), torch.full((500,), 0.71)])
    lo, hi = kl_range(_observe(spec, x).stats, spec)
    assert float(lo) == 0.0 and float(hi) >= 0.7


def _bulk_with_outlier(outlier: float, n: int = 49_152, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[n // 3] = outlier
    return x


@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
@pytest.mark.parametrize("outlier", [1e4, 1e6])
def test_clipping_methods_find_the_bulk_past_one_far_outlier(method, outlier):
    # One value among 49k set the range: all other values fell into one or two codes.  At 1e6 the 2048-bin
    # histogram put the whole bulk into one bin (percentile clipped at 924), and mse never tried a clip below
    # 5% of the observed range.
    x = _bulk_with_outlier(outlier)
    spec = uint8_activations(method=method)
    lo, hi = METHODS[method].activation_range(_observe(spec, x).stats, spec)
    assert -6.0 < float(lo) < -2.0 and 2.0 < float(hi) < 8.0
    bulk = x[x.abs() < 10]
    assert _fq_mse(bulk, float(lo), float(hi), spec) < 1e-3  # the bulk keeps ~8 bits (variance 1)


def test_outlier_in_a_later_batch_keeps_the_bulk_resolution():
    spec = uint8_activations(method="percentile")
    batches = [torch.randn(20_000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batches[2][7] = 1e6
    lo, hi = percentile_range_of(spec, batches)
    assert -5.0 < lo < -2.5 and 2.5 < hi < 5.0


def percentile_range_of(spec, batches):
    from eightbit.calibration.methods import percentile_range

    lo, hi = percentile_range(_observe(spec, *batches).stats, spec)
    return float(lo), float(hi)


def test_histogram_of_ordinary_data_has_no_outlier_tails():
    spec = uint8_activations(method="percentile")
    obs = _observe(spec, torch.randn(10_000), torch.randn(10_000) * 3, torch.rand(10_000) * 40)
    hist = obs.stats[Statistic.HISTOGRAM]
    assert float(hist.counts.sum()) == 30_000 and hist.tail_count() == 0


# Data for the method properties: scaled normal samples, optionally a far outlier, a constant, or zeros.
datasets = st.tuples(
    st.one_of(st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]), st.floats(1e-30, 1e30)),
    st.floats(-3.0, 3.0),  # offset, in units of the scale
    st.sampled_from(["normal", "outlier", "constant", "zeros", "relu"]),
    st.integers(0, 2**16),
)


def _dataset(scale, offset, kind, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=g, dtype=torch.float64)
    if kind == "constant":
        x = torch.zeros_like(x)
    elif kind == "zeros":
        return torch.zeros(4096)
    elif kind == "relu":
        x = x.clamp_min(0)
    elif kind == "outlier":
        x[17] = 1e4
    return ((x + offset) * scale).clamp(-3e38, 3e38).float()


@settings(max_examples=120, deadline=None, derandomize=True)
@given(datasets, st.integers(2, 16), st.booleans(), st.sampled_from(["minmax", "percentile", "mse", "kl"]))
def test_every_activation_method_stays_inside_the_observed_range(data, bits, symmetric, method):
    x = _dataset(*data)
    spec = uint8_activations(method=method, bits=bits, symmetric=symmetric, signed=symmetric)
    obs = _observe(spec, x[:2048], x[2048:])
    lo, hi = (float(v) for v in METHODS[method].activation_range(obs.stats, spec))
    x_lo, x_hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert x_lo <= lo <= 0.0 <= hi <= x_hi
    scale, zp = qmath.qparams_from_range(
        torch.tensor(lo), torch.tensor(hi), qmin=spec.qmin, qmax=spec.qmax, symmetric=symmetric
    )
    assert torch.isfinite(scale) and float(scale) > 0 and spec.qmin <= int(zp) <= spec.qmax


@settings(max_examples=80, deadline=None, derandomize=True)
@given(datasets, st.integers(2, 16), st.sampled_from(["minmax", "percentile", "mse", "admm"]))
def test_every_weight_method_stays_inside_each_channel(data, bits, method):
    w = _dataset(*data)[:1024].reshape(8, 128)
    w[3] = 0.0  # an all-zero channel
    spec = int8_weights(method=method, bits=bits)
    lo, hi = METHODS[method].weight_range(w, spec, 0)
    peak = w.abs().amax(1) * (1 + 1e-6)  # the weight spec is symmetric: its range is within +-max|w|
    if method == "admm":  # a least-squares scale may exceed max|w| / qmax by a fraction of a step
        peak = peak * (1 + 2 / spec.qmax)
    assert (lo <= 0).all() and (hi >= 0).all() and (lo >= -peak).all() and (hi <= peak).all()
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=True)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert float(scale[3]) >= 0.5 * float(scale.min()) or float(scale.max()) <= 1e-37  # zero channel borrows


@pytest.mark.parametrize("signed", [False, True])
def test_kl_keeps_the_full_range_of_a_tensor_too_small_to_estimate_a_distribution(signed):
    # Fuzz seeds 0 and 138: an amax head gives one value per sample and channel (96 values).  With no more occupied
    # bins than levels, every group holds one nonzero bin, Q equals P whatever the threshold, and KL clipped the
    # head's top values (relative error 0.23 against 0.004 for minmax).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, generator=g).abs() * 0.3
    x = x - 0.25 if signed else x
    spec = uint8_activations(method="kl")
    lo, hi = kl_range(_observe(spec, x).stats, spec)
    assert float(lo) == min(float(x.min()), 0.0) and float(hi) == float(x.max())


def test_kl_never_clips_more_than_outliers():
    # Fuzz seeds 6, 135, 149: a hardtanh output, mostly small values and 25% saturated at 1.0, feeding an amax head.
    # KL folded the saturated values into its last bin and clipped at 0.1, moving a quarter of the tensor (exactly
    # what the max head reads) to 0.1.  A clip is for outliers: it keeps at least KL_MAX_CLIPPED of the values.
    # A constant input channel makes the values few and discrete: 25% zeros, 25% at 1.0, the rest in 20 values.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1024), torch.ones(1024), torch.randint(-5, 15, (2048,), generator=g) * 0.01])
    spec = uint8_activations(method="kl")
    lo, hi = kl_range(_observe(spec, x).stats, spec)
    assert float(hi) >= 0.99
