"""Every spelling of the quantizable ops becomes the one spelling placement knows: each rewrite is exact
(numerically equivalent on fresh inputs) and leaves what it cannot prove equivalent alone."""

from collections import Counter

import pytest
import torch
from torch import nn

from eightbit.api import _prepare
from eightbit.config import OpKind, QuantConfig
from eightbit.graph.capture import capture
from eightbit.graph.transforms.spellings import (
    addmm_to_linear,
    baddbmm_to_bmm,
    einsum_matmul_plan,
    einsum_to_matmul,
    explicit_conv_padding,
    fold_constant_weight_norm,
    functionalize_inplace,
    matmul_add_to_linear,
    normalize_spellings,
    same_padding,
)

aten = torch.ops.aten


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _check_same(gm, model, *args):
    with torch.no_grad():
        want = model(*args)
        got = gm(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- pure math


def test_same_padding_puts_the_odd_element_after():
    assert same_padding([3, 3], [1, 1]) == [(1, 1), (1, 1)]
    assert same_padding([4, 2], [1, 3]) == [(1, 2), (1, 2)]
    assert same_padding([1], [1]) == [(0, 0)]


def test_einsum_plans_only_for_one_matrix_product():
    plan = einsum_matmul_plan("bhqd,bhkd->bhqk")
    assert plan.perm_a == (0, 1, 2, 3) and plan.perm_b == (0, 1, 3, 2) and plan.perm_out == (0, 1, 2, 3)
    assert einsum_matmul_plan("bnd,dk->bnk") is not None
    for not_a_matmul in ("ii->i", "bij->bji", "bi,bi->b", "bij,bjk->ik", "...ij,...jk->...ik", "ijk,jkl->il"):
        assert einsum_matmul_plan(not_a_matmul) is None, not_a_matmul


# ------------------------------------------------------------------------------------------- convolutions


class SameConvs(nn.Module):
    """'same' with odd and even kernels (the even one pads asymmetrically), dilation, 'valid', 1-D, and a
    BatchNorm after a 'same' conv (as HF EfficientNet)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding="same", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 4, padding="same", dilation=(1, 2), groups=2)
        self.c = nn.Conv2d(4, 4, 3, padding="valid")
        self.d = nn.Conv1d(4, 2, 5, padding="same", dilation=2)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = self.c(self.b(x))
        return self.d(x.mean(2))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


def test_string_padding_becomes_explicit_padding_exactly():
    model = _randomize_bn(SameConvs())
    x = torch.randn(2, 3, 9, 10)
    gm = capture(model, (x,)).graph_module
    assert _targets(gm)[aten.conv2d.padding] == 3
    assert explicit_conv_padding(gm) == 4
    gm.recompile()
    found = _targets(gm)
    assert found[aten.conv2d.padding] == found[aten.conv1d.padding] == 0
    assert found[aten.conv2d.default] == 3 and found[aten.conv1d.default] == 1
    assert found[aten.constant_pad_nd.default] == 1  # only the even kernel pads asymmetrically
    _check_same(gm, model, x)
    _check_same(gm, model, torch.randn(3, 3, 9, 10))


def test_same_padded_convs_are_int8_and_their_batchnorm_folded():
    model = _randomize_bn(SameConvs())
    prepared = _prepare(model, torch.randn(2, 3, 9, 10), QuantConfig())
    kinds = Counter(rule.kind for rule in prepared.placement.quantized_ops.values())
    assert kinds[OpKind.CONV] == 4
    assert prepared.folded == 1
    assert not [why for why in prepared.placement.float_ops.values() if "conv" in why or "batch_norm" in why]
    _check_same(prepared.gm, model, torch.randn(2, 3, 9, 10))


# ------------------------------------------------------------------------------------------- in-place ops


class InPlace(nn.Module):
    """HF ResNet's `hidden += residual` and in-place activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        y += x
        y = torch.relu_(y)
        z = self.conv2(y)
        z.mul_(2.0)
        return nn.functional.hardtanh_(z) + y


class InPlaceOnView(nn.Module):
    def forward(self, x):
        y = x * 2
        v = y.view(-1)
        y.add_(1.0)  # v sees this: must stay in place
        return v.sum() + y


def test_inplace_ops_become_functional_exactly():
    model = InPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,)).graph_module
    before = _targets(gm)
    assert before[aten.add_.Tensor] == 1 and before[aten.relu_.default] == 1
    assert functionalize_inplace(gm) == 4
    gm.recompile()
    after = _targets(gm)
    assert not [t for t in after if t.overloadpacket.__name__.endswith("_") and not str(t).startswith("aten._")]
    assert after[aten.add.Tensor] == 2 and after[aten.relu.default] == 1 and after[aten.hardtanh.default] == 1
    _check_same(gm, model, x)


