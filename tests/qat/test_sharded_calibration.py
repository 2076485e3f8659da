"""Sharded calibration: 2 gloo ranks, each calibrating on half of the data, merge to one pass's encodings."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eightbit
from eightbit.calibration.methods import histogram_quantile
from eightbit.calibration.observers import HistogramStats, Statistic
from eightbit.qat.distributed import merge_calibration
from tests.helpers import ResidualNet, calibration_batches

PERCENTILE = eightbit.QuantConfig(activations=eightbit.uint8_activations(method="percentile"))


def _model():
    torch.manual_seed(0)
    return ResidualNet().eval()


def _widths(calibration) -> dict[str, float]:
    return {g: o.stats[Statistic.HISTOGRAM].width for g, o in calibration._observers.items()}


def _worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shard = calibration_batches(n=4)[rank::world]
        calibration = eightbit.calibrate(_model(), shard, methods=["percentile"], progress=False)
        widths = _widths(calibration)
        merge_calibration(calibration)
        result = {
            "minmax": calibration.quantize().encodings(),
            "percentile": calibration.quantize(PERCENTILE).encodings(),
            "rank_widths": widths,
            "merged_widths": _widths(calibration),
        }
        ema = eightbit.calibrate(_model(), shard, methods=["ema"], progress=False)
        try:
            merge_calibration(ema)
        except ValueError as exc:
            result["ema_error"] = str(exc)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_shards_give_the_encodings_of_one_pass(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    calibration = eightbit.calibrate(_model(), calibration_batches(n=4), methods=["percentile"], progress=False)
    single = json.loads(json.dumps(calibration.quantize().encodings()))
    for key in ("minmax", "percentile", "merged_widths"):
        assert ranks[0][key] == ranks[1][key], key
    for kind in ("activations", "weights"):
        for name, enc in single[kind].items():
            got = ranks[0]["minmax"][kind][name]
            assert got["scale"] == enc["scale"] and got["zero_point"] == enc["zero_point"], name
            if enc.get("mean") is not None:
                assert torch.allclose(torch.tensor(got["mean"]), torch.tensor(enc["mean"]), atol=1e-6), name

    # Percentile ranges: each end within the documented bound (merged bin + widest rank bin + the single pass's own
    # bin), i.e. the bins' resolution, so the range's width (scale times the number of steps) within twice that.
    single_widths = _widths(calibration)
    for name, enc in calibration.quantize(PERCENTILE).encodings()["activations"].items():
        got = ranks[0]["percentile"]["activations"][name]
        bound = ranks[0]["merged_widths"][name] + max(r["rank_widths"][name] for r in ranks) + single_widths[name]
        assert abs(got["scale"][0] - enc["scale"][0]) * (enc["qmax"] - enc["qmin"]) <= 2 * bound, name

    for r in ranks:  # moving averages cannot be sharded: a clear error on every rank, before any exchange
        assert "ema" in r["ema_error"] and "order of the batches" in r["ema_error"]


def _histogram(values: torch.Tensor, bins: int = 256) -> HistogramStats:
    hist = HistogramStats(bins)
    for chunk in values.split(1000):
        hist.update(chunk)
    return hist


def test_rebinning_onto_a_grid_grown_from_the_histogram_is_exact():
    g = torch.Generator().manual_seed(0)
    hist = _histogram(torch.randn(5000, generator=g))
    grown = HistogramStats(hist.bins)
    grown.lo, grown.width = hist.lo, hist.width
    grown._cover(hist.lo - 7.3, hist.hi + 20.0)  # whole-bin padding, power-of-two widening
    exact = HistogramStats(hist.bins)
    exact.lo, exact.width, exact.counts = hist.lo, hist.width, hist.counts.clone()
    exact._cover(hist.lo - 7.3, hist.hi + 20.0)  # the observers' own exact regrouping
    assert (grown.lo, grown.width) == (exact.lo, exact.width)
    assert torch.allclose(hist.rebinned(grown.lo, grown.width), exact.counts, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_merged_histogram_quantiles_stay_within_the_documented_bound(seed):
    """Two shards with unrelated grids, merged as `merge_calibration` does: every quantile within (merged bin
    width + widest shard bin width) of the exact quantile of all the values."""
    g = torch.Generator().manual_seed(seed)
    shards = [torch.randn(4000, generator=g) * 2 + 1, torch.randn(3000, generator=g).exp()]
    parts = [_histogram(s) for s in shards]
    widest = max(parts, key=lambda h: h.width)
    merged = HistogramStats(widest.bins)
    merged.lo, merged.width = widest.lo, widest.width
    merged._cover(min(h.lo for h in parts), max(h.hi for h in parts))
    merged.counts = sum(h.rebinned(merged.lo, merged.width) for h in parts)
    values = torch.cat(shards).double()
    assert float(merged.counts.sum()) == pytest.approx(values.numel())
    bound = merged.width + widest.width
    for q in (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999):
        assert abs(histogram_quantile(merged, q) - float(torch.quantile(values, q))) <= bound, q
