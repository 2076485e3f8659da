"""Output-aware calibration (eq = EasyQuant, cross_entropy): the searches against brute force written here, and
the methods end to end."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eightbit import Granularity, QuantConfig, calibrate, int8_weights, quantize, uint8_activations
from eightbit.analysis.compare import compare_methods, output_metrics
from eightbit.calibration.layerwise import (
    ACTIVATION_FACTORS,
    LOGIT_FACTORS,
    WEIGHT_FACTORS,
    LayerSamples,
    cross_entropy_clip,
    easyquant,
    search_activation_clip,
    search_weight_scales,
)
from eightbit.calibration.methods import weight_minmax
from eightbit.calibration.observers import InputSamples, Statistic
from eightbit.config import OverflowFix, Scheme, seven_bit
from tests.helpers import ConcatNet, DepthwiseNet, ResidualNet, calibration_batches

# Written out independently of qmath/layerwise: asymmetric uint8 for inputs, symmetric per-row for weights.


def _uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = torch.tensor((hi - lo) / 255, dtype=torch.float32)
    zp = torch.clamp(torch.round(torch.tensor(-lo, dtype=torch.float32) / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def _per_row(w: torch.Tensor, bound: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = (bound / qmax).reshape(-1, *[1] * (w.dim() - 1))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _linear_layer(x, w, b, spec=None) -> LayerSamples:
    spec = spec or int8_weights()
    op = lambda x, w: F.linear(x, w, b)  # noqa: E731
    return LayerSamples(op, w, [x], [op(x, w)], -1, spec, weight_minmax(w, spec, 0 if spec.per_channel else None))


def _index(grid: torch.Tensor, value: torch.Tensor) -> int:
    return int(torch.nonzero(grid == value)[0])


def _best(scores, pick: int, maximise: bool = True) -> bool:
    """`pick` is the brute-force optimum, or ties with it to rounding."""
    best = int(np.argmax(scores) if maximise else np.argmin(scores))
    return pick == best or abs(scores[pick] - scores[best]) <= 1e-9 * max(1.0, abs(scores[best]))


def test_input_samples_keep_the_first_samples_only():
    data = torch.arange(40.0).reshape(10, 4)
    samples = InputSamples(5)
    for batch in data.split(3):
        samples.update((batch, None))
    assert samples.count == 5 and [b[0].shape[0] for b in samples.batches] == [3, 2]
    assert torch.equal(torch.cat([b[0] for b in samples.batches]), data[:5]) and samples.batches[0][1] is None


def test_activation_clip_matches_brute_force_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((256, 64))  # heavy tails: a few huge values
    w, b = torch.randn(32, 64) / 8, torch.randn(32) / 10
    layer = _linear_layer(x, w, b)
    lo, hi = x.min(), x.max()
    t, _ = search_activation_clip([layer], lo, hi, uint8_activations())
    wq = _per_row(w, w.abs().amax(1), 127)
    y = F.linear(x, w, b)
    brute = [_cos(F.linear(_uint8(x, float(lo * f), float(hi * f)), wq, b), y) for f in ACTIVATION_FACTORS]
    pick = _index(ACTIVATION_FACTORS, t)
    assert _best(brute, pick)
    assert brute[pick] > brute[-1]  # strictly better than the min/max clip (factor 1.0)


@pytest.mark.parametrize("groups, spec", [(1, int8_weights()), (1, seven_bit(int8_weights())), (6, int8_weights())])
def test_weight_scales_match_per_channel_brute_force(groups, spec):
    torch.manual_seed(1)
    x = torch.randn(8, 6, 10, 10).relu()
    w = torch.distributions.Laplace(0.0, 0.2).sample((6, 6 // groups, 3, 3))
    b = torch.randn(6) / 10
    op = lambda x, w: F.conv2d(x, w, b, stride=2, padding=1, groups=groups)  # noqa: E731
    layer = LayerSamples(op, w, [x[:5], x[5:]], [op(x[:5], w), op(x[5:], w)], 1, spec, weight_minmax(w, spec, 0))
    xq = _uint8(x, 0.0, float(x.max()) * 0.8)
    factors, _ = search_weight_scales(layer, [xq[:5], xq[5:]])
    y, bound = op(x, w), w.abs().flatten(1).amax(1)
    for c in range(6):
        brute = []
        for f in WEIGHT_FACTORS:  # only row c changes: channel c's output depends on nothing else
            wq = _per_row(w, bound, spec.qmax)
            wq[c] = _per_row(w[c : c + 1], bound[c : c + 1] * f, spec.qmax)[0]
            brute.append(_cos(op(xq, wq)[:, c], y[:, c]))
        assert _best(brute, _index(WEIGHT_FACTORS, factors[c])), c


def test_per_tensor_weight_search_scores_the_whole_output():
    torch.manual_seed(2)
    x, w, b = torch.randn(64, 16), torch.randn(8, 16), torch.zeros(8)
    spec = int8_weights(granularity=Granularity.PER_TENSOR, bits=4)
    layer = _linear_layer(x, w, b, spec)
    assert layer.weight_axis is None
    f, _ = search_weight_scales(layer, [x])
    y, bound = F.linear(x, w, b), w.abs().max().expand(8)
    brute = [_cos(F.linear(x, _per_row(w, bound * g, 7), b), y) for g in WEIGHT_FACTORS]
    assert f.dim() == 0 and _best(brute, _index(WEIGHT_FACTORS, f))


def test_easyquant_alternation_never_loses_to_its_start():
    torch.manual_seed(3)
    x = torch.distributions.StudentT(3.0).sample((128, 32))
    w, b = torch.distributions.Laplace(0.0, 0.1).sample((16, 32)), torch.zeros(16)
    layer = _linear_layer(x, w, b, int8_weights(bits=4))
    lo, hi = x.min(), x.max()
    t, (wf,) = easyquant([layer], lo, hi, uint8_activations())
    y = F.linear(x, w, b)
    start = _cos(F.linear(_uint8(x, float(lo), float(hi)), layer.quantized_weight(), b), y)
    found = _cos(F.linear(_uint8(x, float(lo * t), float(hi * t)), layer.quantized_weight(wf), b), y)
    assert found > start and wf.shape == (16,)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(48, 10)
        with torch.no_grad():
            self.fc2.weight.mul_(4)  # confident logits: softmax KL is sensitive to their errors

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _with_outlier(seed: int) -> list[torch.Tensor]:
    """8 batches of 16 Gaussian rows, one of them an outlier (x20) that sets the min/max ranges."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(16, 16, generator=g) for _ in range(8)]
    batches[0][3] *= 20
    return batches