def test_inplace_op_on_a_viewed_tensor_is_left_alone():
    model = InPlaceOnView().eval()
    x = torch.randn(2, 3)
    gm = capture(model, (x,)).graph_module
    if not _targets(gm)[aten.add_.Tensor]:
        pytest.skip("torch.export functionalised this mutation itself")
    assert functionalize_inplace(gm) == 0
    _check_same(gm, model, x)


def test_inplace_residual_add_is_int8():
    prepared = _prepare(InPlace().eval(), torch.randn(2, 3, 8, 8), QuantConfig())
    targets = {n.name: n.target for n in prepared.gm.graph.nodes}
    assert aten.add_.Tensor not in targets.values()
    assert sum(rule.kind is OpKind.CONV for rule in prepared.placement.quantized_ops.values()) == 2


# ------------------------------------------------------------------------------------------- linear layers


class Conv1D(nn.Module):
    """GPT-2's Conv1D: addmm(bias, x.view(-1, nx), weight[nx, nf])."""

    def __init__(self, nx=8, nf=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class MatmulLinears(nn.Module):
    """Linear layers written as products: x @ W + b, b + x @ W.t(), torch.mm, and a matmul of two
    activations (stays a matmul)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(5, 6))
        self.b2 = nn.Parameter(torch.randn(5))
        self.w3 = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        h = x @ self.w1 + self.b1
        h = self.b2 + h @ self.w2.t()
        flat = torch.mm(h.reshape(-1, 5), self.w3)
        return flat.reshape(*h.shape[:-1], 4).transpose(-1, -2) @ h


def test_addmm_becomes_linear_exactly():
    model = Conv1D().eval()
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,)).graph_module
    assert _targets(gm)[aten.addmm.default] == 1
    assert addmm_to_linear(gm) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert _targets(gm)[aten.linear.default] == 1 and _targets(gm)[aten.addmm.default] == 0
    _check_same(gm, model, x)
    _check_same(gm, model, torch.randn(3, 5, 8))


def test_matmul_and_add_become_linear_exactly():
    model = MatmulLinears().eval()
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,)).graph_module
    assert matmul_add_to_linear(gm) == 3
    gm.graph.eliminate_dead_code()
    gm.recompile()
    found = _targets(gm)
    assert found[aten.linear.default] == 3 and found[aten.add.Tensor] == 0
    assert found[aten.matmul.default] == 1 and found[aten.mm.default] == 0  # activation @ activation stays
    _check_same(gm, model, x)
    _check_same(gm, model, torch.randn(4, 5, 8))


def test_gpt2_conv1d_and_matmul_linears_get_int8_weights():
    for model, x, linears in ((Conv1D(), torch.randn(2, 5, 8), 1), (MatmulLinears(), torch.randn(2, 5, 8), 3)):
        prepared = _prepare(model.eval(), x, QuantConfig())
        kinds = Counter(rule.kind for rule in prepared.placement.quantized_ops.values())
        assert kinds[OpKind.LINEAR] == linears, model


# ------------------------------------------------------------------------------------------- batched products


class Batched(nn.Module):
    def forward(self, c, a, b, q, k):
        scores = torch.baddbmm(c, a, b, beta=0.5, alpha=0.25) + torch.baddbmm(c, a, b)
        attention = torch.einsum("bhqd,bhkd->bhqk", q, k)
        return scores, torch.einsum("bhqk,bhkd->bqhd", attention.softmax(-1), k), torch.einsum("bij->bji", c)


def _batched_inputs(n=2):
    g = torch.Generator().manual_seed(n)
    return (
        torch.randn(n, 4, 6, generator=g),
        torch.randn(n, 4, 5, generator=g),
        torch.randn(n, 5, 6, generator=g),
        torch.randn(n, 2, 4, 8, generator=g),
        torch.randn(n, 2, 4, 8, generator=g),
    )


def test_baddbmm_and_matmul_einsums_become_matmuls_exactly():
    model = Batched().eval()
    gm = capture(model, _batched_inputs()).graph_module
    assert _targets(gm)[aten.baddbmm.default] == 2 and _targets(gm)[aten.einsum.default] == 3
    assert baddbmm_to_bmm(gm) == 2
    assert einsum_to_matmul(gm) == 2
    gm.graph.eliminate_dead_code()
    gm.recompile()
    found = _targets(gm)
    assert found[aten.bmm.default] == 2 and found[aten.baddbmm.default] == 0
    assert found[aten.matmul.default] == 2 and found[aten.einsum.default] == 1  # the transpose einsum stays
    for n in (2, 3):
        with torch.no_grad():
            for got, want in zip(gm(*_batched_inputs(n)), model(*_batched_inputs(n)), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_products_are_int8():
    prepared = _prepare(Batched().eval(), _batched_inputs(), QuantConfig())
    kinds = Counter(rule.kind for rule in prepared.placement.quantized_ops.values())
    assert kinds[OpKind.MATMUL] == 4


# ------------------------------------------------------------------------------------------- weight norm


class WeightNormConv(nn.Module):
    """wav2vec2's positional convolution: a weight-normalised Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2)

    def forward(self, x):
        return self.conv(x)


def test_constant_weight_norm_is_folded_exactly():
    model = WeightNormConv().eval()
    x = torch.randn(2, 4, 10)
    gm = capture(model, (x,)).graph_module
    assert _targets(gm)[aten._weight_norm.default] == 1
    assert fold_constant_weight_norm(gm) == 1
    gm.recompile()
    assert _targets(gm)[aten._weight_norm.default] == 0
    _check_same(gm, model, x)


def test_normalize_spellings_counts_each_rewrite():
    gm = capture(InPlace().eval(), (torch.randn(2, 3, 8, 8),)).graph_module
    counts = normalize_spellings(gm)
    assert counts["inplace"] == 4 and sum(counts.values()) == 4


# ------------------------------------------------------------------------------------------- regions and no-ops


class NoGradTable(nn.Module):
    """Llama's rotary embedding: a table computed under torch.no_grad(), and an in-place eval dropout on a view
    (MobileNetV2's classifier)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8))
        self.drop = nn.Dropout(0.2, inplace=True)

    def forward(self, x):
        with torch.no_grad():
            angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.freq
            table = torch.cos(angle)
        return self.drop((x * table).flatten(1))


def test_grad_mode_regions_are_inlined_and_eval_dropout_dropped_exactly():
    model = NoGradTable().eval()
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,)).graph_module
    regions = [n for n in gm.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    if not regions:
        pytest.skip("torch.export inlined the no_grad region itself")
    counts = normalize_spellings(gm)
    assert counts["grad_mode_regions"] == 1 and counts["eval_dropout_"] == 1
    found = _targets(gm)
    assert found[aten.cos.default] == 1 and found[aten.dropout_.default] == 0
    assert not [n for n in gm.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    _check_same(gm, model, x)
    _check_same(gm, model, torch.randn(3, 5, 8))


class WholeInputPool(nn.Module):
    """EfficientNet's pooler: an average pool with a window larger than the input, in ceil mode."""

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 8, ceil_mode=True), nn.functional.avg_pool2d(x, 2)


def test_whole_input_average_pool_becomes_a_mean_exactly():
    from eightbit.graph.transforms.spellings import whole_input_avg_pool_to_mean

    model = WholeInputPool().eval()
    x = torch.randn(2, 3, 3, 3)
    gm = capture(model, (x,)).graph_module
    assert whole_input_avg_pool_to_mean(gm) == 1
    gm.recompile()
    assert _targets(gm)[aten.mean.dim] == 1 and _targets(gm)[aten.avg_pool2d.default] == 1
    for got, want in zip(gm(x), model(x), strict=True):
        torch.testing.assert_close(got, want)
