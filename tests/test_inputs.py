"""Calibration batches -> model inputs (eightbit.inputs): labels, input_fn, dtypes, shapes, NaN batch indices."""

import collections
import dataclasses
import warnings

import onnx
import pytest
import torch
from torch import nn

from eightbit import QuantConfig, calibrate, int8_weights, quantize, uint8_activations
from eightbit.graph.capture import CaptureError
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


# --- binding by name: dicts, keywords, **kwargs, constants, structured outputs ----------------------------------


class KwargsEncoder(nn.Module):
    """The shape of every transformers 5.x forward(): named optional inputs and **kwargs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids=None, attention_mask=None, output_attentions: bool = False, **kwargs):
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        h = self.fc(self.emb(input_ids)) * attention_mask.unsqueeze(-1).float()
        return {"last_hidden_state": h, "pooled": h.mean(1) * kwargs.get("scale", 1.0)}


def _token_batches(n: int = 3):
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 20, (4, 6), generator=g), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
        for _ in range(n)
    ]


def test_a_dict_binds_by_name_into_a_kwargs_forward_and_outputs_keep_their_keys(tmp_path):
    """Dict keys went nowhere for a forward(..., **kwargs): input_ids stayed None."""
    model = KwargsEncoder().eval()
    batches = _token_batches()
    qm = quantize(model, batches, progress=False)
    assert qm.input_names == ["input_ids", "attention_mask"]
    out = qm(**batches[0])
    assert set(out) == {"last_hidden_state", "pooled"}
    cos = torch.nn.functional.cosine_similarity(out["pooled"], model(**batches[0])["pooled"])
    assert cos.min() > 0.95
    qm.export_onnx(tmp_path / "kw.onnx")
    graph = onnx.load(tmp_path / "kw.onnx").graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooled"]


def test_inputs_given_through_kwargs_reach_forward_and_stay_constants_when_not_tensors():
    model = KwargsEncoder().eval()
    batches = [{**b, "scale": 2.0} for b in _token_batches()]
    qm = quantize(model, batches, progress=False)
    assert qm.input_names == ["input_ids", "attention_mask"] and qm.call_plan.constants == {"scale": 2.0}
    want = model(**batches[0])["pooled"]
    assert torch.nn.functional.cosine_similarity(qm(**batches[0])["pooled"], want).min() > 0.95
    with pytest.raises(ValueError, match=r"scale=3.0.*fixed at capture as 2.0"):
        qm(**{**batches[0], "scale": 3.0})


def test_an_input_the_model_does_not_use_is_named():
    batches = [{**b, "token_type_ids": torch.zeros(4, 6, dtype=torch.long)} for b in _token_batches()]
    with pytest.raises(ValueError, match=r"\['token_type_ids'\].*\*\*kwargs.*does not use"):
        quantize(KwargsEncoder().eval(), batches, progress=False)


def test_a_misspelled_key_says_the_input_form_is_wrong_not_the_tracing():
    batches = [{"input_id": b["input_ids"], "attention_mask": b["attention_mask"]} for b in _token_batches()]
    with pytest.raises(CaptureError, match=r"input_id.*input form") as info:
        quantize(KwargsEncoder().eval(), batches, progress=False)
    assert "traceable" not in str(info.value)


def test_a_missing_tensor_input_is_named_on_the_int8_model():
    qm = quantize(KwargsEncoder().eval(), _token_batches(), progress=False)
    with pytest.raises(TypeError, match=r"lacks the input \['attention_mask'\]"):
        qm(input_ids=_token_batches()[0]["input_ids"])


class Embedder(nn.Module):
    """A non-tensor default argument, as in `forward(x, embed=False)`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, embed=False):
        features = torch.relu(self.conv(x)).mean((2, 3))
        return features if embed else self.fc(features)


