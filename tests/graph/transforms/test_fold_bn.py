import torch
from torch import nn

from eightbit.graph.capture import capture
from eightbit.graph.transforms import fold_batchnorm, fold_bn


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
