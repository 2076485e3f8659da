"""One calibration pass reused across methods, in memory and through the on-disk cache."""

import pytest
import torch

from eightbit import QuantConfig, calibrate, quantize, uint8_activations
from eightbit.analysis.compare import compare_methods, format_results
from tests.helpers import DepthwiseNet, ResidualNet, calibration_batches


class CountingData:
    """An iterable that counts how often the model is fed."""

    def __init__(self):
        self.batches = calibration_batches()
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def test_one_pass_serves_every_collected_method():
    data = CountingData()
    model = ResidualNet().eval()
    example = torch.randn(1, 3, 16, 16)  # so the data is not opened once just to find an example
    cal = calibrate(model, data, example, methods=["kl", "mse", "ema"], progress=False)
    assert data.iterations == 1
    x = torch.randn(2, 3, 16, 16)
    for method in ("minmax", "kl", "mse", "ema"):
        qm = cal.quantize(QuantConfig(activations=uint8_activations(method=method)))
        direct = quantize(model, calibration_batches(), config=qm.config, progress=False)
        assert torch.equal(qm(x), direct(x)), method  # same result as a dedicated run
    assert data.iterations == 1


def test_missing_statistics_and_other_placement_are_refused():
    cal = calibrate(ResidualNet().eval(), calibration_batches(), progress=False)  # minmax only
    with pytest.raises(ValueError, match=r"needs statistics \['histogram'\].*methods=\['kl'\]"):
        cal.quantize(QuantConfig(activations=uint8_activations(method="kl")))
    with pytest.raises(ValueError, match="other placement options"):
        cal.quantize(QuantConfig(keep_float=("fc",)))


def test_cache_on_disk_skips_the_model(tmp_path):
    cache = tmp_path / "stats.pt"
    model = ResidualNet().eval()
    first = calibrate(model, calibration_batches(), methods=["percentile"], cache=cache, progress=False)
    assert cache.exists()
    data = CountingData()
    again = calibrate(
        model, data, example_inputs=torch.randn(1, 3, 16, 16), methods=["percentile"], cache=cache, progress=False
    )
    assert data.iterations == 0
    config = QuantConfig(activations=uint8_activations(method="percentile"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(first.quantize(config)(x), again.quantize(config)(x))
    with pytest.raises(ValueError, match="different model"):
        calibrate(DepthwiseNet().eval(), calibration_batches(), cache=cache, progress=False)


def test_corrupt_cache_is_reported(tmp_path):
    cache = tmp_path / "bad.pt"
    cache.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable eightbit calibration cache"):
        calibrate(ResidualNet().eval(), calibration_batches(), cache=cache, progress=False)


def test_compare_methods_table():
    seconds, results = compare_methods(
        DepthwiseNet().eval(),
        calibration_batches(),
        torch.randn(16, 3, 16, 16),
        methods=("minmax", "kl"),
        weight_methods=("minmax", "mse"),
        progress=False,
    )
    assert seconds > 0 and len(results) == 4
    assert all(0.0 <= r.top1_agreement <= 1.0 and r.mean_kl >= 0 and r.mean_cosine > 0.9 for r in results)
    table = format_results(results, seconds)
    assert "| kl | mse |" in table and "one calibration pass" in table


def test_cache_of_other_weights_is_refused(tmp_path):
    cache = tmp_path / "stats.pt"
    model = ResidualNet().eval()
    calibrate(model, calibration_batches(), cache=cache, progress=False)
    with torch.no_grad():
        model.conv.weight.mul_(3)  # same graph, new weights (fine-tuned, or another checkpoint)
    with pytest.raises(ValueError, match=r"(?i)weights.*differ.*delete"):
        calibrate(model, calibration_batches(), cache=cache, progress=False)


def test_cache_of_another_format_version_is_refused(tmp_path):
    cache = tmp_path / "stats.pt"
    model = ResidualNet().eval()
    calibrate(model, calibration_batches(), cache=cache, progress=False)
    payload = torch.load(cache, weights_only=True)
    payload["version"] = 99
    torch.save(payload, cache)
    with pytest.raises(ValueError, match=r"(?i)format version 99.*delete"):
        calibrate(model, calibration_batches(), cache=cache, progress=False)


def test_weights_fingerprint_is_cheap_and_sensitive():
    import time

    from eightbit.saved import weights_fingerprint

    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)])  # 100 MB, as ResNet-50
    start = time.perf_counter()
    first = weights_fingerprint(model)
    assert time.perf_counter() - start < 2.0
    assert weights_fingerprint(model) == first
    with torch.no_grad():
        model[3].bias[7] += 1e-6
    assert weights_fingerprint(model) != first


def test_compare_methods_takes_input_fn_and_leaves_the_model_in_training_mode():
    model = DepthwiseNet().train()
    pairs = [(x, torch.randint(0, 5, (8,))) for x in calibration_batches()]
    _, results = compare_methods(
        model, pairs, torch.randn(8, 3, 16, 16), methods=("minmax",), input_fn=lambda b: b[0], progress=False
    )
    assert results[0].mean_cosine > 0.9 and model.training
