"""convert: int8 weights and int32 biases in the graph (issue 10: biases that int32 cannot hold)."""

import torch
from torch import nn

from eightbit import Granularity, QuantConfig, int8_weights, quantize, uint8_activations


class TinyInputNet(nn.Module):
    """Linear -> ReLU -> Linear; the first layer's bias (1.0) dwarfs its inputs (~1e-5)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        with torch.no_grad():
            self.a.weight.copy_(0.1 * torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, -1], [-1, 1, 1, -1], [1, 1, 1, 1]]))
            self.a.bias.fill_(1.0)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _tiny_inputs(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) * 1e-5 for _ in range(n)]


PER_TENSOR = QuantConfig(weights=int8_weights(granularity=Granularity.PER_TENSOR))


def test_bias_beyond_int32_raises_the_weight_scale_instead_of_wrapping():
    # input scale ~1.6e-7 x weight scale ~7.9e-4: bias 1.0 needs ~8e9 codes.  It used to saturate, wrap to
    # -2^31 and come out as -0.27.  Per-channel weights: the weight scales grow until the bias fits.
    model = TinyInputNet().eval()
    data = _tiny_inputs()
    qm = quantize(model, data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        want, got = model(x), qm(x)
        hidden = torch.relu(model.a(x))
    assert float(hidden.min()) > 0.9  # the bias dominates: every hidden value is ~1.0
    assert torch.allclose(got, want, atol=0.02 * float(want.abs().max()))
    biases = [b for n, b in qm.graph_module.named_buffers() if n.endswith("_bias_q")]
    assert len(biases) == 2 and all(int(b.abs().max()) < 2**31 - 1 for b in biases)
    assert "bias kept in float" not in qm.summary()


def test_bias_beyond_int32_with_one_weight_scale_stays_float_and_exports(tmp_path):
    # A per-tensor weight scale cannot grow for one channel: the bias stays float (added after the layer) and
    # summary() says so.
    model = TinyInputNet().eval()
    data = _tiny_inputs()
    qm = quantize(model, data, config=PER_TENSOR, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        want, got = model(x), qm(x)
    assert torch.allclose(got, want, atol=0.02 * float(want.abs().max()))
    assert "note: linear: bias kept in float" in qm.summary()
    assert not any(n.startswith("linear_bias_q") for n, _ in qm.graph_module.named_buffers())
    # The float bias exports and matches ONNX Runtime (a float bias read by Gemm itself did not: ORT's QDQ
    # fusion converted it to int32 again, where it overflowed).
    report = qm.export_onnx(tmp_path / "tiny.onnx")
    assert report.parity.max_steps <= 2


def test_ordinary_biases_are_still_int32_and_unreported():
    from tests.helpers import ResidualNet, calibration_batches

    qm = quantize(ResidualNet().eval(), calibration_batches(), progress=False)
    biases = {n: b for n, b in qm.graph_module.named_buffers() if n.endswith("_bias_q")}
    assert biases and all(b.dtype == torch.int32 for b in biases.values())
    assert "bias kept in float" not in qm.summary()


def test_admm_zero_weight_channel_keeps_its_bias():
    # An all-zero output channel got scale 1e-14 from admm (the borrowed-scale fallback never applied), and its
    # bias 0.5 came back as -3.4e-7 (int32 overflow at input_scale x 1e-14).
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.5
    data = [torch.randn(8, 6) for _ in range(4)]
    config = QuantConfig(weights=int8_weights(method="admm"), activations=uint8_activations())
    qm = quantize(model, data, config=config, progress=False)
    scales = qm.weight_encodings[next(iter(qm.weight_encodings))].scale
    assert scales[1] > 0.1 * min(scales[0], scales[2])  # borrowed, not 1e-14
    x = torch.cat(data)
    with torch.no_grad():
        want, got = model(x), qm(x)
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


def test_conv_bias_beyond_int32_stays_float_and_exports(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 2, 8, 8, generator=g) * 1e-5 for _ in range(3)]
    qm = quantize(model, data, config=PER_TENSOR, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        want, got = model(x), qm(x)
    assert torch.allclose(got, want, atol=0.02 * float(want.abs().max()))
    assert "bias kept in float" in qm.summary()
    assert qm.export_onnx(tmp_path / "conv.onnx").parity.max_steps <= 2


def test_a_nearly_dead_channel_gets_a_coarser_weight_scale_not_a_float_bias(tmp_path):
    # BatchNorm folding leaves channels with weights ~1e-9 and an ordinary bias: at input_scale x 1e-11 the bias
    # needs ~1e11 codes.  Raising that channel's weight scale keeps the int32 bias (and the runtimes' fusion).
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[2] = 1e-9 * torch.randn(3, 3, 3)
        model[0].bias[2] = 3.0
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    qm = quantize(model, data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        want, got = model(x), qm(x)
    assert torch.allclose(got, want, atol=0.03 * float(want.abs().max()))
    assert "bias kept in float" not in qm.summary()
    biases = [b for n, b in qm.graph_module.named_buffers() if n.endswith("_bias_q")]
    assert len(biases) == 2 and all(b.abs().max() < 2**31 - 1 for b in biases)
    assert qm.export_onnx(tmp_path / "dead.onnx").parity.max_steps <= 2


def test_bias_of_an_all_zero_layer_on_an_all_zero_input_survives():
    # Fuzz seed 38: a layer whose weights are all zero (a folded BN with gamma 0, a zeroed channel) reads a tensor
    # that is all zeros.  Both scales were placeholders (1.0), so the bias scale was 1.0 and the bias 0.44 became
    # code 0: the layer's output, and the model's, silently lost its constant.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Flatten()).eval()
    model[0].weight.data.zero_()
    model[0].bias.data = torch.tensor([0.44, -0.3])
    data = [torch.zeros(4, 2, 5, 5) for _ in range(2)]
    qm = quantize(model, data, progress=False)
    with torch.no_grad():
        assert torch.allclose(qm(data[0]), model(data[0]), atol=0.01)