def test_a_non_tensor_default_is_a_constant_never_required_again():
    """qm(x) used to fail with a torch.export tree-spec error (the bool had become a required input)."""
    model = Embedder().eval()
    x = torch.randn(2, 3, 16, 16)
    for batches, embed in (
        ([b for b in calibration_batches()], False),
        ([(b, True) for b in calibration_batches()], True),
    ):
        qm = quantize(model, batches, input_fn=lambda b: b, progress=False)
        assert qm.input_names == ["x"]
        assert qm(x).shape == model(x, embed).shape  # left out: the value it was captured with
        assert qm(x, embed=embed).shape == model(x, embed).shape  # repeated: fine
        with pytest.raises(ValueError, match=rf"embed={not embed}.*captur.*as {embed}"):
            qm(x, not embed)


def test_a_constant_that_changes_between_batches_is_refused_with_the_batch():
    batches = [(b, i == 2) for i, b in enumerate(calibration_batches())]
    with pytest.raises(ValueError, match=r"calibration batch 2 passes embed=True.*fixed at capture as False"):
        quantize(Embedder().eval(), batches, input_fn=lambda b: b, progress=False)


@dataclasses.dataclass
class Heads:
    logits: torch.Tensor
    features: torch.Tensor


class DataclassOut(Embedder):
    def forward(self, x, config=None):
        features = torch.relu(self.conv(x)).mean((2, 3))
        return Heads(logits=self.fc(features) * config["temperature"], features=features)


def test_dataclass_outputs_and_config_objects(tmp_path):
    model = DataclassOut().eval()
    config = {"temperature": 0.5}  # a config object: a constant of the capture, by identity
    batches = [{"x": b, "config": config} for b in calibration_batches()]
    qm = quantize(model, batches, progress=False)
    x = torch.randn(2, 3, 16, 16)
    out = qm(x)
    assert isinstance(out, Heads) and out.logits.shape == (2, 4)
    assert torch.nn.functional.cosine_similarity(out.logits, model(x, config).logits).min() > 0.95
    qm.export_onnx(tmp_path / "heads.onnx")
    graph = onnx.load(tmp_path / "heads.onnx").graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["logits", "features"]


def test_a_mapping_that_is_not_a_dict_binds_by_name():
    """A tokenizer's BatchEncoding is a UserDict, not a dict: it was taken for one positional input."""
    batches = [collections.UserDict(b) for b in _token_batches()]
    qm = quantize(KwargsEncoder().eval(), batches, progress=False)
    assert qm.input_names == ["input_ids", "attention_mask"]


class Settings:
    """A config object without __eq__: compared by identity."""

    scale = 0.5


class Scaled(Embedder):
    def forward(self, x, settings=None):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * settings.scale


def test_a_config_object_stays_the_users_object_through_calibrate_then_quantize():
    settings = Settings()
    cal = calibrate(Scaled().eval(), [{"x": b, "settings": settings} for b in calibration_batches()], progress=False)
    qm = cal.quantize()  # quantize() works on a copy of the calibration: the constant must still be `settings`
    assert qm(torch.randn(2, 3, 16, 16), settings=settings).shape == (2, 4)
    with pytest.raises(ValueError, match="fixed at capture"):
        qm(torch.randn(2, 3, 16, 16), settings=Settings())


def test_a_model_on_the_meta_device_is_refused_with_what_to_do():
    """A model built on the meta device has no weights: quantizing it used to fail deep in capture."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="meta device.*load its weights"):
        quantize(model, [torch.randn(2, 4)], progress=False)


def test_float32_model_copies_a_model_off_the_accelerator_and_leaves_it_there(monkeypatch):
    """The CPU copy is made for models that are not on the CPU (seen: a CUDA model raised 'Expected all tensors
    to be on the same device'); no accelerator here, so the device report is faked and the copy checked."""
    from eightbit import inputs

    model = nn.Linear(4, 2)
    real = torch.Tensor.device

    def fake_device(self):
        return torch.device("cuda:0") if self is model.weight else real.__get__(self)

    monkeypatch.setattr(torch.Tensor, "device", property(fake_device))
    with pytest.warns(UserWarning, match="CPU copy"):
        copied, note, half = inputs.float32_model(model)
    monkeypatch.undo()
    assert copied is not model and half is None and "cuda:0" in note
    assert torch.equal(copied.weight, model.weight)
