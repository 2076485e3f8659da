import json

import pytest
import torch
from torch import nn

from eightbit import AdaRound, Granularity, QuantConfig, int8_weights, quantize
from eightbit.calibration.adaround import (
    Grid,
    annealed_beta,
    initial_logits,
    learn_rounding,
    rectified_sigmoid,
    rounding_from_text,
    rounding_to_text,
)
from eightbit.calibration.encodings import weight_encoding
from tests.helpers import DepthwiseNet, calibration_batches


def _grid(w, bits=4, per_channel=True):
    spec = int8_weights(bits=bits, granularity=Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR)
    return Grid.of(w, weight_encoding(w, spec))


def test_rectified_sigmoid_starts_at_the_remainder_and_reaches_0_and_1():
    r = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(rectified_sigmoid(initial_logits(r)), r, atol=1e-5)
    assert rectified_sigmoid(torch.tensor([-20.0, 20.0])).tolist() == [0.0, 1.0]
    assert annealed_beta(0, 100, 0.2) is None and annealed_beta(20, 100, 0.2) == 20.0
    assert annealed_beta(99, 100, 0.2) == pytest.approx(2.0)


@pytest.mark.parametrize(("bits", "per_channel"), [(4, True), (4, False), (2, True), (8, False)])
def test_learned_rounding_beats_nearest_on_a_random_linear_layer_and_stays_within_one_step(bits, per_channel):
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(512, 32)
    with torch.no_grad():
        y = layer(x)
    grid = _grid(layer.weight.detach(), bits, per_channel)

    def op(inputs, w):
        return nn.functional.linear(inputs, w, layer.bias.detach())

    result = learn_rounding(op, grid, x, y, iterations=300, batch_size=64, out_axis=-1)
    assert result.learned_mse < result.nearest_mse
    nearest_codes = torch.round(layer.weight.detach() / grid.scale).clamp(grid.qmin, grid.qmax)
    learned_codes = torch.round(result.weight / grid.scale)
    assert (learned_codes - nearest_codes).abs().max() <= 1
    assert torch.equal(learned_codes, (grid.floor + result.up.float()).clamp(grid.qmin, grid.qmax))


def test_rounding_text_round_trips():
    up = torch.rand(7, 3, 3, 3) > 0.5
    assert torch.equal(rounding_from_text(rounding_to_text(up), up.shape), up)
    with pytest.raises(ValueError, match="re-run AdaRound"):
        rounding_from_text(rounding_to_text(up), (8, 3, 3, 3))


def _config(per_channel=True):
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    return QuantConfig(weights=int8_weights(bits=4, granularity=granularity), adaround=AdaRound(iterations=30))


@pytest.mark.parametrize("per_channel", [True, False])
def test_adaround_in_the_pipeline_and_encodings_round_trip_exactly(tmp_path, per_channel):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    config = _config(per_channel)
    qm = quantize(model, calibration_batches(), config=config, progress=False)
    assert any("AdaRound: 4 layers" in line for line in qm.summary().splitlines())
    saved = tmp_path / "enc.json"
    qm.save_encodings(saved)
    weights = json.loads(saved.read_text())["weights"]
    assert all(w["rounding"] for w in weights.values())
    x = torch.randn(3, 3, 16, 16)
    again = quantize(model, config=config, encodings=saved, example_inputs=x)
    assert torch.equal(again(x), qm(x))
    assert again.encodings()["weights"] == qm.encodings()["weights"]
    state, state_again = qm.state_dict(), again.state_dict()
    codes = {k: v for k, v in state.items() if k.endswith("_weight_q")}
    assert codes and all(torch.equal(v, state_again[k]) for k, v in codes.items())


def test_adaround_lowers_the_model_error_against_round_to_nearest():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    data = calibration_batches()
    x = torch.cat([b for b in data])
    with torch.no_grad():
        want = model(x)
    nearest = quantize(model, data, config=QuantConfig(weights=int8_weights(bits=4)), progress=False)
    config = QuantConfig(weights=int8_weights(bits=4), adaround=AdaRound(iterations=300, batch_size=16))
    learned = quantize(model, data, config=config, progress=False)
    assert (learned(x) - want).pow(2).mean() < (nearest(x) - want).pow(2).mean()


def test_adaround_config_is_validated():
    with pytest.raises(ValueError, match="iterations"):
        AdaRound(iterations=0)
    with pytest.raises(ValueError, match="power_of_two"):
        QuantConfig(weights=int8_weights(power_of_two=True), adaround=AdaRound())
    with pytest.raises(TypeError, match="AdaRound"):
        QuantConfig(adaround=True)
