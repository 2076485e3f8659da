"""The public API on good and bad input."""

import json
import warnings

import pytest
import torch
from torch import nn

from eightbit import CaptureError, QuantConfig, calibrate, int8_weights, quantize, uint8_activations
from tests.helpers import DepthwiseNet, ResidualNet, calibration_batches


def test_quantized_model_tracks_float_model():
    model = ResidualNet().eval()
    qm = quantize(model, calibration_batches(8), progress=False)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), qm(x)
    assert torch.nn.functional.cosine_similarity(ref, out).min() > 0.98
    assert isinstance(qm, nn.Module) and "graph_module.conv2d_weight_q" in qm.state_dict()


def test_users_model_is_never_modified():
    model = ResidualNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, calibration_batches(), progress=False)
    assert model.training  # mode untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_accepts_generators_dataloaders_and_dicts():
    model = DepthwiseNet().eval()
    gen = (b for b in calibration_batches())
    assert quantize(model, gen, progress=False).weight_encodings
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16)), batch_size=4)
    assert quantize(model, loader, progress=False).weight_encodings  # yields 1-tuples
    dicts = [{"x": b} for b in calibration_batches()]
    assert quantize(model, dicts, progress=False).weight_encodings


def test_uncapturable_model_gets_actionable_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="torch.where or torch.cond"):
        quantize(Branchy(), [torch.randn(2, 4)], progress=False)


def test_empty_calibration_data():
    with pytest.raises(ValueError, match="empty"):
        quantize(DepthwiseNet(), [], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        quantize(DepthwiseNet(), [], example_inputs=torch.randn(1, 3, 16, 16), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data(bad):
    batches = calibration_batches()
    batches[2][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="calibration batch 2 contains NaN or Inf"):
        quantize(DepthwiseNet().eval(), batches, progress=False)


def test_constant_activation_and_all_zero_weight_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.zero_()  # every first-layer output is its bias: a constant activation
        model[0].bias.copy_(torch.tensor([0.0, 0.5, 1.0, -1.0]))
        model[2].weight[1].zero_()  # an all-zero output channel
    qm = quantize(model, calibration_batches(), progress=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), qm(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=0.02)
    out_scale = qm.activation_encodings[max(qm.activation_encodings, key=lambda g: int(g[3:]))].scale[0]
    assert torch.allclose(out[:, 1], ref[:, 1], atol=out_scale / 2 + 1e-6)  # zero channel = its bias, rounded


def test_encodings_round_trip(tmp_path):
    model = ResidualNet().eval()
    qm = quantize(model, calibration_batches(), progress=False)
    path = tmp_path / "enc.json"
    qm.save_encodings(path)
    again = quantize(model, encodings=path, example_inputs=torch.randn(1, 3, 16, 16), progress=False)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(qm(x), again(x))
    with pytest.raises(FileExistsError):
        qm.save_encodings(path)


def test_bad_encodings_files(tmp_path):
    model = ResidualNet().eval()
    example = torch.randn(1, 3, 16, 16)
    with pytest.raises(FileNotFoundError):
        quantize(model, encodings=tmp_path / "missing.json", example_inputs=example)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid eightbit encodings file"):
        quantize(model, encodings=corrupt, example_inputs=example)
    other = quantize(DepthwiseNet().eval(), calibration_batches(), progress=False)
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps(other.encodings()))
    with pytest.raises(ValueError, match="different model or config"):
        quantize(model, encodings=wrong, example_inputs=example)


def test_summary_lists_int8_and_float_ops():
    qm = quantize(ResidualNet().eval(), calibration_batches(), config=QuantConfig(keep_float=("fc",)), progress=False)
    text = qm.summary()
    assert "BatchNorms folded: 1" in text
    assert "linear" in text and "kept float by config" in text


def test_small_calibration_batches_are_merged_without_changing_statistics():
    from eightbit.api import _merge_small_batches

    samples = [(torch.randn(1, 3, 8, 8),) for _ in range(11)]
    merged = list(_merge_small_batches(iter(samples), 8))
    assert [m[0].shape[0] for m in merged] == [8, 3]
    torch.testing.assert_close(torch.cat([m[0] for m in merged]), torch.cat([s[0] for s in samples]))
    # Different trailing shapes (e.g. sequence lengths) are never concatenated; big batches pass through.
    mixed = [(torch.zeros(1, 5),), (torch.zeros(1, 7),), (torch.zeros(9, 7),), (torch.zeros(1, 7),)]
    assert [tuple(m[0].shape) for m in _merge_small_batches(iter(mixed), 8)] == [(1, 5), (1, 7), (9, 7), (1, 7)]


def test_merged_calibration_gives_the_same_ranges_as_one_sample_at_a_time():
    from eightbit import calibrate, uint8_activations

    model = ResidualNet().eval()
    samples = [torch.randn(1, 3, 16, 16) for _ in range(10)]
    merged = quantize(model, samples, progress=False)
    ema = QuantConfig(activations=uint8_activations(method="ema"))
    one_by_one = calibrate(model, samples, config=ema, methods=["minmax"], progress=False)
    reference = one_by_one.quantize(QuantConfig())  # ema keeps the user's batches: no merging
    for group, enc in merged.activation_encodings.items():
        want = reference.activation_encodings[group].range
        assert [*enc.range[0], *enc.range[1]] == pytest.approx([*want[0], *want[1]], rel=1e-6)


def test_misspelled_keep_float_names_are_refused_with_the_closest_names():
    with pytest.raises(ValueError, match=r"'fcc'.*did you mean.*'fc'"):
        quantize(ResidualNet().eval(), calibration_batches(), config=QuantConfig(keep_float=("fcc",)), progress=False)
    qm = quantize(ResidualNet().eval(), calibration_batches(), config=QuantConfig(keep_float=("fc",)), progress=False)
    assert any("kept float" in why for why in qm.placement.float_ops.values())


def _saved_encodings(model=None) -> dict:
    model = model or ResidualNet().eval()
    return quantize(model, calibration_batches(), progress=False).encodings()


def _first_activation(enc: dict) -> dict:
    return next(iter(enc["activations"].values()))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scale", [float("nan")], "scale"),
        ("scale", [0.0], "scale"),
        ("scale", [-0.1], "scale"),
        ("zero_point", [300], "zero point"),
        ("scale", [0.1, 0.1, 0.1], "1 value"),
        ("qmin", 5, "qmin"),
    ],
)
def test_encodings_with_impossible_values_are_refused(field, value, message):
    enc = _saved_encodings()
    _first_activation(enc)[field] = value
    with pytest.raises(ValueError, match=message):
        quantize(ResidualNet().eval(), encodings=enc, example_inputs=torch.randn(1, 3, 16, 16))