def test_cross_entropy_picks_the_softmax_kl_optimum_and_beats_minmax():
    torch.manual_seed(4)
    model = Classifier().eval()
    data = _with_outlier(4)
    cal = calibrate(model, data, methods=["minmax"], config=_ce(), progress=False)
    qm = cal.quantize(_ce())
    # Brute force over the same grid: fc2's input clip t * [min, max] of the hidden layer over all calibration
    # data, scored on the 32 kept samples (the first two batches) with fc2's weight at max |w| per row.
    with torch.no_grad():
        hidden = [torch.relu(model.fc1(x)) for x in data]
        top = torch.cat(hidden).max()
        h = torch.cat(hidden[:2])
        y, w, b = model.fc2(h), model.fc2.weight, model.fc2.bias
        wq = _per_row(w, w.abs().amax(1), 127)
        kls = [float(_kl(y, F.linear(_uint8(h, 0.0, float(top * t)), wq, b))) for t in LOGIT_FACTORS]
    (enc,) = [e for e in qm.activation_encodings.values() if e.range[0] == [0.0]]  # the only non-negative group
    pick = int(np.argmin([abs(enc.range[1][0] - float(top * t)) for t in LOGIT_FACTORS]))
    assert enc.range[1][0] == pytest.approx(float(top * LOGIT_FACTORS[pick]), rel=1e-6)
    assert _best(kls, pick, maximise=False)
    minmax = cal.quantize(QuantConfig(overflow_fix=OverflowFix.DISABLE))
    held_out = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        want = model(held_out)
        assert output_metrics(want, qm(held_out))[1] <= output_metrics(want, minmax(held_out))[1]


class SoftmaxClassifier(Classifier):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=-1)


