import torch
import torch.nn.functional as F

from eightbit.graph.transforms.bias_correction import bias_shift, padded_bias_shift


def _conv_mean(x, error, pads, stride=1, groups=1):
    top, left, bottom, right = pads
    out = F.conv2d(F.pad(x, [left, right, top, bottom]), error, None, stride, 0, 1, groups)
    return out.double().mean(dim=(0, 2, 3))


def test_bias_shift_is_the_mean_output_error_of_a_linear_and_an_unpadded_conv():
    torch.manual_seed(0)
    mean = torch.rand(6) * 3
    x = mean.reshape(1, 6, 1, 1).expand(2, 6, 5, 5)
    error = torch.randn(4, 6, 3, 3) * 1e-2
    assert torch.allclose(bias_shift(error, mean), _conv_mean(x, error, (0, 0, 0, 0)), atol=1e-6)
    linear_error = torch.randn(4, 6) * 1e-2
    assert torch.allclose(bias_shift(linear_error, mean), (linear_error.double() @ mean.double()), atol=1e-9)


def test_padded_bias_shift_counts_only_the_taps_inside_the_image():
    torch.manual_seed(0)
    mean = torch.rand(8) * 3
    for size, kernel, pad, stride, groups in [(7, 5, 2, 1, 8), (7, 3, 1, 2, 8), (9, 3, 1, 1, 1), (6, 3, 0, 1, 1)]:
        error = torch.randn(8, 8 // groups, kernel, kernel) * 1e-2
        pads = (pad, pad, pad, pad)
        x = mean.reshape(1, 8, 1, 1).expand(1, 8, size, size)
        want = _conv_mean(x, error, pads, stride, groups)
        got = padded_bias_shift(
            error, mean, (size, size), stride=(stride, stride), padding=pads, dilation=(1, 1), groups=groups
        )
        assert torch.allclose(got, want, atol=1e-9)
        if pad == 0:  # no padding: the same as the plain formula
            assert torch.allclose(got, bias_shift(error, mean, groups), atol=1e-9)


def test_padded_bias_shift_matches_random_data_where_the_plain_formula_overcorrects():
    torch.manual_seed(1)
    mean = torch.rand(4) + 1
    x = mean.reshape(1, 4, 1, 1) + 0.3 * torch.randn(256, 4, 7, 7)
    error = torch.randn(4, 1, 5, 5) * 1e-2
    want = _conv_mean(x, error, (2, 2, 2, 2), groups=4)
    got = padded_bias_shift(error, mean, (7, 7), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(1, 1), groups=4)
    plain = bias_shift(error, mean, groups=4)
    assert (got - want).abs().max() < 0.2 * (plain - want).abs().max()


class _PaddedDepthwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def _mean_error(model, data, x, monkeypatch, padded: bool):
    from eightbit import QuantConfig, int8_weights, quantize, uint8_activations
    from eightbit.graph.transforms import bias_correction

    if not padded:
        monkeypatch.setattr(bias_correction, "_padded_conv_geometry", lambda node: None)
    config = QuantConfig(weights=int8_weights(bits=3), activations=uint8_activations(bits=16), quantize_outputs=True)
    qm = quantize(model, data, config=config, progress=False)
    monkeypatch.undo()
    with torch.no_grad():
        return (qm(x) - model(x)).mean(dim=(0, 2, 3)).abs().mean()


def test_bias_correction_in_the_pipeline_accounts_for_zero_padding(monkeypatch):
    torch.manual_seed(0)
    model = _PaddedDepthwise().eval()
    data = [torch.rand(8, 8, 7, 7) + 1 for _ in range(4)]  # positive inputs: padding lowers the mean a lot
    x = torch.cat(data)
    padded = _mean_error(model, data, x, monkeypatch, padded=True)
    plain = _mean_error(model, data, x, monkeypatch, padded=False)
    assert padded < 0.1 * plain
