"""Calibration batches -> model inputs (eightbit.inputs): labels, input_fn, dtypes, shapes, NaN batch indices."""

import warnings

import pytest
import torch
from torch import nn

from eightbit import QuantConfig, calibrate, int8_weights, quantize, uint8_activations
from tests.helpers import DepthwiseNet, calibration_batches


class MaskedNet(nn.Module):
    """A model with an optional second input, as many real models have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x, mask=None):
        y = torch.relu(self.conv(x)).mean((2, 3))
        if mask is not None:
            y = y * mask.float().unsqueeze(1)
        return self.fc(y)


def labelled_loader(n: int = 16, batch: int = 4):
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,)))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def test_labels_bound_to_an_optional_input_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"input_fn=lambda batch: batch\[0\]") as info:
        quantize(MaskedNet().eval(), labelled_loader(), progress=False)
    assert "mask" in str(info.value)


def test_too_many_batch_items_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"2 items.*input_fn=lambda batch: batch\[0\]"):
        quantize(DepthwiseNet().eval(), labelled_loader(), progress=False)


@pytest.mark.parametrize("model_cls", [MaskedNet, DepthwiseNet])
def test_input_fn_selects_the_model_inputs(model_cls):
    model = model_cls().eval()
    qm = quantize(model, labelled_loader(), input_fn=lambda batch: batch[0], progress=False)
    assert qm.input_names == ["x"]
    x = torch.randn(3, 3, 16, 16)
    assert torch.nn.functional.cosine_similarity(qm(x), model(x)).min() > 0.95


def test_input_fn_may_return_a_tuple_or_a_dict_and_reaches_calibrate():
    model = MaskedNet().eval()
    mask = torch.ones(4)
    for fn in (lambda b: (b[0], mask), lambda b: {"x": b[0], "mask": mask}):
        cal = calibrate(model, labelled_loader(), input_fn=fn, progress=False)
        assert cal.quantize().input_names == ["x", "mask"]


def test_input_fn_reaches_the_output_aware_methods():
    config = QuantConfig(
        activations=uint8_activations(method="eq"), weights=int8_weights(method="eq")
    )  # eq replays kept input samples: they must be model inputs, not (x, label) pairs
    qm = quantize(MaskedNet().eval(), labelled_loader(), config=config, input_fn=lambda b: b[0], progress=False)
    assert qm(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_an_integer_timestep_passed_through_input_fn_is_trusted():
    class Timestep(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, t=None):
            return self.fc(x) + (0 if t is None else t.float().unsqueeze(1))

    batches = [(torch.randn(4, 4), torch.randint(0, 9, (4,))) for _ in range(3)]
    with pytest.raises(ValueError, match="input_fn"):
        quantize(Timestep().eval(), batches, progress=False)
    qm = quantize(Timestep().eval(), batches, input_fn=lambda b: b, progress=False)
    assert qm.input_names == ["x", "t"]


def test_float64_batches_are_cast_to_the_models_dtype_with_a_warning():
    model = DepthwiseNet().eval()
    batches = [b.double() for b in calibration_batches()]
    with pytest.warns(UserWarning, match="float64"):
        qm = quantize(model, batches, progress=False)
    x = torch.randn(2, 3, 16, 16)
    assert torch.nn.functional.cosine_similarity(qm(x), model(x)).min() > 0.95


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_image_batches_are_refused_with_the_fix(dtype):
    batches = [(b.abs() * 60).to(dtype) for b in calibration_batches()]
    with pytest.raises(TypeError, match=r"integer.*input_fn=lambda batch: batch.float\(\)"):
        quantize(DepthwiseNet().eval(), batches, progress=False)


def test_integer_batches_after_a_float_first_batch_are_refused():
    batches = calibration_batches()
    batches[2] = (batches[2].abs() * 60).to(torch.uint8)
    with pytest.raises(TypeError, match=r"batch 2.*uint8"):
        quantize(DepthwiseNet().eval(), batches, progress=False)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def test_token_ids_stay_integers():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qm = quantize(Tokens().eval(), [torch.randint(0, 20, (4, 6)) for _ in range(3)], progress=False)
    assert qm(torch.randint(0, 20, (2, 6))).shape == (2, 2)


def test_a_batch_whose_shape_changes_is_named():
    batches = calibration_batches()
    batches[3] = torch.randn(8, 3, 20, 20)
    with pytest.raises(ValueError, match=r"batch 3.*\(8, 3, 20, 20\).*\(8, 3, 16, 16\)"):
        quantize(DepthwiseNet().eval(), batches, progress=False)


def test_a_float_batch_of_another_precision_is_cast_with_a_warning():
    batches = calibration_batches()
    batches[1] = batches[1].half()
    with pytest.warns(UserWarning, match="float16; cast to float32"):
        assert quantize(DepthwiseNet().eval(), batches, progress=False).weight_encodings


def test_batch_size_and_sequence_length_may_change():
    batches = [torch.randn(n, 3, 16, 16) for n in (8, 3, 5)]
    assert quantize(DepthwiseNet().eval(), batches, progress=False).weight_encodings
    tokens = [torch.randint(0, 20, (n, length)) for n, length in ((4, 6), (2, 9), (3, 4))]
    assert quantize(Tokens().eval(), tokens, progress=False).activation_encodings


def test_nan_message_names_the_users_batch_index():
    batches = [torch.randn(1, 3, 16, 16) for _ in range(12)]  # merged into batches of 8 before the model runs
    batches[5][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 5 "):
        quantize(DepthwiseNet().eval(), batches, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_calibrated_in_float32_and_export(dtype, tmp_path):
    model = DepthwiseNet().eval().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="float32") as record:
        qm = quantize(model, [b.to(dtype) for b in calibration_batches()], progress=False)
    assert len([w for w in record if "eightbit" in str(w.message)]) == 1  # said once, not again per input
    assert all(v.dtype == dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "float32" in qm.summary().split("\n\n")[0]
    x = torch.randn(2, 3, 16, 16)
    reference = model.float()(x)
    assert torch.nn.functional.cosine_similarity(qm(x), reference).min() > 0.95
    report = qm.export_onnx(tmp_path / "half.onnx")
    assert report.path.exists()


def test_the_int8_model_of_a_half_model_accepts_half_inputs():
    model = DepthwiseNet().eval().half()
    with pytest.warns(UserWarning, match="float32"):
        qm = quantize(model, [b.half() for b in calibration_batches()], progress=False)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(qm(x.half()), qm(x.half().float()))
