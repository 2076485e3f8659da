import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eightbit import qmath

ranges = st.tuples(st.floats(-1e3, 0.0), st.floats(0.0, 1e3)).filter(lambda r: r[1] - r[0] > 1e-3)
bit_widths = st.integers(2, 16)


@settings(max_examples=200, deadline=None)
@given(ranges, bit_widths, st.booleans(), st.booleans())
def test_roundtrip_error_within_half_step_for_in_range_values(rng, bits, signed, symmetric):
    lo, hi = rng
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale, zp = qmath.qparams_from_range(torch.tensor(lo), torch.tensor(hi), qmin=qmin, qmax=qmax, symmetric=symmetric)
    # Values inside the representable range [(qmin - zp) * s, (qmax - zp) * s].
    lo_rep, hi_rep = float((qmin - zp) * scale), float((qmax - zp) * scale)
    x = torch.linspace(max(lo, lo_rep), min(hi, hi_rep), 257)
    err = (qmath.fake_quantize(x, scale, zp, qmin, qmax) - x).abs()
    ulps = 4 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))  # float32 arithmetic on x / scale
    assert float(err.max()) <= float(scale) / 2 * (1 + 1e-4) + ulps + 1e-6


@settings(max_examples=200, deadline=None)
@given(ranges, bit_widths, st.booleans())
def test_real_zero_is_exactly_representable(rng, bits, symmetric):
    qmin, qmax = 0, 2**bits - 1
    scale, zp = qmath.qparams_from_range(
        torch.tensor(rng[0]), torch.tensor(rng[1]), qmin=qmin, qmax=qmax, symmetric=symmetric
    )
    assert float(qmath.fake_quantize(torch.zeros(3), scale, zp, qmin, qmax).abs().max()) == 0.0
    assert qmin <= int(zp) <= qmax


def test_range_is_widened_to_include_zero():
    scale, zp = qmath.qparams_from_range(torch.tensor(2.0), torch.tensor(6.0), qmin=0, qmax=255, symmetric=False)
    assert int(zp) == 0 and abs(float(scale) - 6.0 / 255) < 1e-9


def test_symmetric_signed_narrow_range_has_zero_zero_point():
    scale, zp = qmath.qparams_from_range(torch.tensor(-3.0), torch.tensor(1.0), qmin=-127, qmax=127, symmetric=True)
    assert int(zp) == 0 and abs(float(scale) - 3.0 / 127) < 1e-9


def test_zero_range_channel_borrows_other_scales_and_stays_zero():
    lo = torch.tensor([0.0, -1.0, -2.0])
    hi = torch.tensor([0.0, 1.0, 2.0])
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=-127, qmax=127, symmetric=True)
    assert torch.all(scale > 0)
    assert abs(float(scale[0]) - float(scale[1:].mean())) < 1e-9
    w = torch.zeros(3, 4)
    w[1:] = torch.randn(2, 4)
    q = qmath.quantize(w, scale, zp, -127, 127, axis=0)
    assert torch.all(q[0] == 0)


def test_all_zero_tensor_gets_unit_scale():
    scale, zp = qmath.qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), qmin=0, qmax=255, symmetric=False)
    assert float(scale) == 1.0 and int(zp) == 0


def test_non_finite_range_is_refused():
    import pytest

    with pytest.raises(ValueError, match="non-finite"):
        qmath.qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), qmin=0, qmax=255, symmetric=False)


def test_rounding_is_half_to_even_like_onnx():
    q = qmath.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), torch.tensor(0), -128, 127)
    assert q.tolist() == [0, 2, 2, 0]


def test_per_channel_quantize_uses_axis():
    x = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    q = qmath.quantize(x, torch.tensor([1.0, 10.0]), torch.tensor([0, 0]), -127, 127, axis=0)
    assert q.tolist() == [[1, 2], [1, 2]]


def test_storage_dtype_and_bias():
    assert qmath.storage_dtype(0, 255) == torch.uint8
    assert qmath.storage_dtype(-127, 127) == torch.int8
    assert qmath.storage_dtype(0, 4095) == torch.uint16
    b = qmath.quantize_bias(torch.tensor([1.0, -1.0]), torch.tensor(0.1), torch.tensor([0.01, 0.02]))
    assert b.dtype == torch.int32 and b.tolist() == [1000, -500]