def test_cross_entropy_finds_the_logits_layer_behind_a_softmax():
    model = SoftmaxClassifier().eval()
    data = _with_outlier(5)
    qm = quantize(model, data, config=_ce(), progress=False)
    mse = quantize(model, data, config=replace(_ce(), activations=uint8_activations(method="mse")), progress=False)
    (searched,) = [g for g, e in qm.activation_encodings.items() if e.range != mse.activation_encodings[g].range]
    assert qm.activation_encodings[searched].range[0] == [0.0]  # fc2's input (after the ReLU)


def _ce() -> QuantConfig:
    return QuantConfig(activations=uint8_activations(method="cross_entropy"), overflow_fix=OverflowFix.DISABLE)


def _kl(reference, candidate) -> torch.Tensor:
    p, q = torch.softmax(reference.double(), 1), torch.softmax(candidate.double(), 1)
    return (p * (p / q).log()).sum(1).mean()


def test_cross_entropy_clip_minimises_kl_directly():
    torch.manual_seed(5)
    x = torch.rand(64, 24) ** 4 * 10  # mostly small, a long upper tail
    w, b = torch.randn(10, 24), torch.zeros(10)
    layer = _linear_layer(x, w, b)
    t, scores = cross_entropy_clip([layer], torch.tensor(0.0), x.max(), uint8_activations())
    wq = _per_row(w, w.abs().amax(1), 127)
    brute = [float(_kl(F.linear(x, w, b), F.linear(_uint8(x, 0.0, float(x.max() * f)), wq, b))) for f in LOGIT_FACTORS]
    assert _best(brute, _index(LOGIT_FACTORS, t), maximise=False)
    assert np.allclose(scores.numpy(), brute, rtol=1e-6, atol=1e-12)


def _eq() -> QuantConfig:
    # The default overflow fix: 7-bit GEMM weights on CPUs without VNNI, where ONNX Runtime would saturate.
    return QuantConfig(activations=uint8_activations(method="eq"), weights=int8_weights(method="eq"))


def test_eq_end_to_end_exports_with_ort_parity(tmp_path):
    model = DepthwiseNet().eval()
    qm = quantize(model, calibration_batches(), config=_eq(), progress=False)
    report = qm.export_onnx(tmp_path / "eq.onnx")
    assert report.parity.max_steps < 3
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert F.cosine_similarity(model(x), qm(x)).min() > 0.95
    # The search moved scales off their max-based start (which it may also keep, channel by channel).
    start = quantize(model, calibration_batches(), progress=False)
    assert any(qm.weight_encodings[k].scale != start.weight_encodings[k].scale for k in qm.weight_encodings)
    moved = [k for k, e in start.activation_encodings.items() if qm.activation_encodings[k].scale != e.scale]
    assert moved


