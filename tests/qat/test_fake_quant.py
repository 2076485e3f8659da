"""Fake quantization: STE gradients, LSQ scale gradients against the paper's formula, power-of-two scales."""

import math

import torch

from eightbit import qmath
from eightbit.calibration.encodings import Encoding
from eightbit.graph import ops
from eightbit.qat.fake_quant import FakeQuantizer, fake_quantize, lsq_fake_quantize, lsq_grad_factor, round_ste


def test_round_ste_rounds_half_to_even_and_passes_the_gradient():
    x = torch.tensor([0.4, 0.5, 1.5, 2.5, -0.5, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_outside():
    scale, zp = torch.tensor(0.1), torch.tensor(10.0)  # codes [0, 255] cover [-1.0, 24.5]
    x = torch.tensor([-3.0, -1.2, -0.37, 0.0, 5.55, 24.4, 24.8, 40.0], requires_grad=True)
    fake_quantize(x, scale, zp, 0, 255).sum().backward()
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, inside)


def test_fake_quantize_equals_the_exported_quantize_dequantize_pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 3
    scale, zp = torch.tensor([0.02, 0.05, 0.11]), torch.tensor([3, 128, 250], dtype=torch.uint8)
    want = ops.dequantize(ops.quantize(x, scale, zp, 0, 255, 1), scale, zp, 1)
    assert torch.equal(fake_quantize(x, scale, zp.float(), 0, 255, axis=1), want)


def _encoding(scale, zp, qmin, qmax, axis=None):
    return Encoding(list(scale), list(zp), qmin, qmax, axis)


def test_lsq_activation_scale_gradient_matches_the_paper():
    """d out / d s = -x/s + round(x/s) inside, -Qn / Qp at the clip ends (here with a zero point), times
    g = 1 / sqrt(N * Qp) with N the values per sample."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g) * 2
    s, z, qmin, qmax = 0.03, 50, 0, 255
    fq = FakeQuantizer(_encoding([s], [z], qmin, qmax), symmetric=False, power_of_two=False).train()
    upstream = torch.randn(x.shape, generator=g)
    (fq(x) * upstream).sum().backward()
    v = x / torch.tensor(s)
    lo, hi = qmin - z, qmax - z  # -Qn, Qp in the paper's notation
    per_value = torch.where(
        v + z <= qmin, torch.tensor(float(lo)), torch.where(v + z >= qmax, torch.tensor(float(hi)), torch.round(v) - v)
    )
    factor = 1.0 / math.sqrt(x[0].numel() * qmax)
    want = (per_value * upstream).sum() * factor
    assert torch.allclose(fq.scale.grad, want, rtol=1e-5, atol=1e-7)
    assert factor == lsq_grad_factor(x[0].numel(), qmax)


def test_lsq_per_channel_weight_scale_gradient_matches_the_paper():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, 3, 3, generator=g) * 0.2
    scales = [0.004, 0.002, 0.003, 0.0015]
    fq = FakeQuantizer(
        _encoding(scales, [0] * 4, -7, 7, axis=0), symmetric=True, power_of_two=False, per_sample=False
    ).train()
    fq(w).sum().backward()
    s = torch.tensor(scales).reshape(-1, 1, 1, 1)
    v = w / s
    per_value = torch.where(v <= -7, -7.0, torch.where(v >= 7, 7.0, torch.round(v) - v))
    want = per_value.sum(dim=(1, 2, 3)) / math.sqrt(w[0].numel() * 7)
    assert torch.allclose(fq.scale.grad, want, rtol=1e-5, atol=1e-7)


def test_frozen_quantizer_gets_zero_gradient_and_keeps_its_value():
    fq = FakeQuantizer(_encoding([0.1], [0], -127, 127), symmetric=True, power_of_two=False).train()
    x = torch.linspace(-20, 20, 50)
    want = fq(x)
    fq.scale.grad = None
    fq.learning = False
    out = fq(x)
    out.sum().backward()
    assert torch.equal(out, want) and torch.equal(fq.scale.grad, torch.zeros(()))


def test_power_of_two_scale_trains_in_log2_domain_and_stays_a_power_of_two():
    fq = FakeQuantizer(_encoding([0.25], [0], -127, 127), symmetric=True, power_of_two=True).train()
    assert fq.log2_scale.item() == -2.0
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(3)) * 100  # clips: pushes the scale up
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (fq(x) - x).pow(2).mean().backward()
        opt.step()
    s = fq.current_scale()
    assert s > 0.25 and torch.log2(s) == torch.round(torch.log2(s))
    assert fq.encoding(["t"]).scale == [s.item()]


def test_learned_zero_point_gets_gradient_only_from_clipped_values():
    fq = FakeQuantizer(
        _encoding([0.1], [100], 0, 255), symmetric=False, power_of_two=False, learn_zero_point=True
    ).train()
    x = torch.tensor([[-20.0, 0.0, 1.0, 30.0]])  # -20 clips low (code < 0), 30 clips high (code > 255)
    fq(x).sum().backward()
    assert torch.allclose(fq.zero_point.grad, torch.tensor(-0.2) / math.sqrt(4 * 255))


def test_observing_sets_parameters_from_a_moving_average_of_ranges():
    fq = FakeQuantizer(_encoding([1.0], [0], 0, 255), symmetric=False, power_of_two=False, momentum=0.5).train()
    fq.observing = True
    fq(torch.tensor([[-1.0, 3.0]]))
    # The initial range [0, 255] (scale 1, zero point 0) averaged with the batch's [-1, 3].
    assert torch.allclose(fq.observed_lo, torch.tensor(-0.5))
    assert torch.allclose(fq.observed_hi, torch.tensor(0.5 * 255.0 + 0.5 * 3.0))
    want, want_zp = qmath.qparams_from_range(fq.observed_lo, fq.observed_hi, qmin=0, qmax=255, symmetric=False)
    assert torch.equal(fq.scale.detach(), want) and fq.zero_point.item() == want_zp.item()


def test_fused_lsq_node_matches_autograd_through_the_composed_ops():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 5, generator=g) * 3
    upstream = torch.randn(x.shape, generator=g)
    for axis, shape in ((None, ()), (1, (4,))):
        grads = []
        for fn in ("composed", "fused"):
            xi = x.clone().requires_grad_()
            s = torch.full(shape, 0.05).requires_grad_()
            z = torch.full(shape, 20.0).requires_grad_()
            if fn == "composed":
                out = fake_quantize(xi, s, z, 0, 255, axis)
            else:
                out = lsq_fake_quantize(xi, s, z, 0, 255, axis, 1.0)
            (out * upstream).sum().backward()
            grads.append((out.detach(), xi.grad, s.grad, z.grad))
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _fused_and_reference_grads(x, scale, zp, axis, qmin=0, qmax=255, factor=0.3):
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    results = []
    for fused in (False, True):
        xi, s, z = (t.clone().requires_grad_() for t in (x, scale, zp))
        if fused:
            out = lsq_fake_quantize(xi, s, z, qmin, qmax, axis, factor)
        else:  # the reference: autograd through the composed ops, LSQ's g applied to the parameters by hand
            out = fake_quantize(xi, s, z, qmin, qmax, axis)
        (out * upstream).sum().backward()
        grads = (xi.grad, s.grad, z.grad) if fused else (xi.grad, s.grad * factor, z.grad * factor)
        results.append((out.detach(), *grads))
    return results


def test_fused_fast_and_general_paths_give_the_reference_gradients():
    """The fast path (one zero point: per tensor, or per channel with equal zero points) and the general path
    (unequal per-channel zero points) against autograd through `fake_quantize`, in float32 and float64, with
    values exactly on the clip bounds (the STE counts them as inside: gradient 1)."""
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 3, 6, 6, generator=g, dtype=dtype) * 4
        scales = torch.tensor([0.0625, 0.03125, 0.125], dtype=dtype)  # powers of two: x / s is exact below
        cases = [
            (scales[0], torch.tensor(20.0, dtype=dtype), None),
            (scales, torch.full((3,), 20.0, dtype=dtype), 1),
            (scales, torch.tensor([20.0, 0.0, 128.0], dtype=dtype), 1),
        ]
        for scale, zp, axis in cases:
            s0, z0 = float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0])
            x[0, 0, 0, :2] = torch.tensor([(0 - z0) * s0, (255 - z0) * s0])  # codes 0 and 255: on the bounds
            reference, fused = _fused_and_reference_grads(x, scale, zp, axis)
            assert torch.equal(reference[0], fused[0]), (dtype, axis)
            assert fused[1][0, 0, 0, :2].tolist() == reference[1][0, 0, 0, :2].tolist() != [0.0, 0.0]
            for want, got in zip(reference[1:], fused[1:], strict=True):
                assert torch.allclose(want, got, rtol=1e-5, atol=1e-5), (dtype, axis, want, got)


def test_fused_node_with_learning_off_gives_zero_parameter_gradients_and_the_ste_input_gradient():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * 4
    scale, zp = torch.tensor(0.05, requires_grad=True), torch.tensor(20.0, requires_grad=True)
    xi = x.clone().requires_grad_()
    out = lsq_fake_quantize(xi, scale, zp, 0, 255, None, 1.0, learn=False)
    out.sum().backward()
    assert torch.equal(scale.grad, torch.zeros(())) and torch.equal(zp.grad, torch.zeros(()))
    v = x / 0.05
    assert torch.equal(xi.grad, ((v >= -20) & (v <= 235)).float())
    assert torch.equal(out, fake_quantize(x, torch.tensor(0.05), torch.tensor(20.0), 0, 255))