def test_malformed_encodings_are_refused_clearly():
    example = torch.randn(1, 3, 16, 16)
    for bad in ({"version": 1, "activations": []}, {"version": 1, "activations": {"g": 3}}, [1, 2]):
        with pytest.raises(ValueError, match="encodings"):
            quantize(ResidualNet().eval(), encodings=bad, example_inputs=example)
    enc = _saved_encodings()
    del _first_activation(enc)["scale"]
    with pytest.raises(ValueError, match="scale"):
        quantize(ResidualNet().eval(), encodings=enc, example_inputs=example)
    enc = _saved_encodings()
    name, weight = next(iter(enc["weights"].items()))
    weight["range"] = [[float("nan")] * len(weight["range"][0]), weight["range"][1]]
    config = QuantConfig(weights=int8_weights(method="eq"), activations=uint8_activations(method="eq"))
    with pytest.raises(ValueError, match=rf"{name}.*range"):
        quantize(ResidualNet().eval(), encodings=enc, example_inputs=example, config=config)


def test_encodings_made_for_other_weights_warn():
    model = ResidualNet().eval()
    enc = _saved_encodings(model)
    assert "weights_fingerprint" in enc
    other = ResidualNet().eval()
    with pytest.warns(UserWarning, match="other weights"):
        quantize(other, encodings=enc, example_inputs=torch.randn(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quantize(model, encodings=enc, example_inputs=torch.randn(1, 3, 16, 16))
        del enc["weights_fingerprint"]  # files saved before fingerprints: accepted as before
        quantize(other, encodings=enc, example_inputs=torch.randn(1, 3, 16, 16))


def _model_state(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _same_state(model: nn.Module, state) -> bool:
    values, training, grads = state
    now = model.state_dict()
    return (
        now.keys() == values.keys()
        and all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in values.items())
        and model.training == training
        and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    )


def _labelled(n=8):
    return [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(n // 4)]


def _failure_paths(tmp_path):
    """(model factory, call that must fail) for each refused input in issue 10."""
    nan_batches = [torch.randn(1, 3, 16, 16) for _ in range(4)]
    nan_batches[2][0, 0, 0, 0] = float("nan")
    bad_enc = _saved_encodings(DepthwiseNet().eval())
    _first_activation(bad_enc)["scale"] = [0.0]
    stale = tmp_path / "stale.pt"
    calibrate(DepthwiseNet().eval(), calibration_batches(), cache=stale, progress=False)
    return [
        lambda m: quantize(m, _labelled(), progress=False),
        lambda m: quantize(m, [(b.abs() * 50).to(torch.uint8) for b in calibration_batches()], progress=False),
        lambda m: quantize(m, [*calibration_batches(2), torch.randn(8, 3, 20, 20)], progress=False),
        lambda m: quantize(m, nan_batches, progress=False),
        lambda m: quantize(m, calibration_batches(), config=QuantConfig(keep_float=("pww",)), progress=False),
        lambda m: quantize(m, encodings=bad_enc, example_inputs=torch.randn(1, 3, 16, 16)),
        lambda m: calibrate(m, calibration_batches(), cache=stale, progress=False),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_users_model_is_unchanged_after_every_refusal(tmp_path, dtype):
    for i, fail in enumerate(_failure_paths(tmp_path)):
        model = DepthwiseNet().train().to(dtype)
        model.stem.weight.requires_grad_(False)
        if i == 6:  # the stale cache: same graph, other weights
            model.pw.weight.data.mul_(2)
        state = _model_state(model)
        with pytest.raises((ValueError, TypeError)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fail(model)
        assert _same_state(model, state), i


def test_saved_weight_ranges_must_match_the_models_layers():
    config = QuantConfig(weights=int8_weights(method="eq"), activations=uint8_activations(method="eq"))
    example = torch.randn(1, 3, 16, 16)
    enc = quantize(ResidualNet().eval(), calibration_batches(), config=config, progress=False).encodings()
    name, weight = next((n, w) for n, w in enc["weights"].items() if w.get("axis") is not None)
    weight["range"] = [weight["range"][0][:3], weight["range"][1][:3]]
    with pytest.raises(ValueError, match=rf"{name}.*3 values"):
        quantize(ResidualNet().eval(), encodings=enc, example_inputs=example, config=config)
    enc["weights"]["no_such_layer"] = enc["weights"].pop(name)
    with pytest.raises(ValueError, match="no_such_layer"):
        quantize(ResidualNet().eval(), encodings=enc, example_inputs=example, config=config)
