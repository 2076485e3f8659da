import numpy as np
import pytest
import torch

from eightbit.calibration.methods import METHODS, histogram_quantile, lookup_method, percentile_range
from eightbit.calibration.observers import HistogramStats, MinMaxStats, Observer, Statistic
from eightbit.config import uint8_activations


def test_minmax_stats_stream_equals_whole():
    xs = [torch.randn(8, 3, 5) * (i + 1) for i in range(5)]
    s = MinMaxStats()
    for x in xs:
        s.update(x)
    whole = torch.cat(xs)
    assert float(s.lo) == float(whole.min()) and float(s.hi) == float(whole.max())
    per = MinMaxStats(axis=1)
    for x in xs:
        per.update(x)
    assert torch.equal(per.hi, whole.amax(dim=(0, 2)))


def test_histogram_growth_keeps_every_count_and_bounds():
    h = HistogramStats(bins=64)
    batches = [torch.rand(1000), torch.rand(1000) * 10 - 5, torch.rand(1000) * 100]
    for b in batches:
        h.update(b)
    allv = torch.cat(batches)
    assert float(h.counts.sum()) == allv.numel()
    assert h.lo <= float(allv.min()) and h.hi >= float(allv.max())
    # Quantiles of the streamed histogram match numpy within one (final) bin width.
    for q in (0.1, 0.5, 0.9, 0.999):
        assert abs(histogram_quantile(h, q) - np.quantile(allv.numpy(), q)) <= h.width


def test_histogram_merge_matches_single_stream():
    a, b = torch.randn(5000), torch.randn(5000) * 3
    one = HistogramStats(256)
    one.update(a)
    one.update(b)
    left, right = HistogramStats(256), HistogramStats(256)
    left.update(a)
    right.update(b)
    left.merge(right)
    assert float(left.counts.sum()) == float(one.counts.sum())
    assert abs(histogram_quantile(left, 0.99) - histogram_quantile(one, 0.99)) < 2 * left.width


def test_histogram_memory_is_constant():
    h = HistogramStats(128)
    for _ in range(50):
        h.update(torch.randn(10000))
    assert h.counts.numel() == 128


def test_percentile_clips_outliers_minmax_does_not():
    x = torch.cat([torch.rand(100000), torch.tensor([1000.0])])
    spec = uint8_activations(method="percentile", percentile=99.9)
    pct = Observer(spec, None, "t", needs=METHODS["percentile"].needs)
    mm = Observer(uint8_activations(), None, "t")
    pct(x)
    mm(x)
    assert float(mm.stats[Statistic.MINMAX].hi) == 1000.0
    width = pct.stats[Statistic.HISTOGRAM].width
    assert abs(float(percentile_range(pct.stats, spec)[1]) - 0.999) <= width  # resolution of a 2048-bin histogram


def test_observer_rejects_nan_with_a_clear_message():
    obs = Observer(uint8_activations(), None, "tensor 'relu'")
    with pytest.raises(ValueError, match=r"NaN or Inf\) reached tensor 'relu'"):
        obs(torch.tensor([1.0, float("nan")]))


def test_unknown_method_lists_valid_names():
    valid = r"\['admm', 'cross_entropy', 'ema', 'eq', 'kl', 'minmax', 'mse', 'percentile'\]"
    with pytest.raises(ValueError, match="valid methods: " + valid):
        lookup_method("nope")
    assert set(METHODS) >= {"minmax", "percentile"}


@pytest.mark.parametrize("chunk", [7, 1 << 22])
@pytest.mark.parametrize("numel", [1, 5, 4096, 10001])
def test_bin_counts_agree_with_histc(monkeypatch, chunk, numel):
    import eightbit.calibration.observers as observers

    monkeypatch.setattr(observers, "_CHUNK", chunk)  # several chunks, odd sizes, scratch buffers reused
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).relu()
    lo, hi = float(x.min()), float(x.max())
    width = max(hi - lo, 1e-3) / 64 * (1 + 1e-6)
    got = observers.bin_counts(x, lo, width, 64)
    want = torch.histc(x, 64, lo, lo + 64 * width).double()
    assert float(got.sum()) == numel
    # Only values within float rounding of a bin edge may land in the neighbouring bin.
    assert float((got - want).abs().sum()) <= 2 + numel * 1e-4


def test_calibration_frees_the_histogram_scratch_buffers():
    import eightbit.calibration.observers as observers
    from eightbit import QuantConfig, quantize
    from tests.helpers import ResidualNet, calibration_batches

    config = QuantConfig(activations=uint8_activations(method="kl"))
    quantize(ResidualNet().eval(), calibration_batches(), config=config, progress=False)
    assert observers._scratch == {}


def test_histogram_growth_by_a_huge_factor_stays_small_and_exact():
    # Growth used to allocate bins * factor values: a constant first batch and a 1e6-wide second one meant GBs.
    h = HistogramStats(bins=64)
    h.update(torch.zeros(100))
    h.update(torch.randn(1000) * 1e6)
    assert h.counts.numel() == 64 and float(h.counts.sum()) + h.tail_count() == 1100


def test_histogram_growth_matches_padding_and_summing():
    h = HistogramStats(bins=64)
    a, b = torch.rand(1000), torch.rand(1000) * 10 - 5
    h.update(a)
    old_lo, old_width, old = h.lo, h.width, h.counts.clone()
    h.update(b)
    factor = round(h.width / old_width)
    pad = round((old_lo - h.lo) / old_width)
    padded = torch.zeros(64 * factor, dtype=torch.float64)
    padded[pad : pad + 64] = old
    want = padded.reshape(64, factor).sum(1) + torch.histc(b.double(), 64, h.lo, h.hi)
    assert float((h.counts - want).abs().sum()) <= 2  # values on a bin edge may land in the neighbour


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "mse"])
def test_an_empty_tensor_is_skipped_by_every_statistic(method):
    """A decoder's empty KV cache (sequence length 0) reaches an observer: aminmax over it used to crash."""
    needs = lookup_method(method).needs
    observer = Observer(uint8_activations(method=method), None, "cache", needs)
    assert observer(torch.empty(2, 4, 0, 8)).shape == (2, 4, 0, 8)
    assert not observer.observed()
    observer(torch.tensor([[-1.0, 3.0]]))
    observer(torch.empty(0, 2))
    minmax = observer.stats[Statistic.MINMAX]
    assert (float(minmax.lo), float(minmax.hi)) == (-1.0, 3.0) and observer.batches == 1