class SamePadNet(nn.Module):
    """TF-style 'same' padding (an explicit asymmetric pad before a stride-2 conv): captured as conv2d_padded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _concat_layers(model):
    return [(m, lambda x, w, m=m: F.conv2d(x, w, m.bias, padding=m.padding)) for m in (model.a, model.b)]


def _same_pad_layers(model):
    return [(model.conv, lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, model.conv.bias, stride=2))]


@pytest.mark.parametrize(
    "net, layers",
    [(ConcatNet, _concat_layers), (SamePadNet, _same_pad_layers)],
    ids=["shared-group", "conv2d_padded"],
)
def test_eq_input_clip_matches_brute_force_on_the_model(net, layers):
    # ConcatNet's input feeds two convs (a, b): one clip for both, chosen by their summed output cosine.
    # SamePadNet's conv is searched on inputs padded once: the same values as padding each candidate.
    model = net().eval()
    config = QuantConfig(activations=uint8_activations(method="eq"), overflow_fix=OverflowFix.DISABLE)
    data = calibration_batches()
    qm = quantize(model, data, config=config, progress=False)
    x = torch.cat(data)  # all 32 samples are kept
    lo, hi = x.min(), x.max()
    (enc,) = [e for e in qm.activation_encodings.values() if "x" in e.tensors]
    with torch.no_grad():
        scores = []
        for t in ACTIVATION_FACTORS:
            xq = _uint8(x, float(lo * t), float(hi * t))
            total = 0.0
            for conv, op in layers(model):
                wq = _per_row(conv.weight, conv.weight.abs().flatten(1).amax(1), 127)
                total += _cos(op(xq, wq), op(x, conv.weight))
            scores.append(total)
    pick = int(np.argmin([abs(enc.range[1][0] - float(hi * t)) for t in ACTIVATION_FACTORS]))
    assert enc.range[1][0] == pytest.approx(float(hi * ACTIVATION_FACTORS[pick]), rel=1e-6)
    assert _best(scores, pick)
    assert net is not SamePadNet or any("conv2d_padded" in str(n.target) for n in qm.graph_module.graph.nodes)


def test_eq_weights_respect_the_overflow_fix_code_range():
    config = QuantConfig(weights=int8_weights(method="eq"), overflow_fix=OverflowFix.ENABLE)
    qm = quantize(DepthwiseNet().eval(), calibration_batches(), config=config, progress=False)
    depthwise = {k for k, e in qm.weight_encodings.items() if e.qmax == 127}
    assert len(depthwise) == 1 and all(e.qmax == 63 for k, e in qm.weight_encodings.items() if k not in depthwise)
    buffers = dict(qm.graph_module.named_buffers())
    for name, enc in qm.weight_encodings.items():
        codes = buffers[f"{name}_weight_q"].int()
        assert codes.abs().max() <= enc.qmax


def test_eq_calibration_cache_and_saved_encodings_reproduce_the_model(tmp_path):
    model, config = ResidualNet().eval(), _eq()
    first = calibrate(model, calibration_batches(), config=config, cache=tmp_path / "s.pt", progress=False)
    assert Statistic.INPUT_SAMPLES in first.collected and first.samples.count == 32
    again = calibrate(model, [], torch.randn(1, 3, 16, 16), config=config, cache=tmp_path / "s.pt", progress=False)
    x = torch.randn(4, 3, 16, 16)
    qm = first.quantize()
    assert torch.equal(qm(x), again.quantize()(x))
    qm.save_encodings(tmp_path / "eq.json")
    reused = quantize(model, encodings=tmp_path / "eq.json", example_inputs=x, config=config)
    assert torch.equal(qm(x), reused(x))


def test_compare_methods_lists_output_aware_pairs():
    _, results = compare_methods(
        DepthwiseNet().eval(),
        calibration_batches(),
        torch.randn(16, 3, 16, 16),
        methods=("minmax", "cross_entropy"),
        extra_pairs=(("eq", "eq"),),
        progress=False,
        input_samples=8,
    )
    assert [(r.activation_method, r.weight_method) for r in results] == [
        ("minmax", "minmax"),
        ("cross_entropy", "minmax"),
        ("eq", "eq"),
    ]
    assert all(r.mean_cosine > 0.9 for r in results)


def test_output_aware_errors(tmp_path):
    with pytest.raises(ValueError, match="for activations only"):
        QuantConfig(weights=int8_weights(method="cross_entropy"))
    with pytest.raises(ValueError, match="power_of_two"):
        QuantConfig(activations=uint8_activations(method="eq", power_of_two=True))
    with pytest.raises(ValueError, match="uniform"):
        QuantConfig(weights=int8_weights(method="eq", scheme=Scheme.LOG2))
    with pytest.raises(ValueError, match="per-tensor activations"):
        QuantConfig(activations=uint8_activations(method="eq", granularity=Granularity.PER_CHANNEL))
    with pytest.raises(ValueError, match=">= 1"):
        calibrate(DepthwiseNet().eval(), calibration_batches(), config=_eq(), input_samples=0, progress=False)
    model = DepthwiseNet().eval()
    # A cache written without samples cannot serve eq, even when eq is asked for later.
    calibrate(model, calibration_batches(), cache=tmp_path / "plain.pt", progress=False)
    cached = calibrate(model, calibration_batches(), methods=["eq"], cache=tmp_path / "plain.pt", progress=False)
    with pytest.raises(ValueError, match=r"needs statistics \['input_samples'\]"):
        cached.quantize(_eq())
    cal = calibrate(model, calibration_batches(), config=_eq(), progress=False)
    cal.samples.batches.clear()  # as if the data had yielded no samples
    with pytest.raises(ValueError, match="kept none"):
        cal.quantize()
    ce_without_int8_head = QuantConfig(activations=uint8_activations(method="cross_entropy"), keep_float=("fc",))
    with pytest.raises(ValueError, match="producing the model's output"):
        quantize(model, calibration_batches(), config=ce_without_int8_head, progress=False)
