import torch
from torch import nn

from eightbit.graph.capture import capture
from eightbit.graph.transforms import fold_batchnorm, fold_bn
from eightbit.graph.transforms.fold_bn import fold_affine_into_next
from eightbit.graph.utils import FLOAT_REASON


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)


def test_fold_bn_pure_function_matches_module():
    conv = nn.Conv2d(3, 8, 3, bias=True)
    bn = nn.BatchNorm2d(8).eval()
    _randomize_bn(bn)
    w, b = fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x = torch.randn(2, 3, 9, 9)
    want = bn(conv(x))
    got = nn.functional.conv2d(x, w, b)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.b3 = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(x)) + x
        return self.b3(self.fc(x.mean((2, 3))))


def test_graph_pass_folds_every_bn_and_keeps_outputs():
    model = ConvBnNet().eval()
    for bn in (model.b1, model.b2, model.b3):
        _randomize_bn(bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 12, 12)
    gm = capture(model, (x,)).graph_module
    assert fold_batchnorm(gm) == 3
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets)
    want = model(x)
    assert torch.allclose(gm(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])


def test_bn_after_conv_with_two_users_is_left_alone():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.bn(y) + y

    model = Two().eval()
    _randomize_bn(model.bn)
    x = torch.randn(2, 3, 4, 4)
    gm = capture(model, (x,)).graph_module
    assert fold_batchnorm(gm) == 0
    assert torch.allclose(gm(x), model(x), atol=1e-6)


# ------------------------------------------------------------------------------------------- forward folding


def test_fold_affine_into_next_matches_grouped_conv_and_linear():
    g = torch.Generator().manual_seed(0)
    a, c = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    conv = nn.Conv2d(8, 6, 3, groups=2)
    x = torch.randn(2, 8, 7, 7, generator=g)
    w, b = fold_affine_into_next(conv.weight, conv.bias, a, c, groups=2)
    want = conv(x * a[:, None, None] + c[:, None, None])
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, groups=2), want, rtol=1e-5, atol=1e-5)
    fc = nn.Linear(8, 3, bias=False)
    w, b = fold_affine_into_next(fc.weight, None, a, c)
    torch.testing.assert_close(nn.functional.linear(x[:, :, 0, 0], w, b), fc(x[:, :, 0, 0] * a + c))


class PitchCNN(nn.Module):
    """Conv -> ReLU -> BN -> MaxPool -> Conv, as in pitch-estimation CNNs (CREPE): BN 1 folds into the unpadded
    conv 2; BN 2 precedes a zero-padded conv (not exact, stays float); BN 3 has a negative scale before a
    max-pool (stays float); BN 4 folds into the classifier."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 5), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c4, self.b4 = nn.Conv2d(8, 8, 1), nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.b1(torch.relu(self.c1(x))), 2)
        x = self.b2(torch.relu(self.c2(x)))
        x = nn.functional.max_pool2d(self.b3(torch.relu(self.c3(x))), 2)
        x = torch.relu(self.c4(x)).mean((2, 3))
        return self.fc(nn.functional.dropout(self.b4(x), 0.1, self.training))


def _pitch_cnn():
    model = PitchCNN()
    for bn in (model.b1, model.b2, model.b3, model.b4):
        _randomize_bn(bn)
    with torch.no_grad():
        model.b3.weight[2] = -0.5
    return model.eval()


def test_batchnorm_after_relu_folds_forward_where_exact():
    model = _pitch_cnn()
    x = torch.randn(2, 1, 24, 24)
    gm = capture(model, (x,)).graph_module
    assert fold_batchnorm(gm) == 2
    bns = [n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    assert len(bns) == 2
    reasons = sorted(n.meta[FLOAT_REASON] for n in bns)
    assert "zero-pads" in reasons[0] and "max-pool" in reasons[1]
    with torch.no_grad():
        for batch in (x, torch.randn(3, 1, 24, 24)):
            want = model(batch)
            torch.testing.assert_close(gm(batch), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_unfolded_batchnorm_says_why_in_the_placement():
    from eightbit.api import _prepare
    from eightbit.config import QuantConfig

    prepared = _prepare(_pitch_cnn(), torch.randn(2, 1, 24, 24), QuantConfig())
    assert prepared.folded == 2
    reasons = [why for why in prepared.placement.float_ops.values() if why.startswith("BatchNorm not folded")]
    assert len(reasons) == 2
