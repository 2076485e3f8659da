import pytest
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


# ------------------------------------------------------------------------------------- extreme ranges (issue 10)

INT32_MAX = 2**31 - 1


def _qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1


def test_huge_asymmetric_range_gives_a_finite_scale():
    # (3e38 - -3e38) overflows float32: the scale was inf and every output NaN.
    lo, hi = torch.tensor(-3e38), torch.tensor(3e38)
    for symmetric in (False, True):
        scale, zp = qmath.qparams_from_range(lo, hi, qmin=0, qmax=255, symmetric=symmetric)
        assert torch.isfinite(scale) and float(scale) > 0 and 0 <= int(zp) <= 255
        x = torch.tensor([-3e38, 0.0, 1.0, 3e38])
        fq = qmath.fake_quantize(x, scale, zp, 0, 255)
        assert torch.isfinite(fq).all() and float(fq[1]) == 0.0
        assert float((fq - x).abs().max()) <= float(scale)


def test_ordinary_ranges_keep_their_float32_scales_exactly():
    lo = torch.tensor([-1.7, -0.3, 0.0, -5e-3])
    hi = torch.tensor([2.9, 0.1, 6.0, 3e-2])
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=0, qmax=255, symmetric=False)
    assert torch.equal(scale, (hi - torch.minimum(lo, torch.zeros(()))) / 255)
    scale, _ = qmath.qparams_from_range(lo, hi, qmin=-127, qmax=127, symmetric=True)
    assert torch.equal(scale, torch.maximum(-lo, hi) / 127.0)


def test_bias_that_saturates_int32_keeps_its_sign_and_is_flagged():
    # 1.0 / (1e-5 * 1e-5) = 1e10 codes: the float32 clamp rounded 2^31 - 1 up to 2^31 and the cast wrapped it
    # to -2^31 (bias +1.0 came out negative).
    bias = torch.tensor([1.0, -1.0, 1e-6])
    q = qmath.quantize_bias(bias, torch.tensor(1e-5), torch.tensor([1e-5, 1e-5, 1e-5]))
    assert q.dtype == torch.int32 and q.tolist() == [INT32_MAX, -INT32_MAX, 10000]
    assert not qmath.bias_representable(bias, torch.tensor(1e-5), torch.tensor([1e-5, 1e-5, 1e-5]))
    assert qmath.bias_representable(torch.tensor([1.0, -1.0]), torch.tensor(0.1), torch.tensor([0.01, 0.02]))


@pytest.mark.parametrize("input_scale", [float("nan"), 0.0, float("inf")])
def test_bias_with_a_degenerate_input_scale_never_wraps(input_scale):
    bias = torch.tensor([0.5, -0.5, 0.0])
    q = qmath.quantize_bias(bias, torch.tensor(input_scale), torch.tensor([0.01, 0.01, 0.01]))
    assert q.dtype == torch.int32
    assert all(abs(v) <= INT32_MAX for v in q.tolist())
    assert q[0] >= 0 and q[1] <= 0 and q[2] == 0  # never the opposite sign
    assert not qmath.bias_representable(bias, torch.tensor(input_scale), torch.tensor([0.01, 0.01, 0.01]))


# --------------------------------------------------------------------------------- properties (hypothesis)

# Magnitudes from 1e-30 to the float32 limit, with the edge cases always tried first.
magnitudes = st.one_of(
    st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e30, 3e38, 3.4e38]),
    st.floats(1e-30, 3.4e38, allow_nan=False, allow_infinity=False),
)
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


@PROPERTY
@given(magnitudes, magnitudes, bit_widths, st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_qparams_are_finite_positive_and_zero_is_exact_for_any_finite_range(
    neg, pos, bits, signed, symmetric, narrow, per_channel
):
    qmin, qmax = _qrange(bits, signed, narrow and signed)
    if per_channel:  # a zero channel, a tiny one and the drawn one
        lo, hi = torch.tensor([0.0, -1e-30, -neg]), torch.tensor([0.0, 1e-30, pos])
    else:
        lo, hi = torch.tensor(-neg), torch.tensor(pos)
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= qmin) & (zp <= qmax)).all()
    axis = 0 if per_channel else None
    zeros = torch.zeros(3) if per_channel else torch.zeros(())
    assert torch.equal(qmath.fake_quantize(zeros, scale, zp, qmin, qmax, axis), zeros)
    # The ends of the range come back finite, and within one step when the range is representable.
    for end in (lo, hi):
        fq = qmath.fake_quantize(end, scale, zp, qmin, qmax, axis)
        assert torch.isfinite(fq).all()


@PROPERTY
@given(magnitudes, magnitudes, bit_widths, st.booleans())
def test_power_of_two_qparams_stay_finite(neg, pos, bits, symmetric):
    from eightbit.calibration.methods import power_of_two
    from eightbit.config import uint8_activations

    spec = uint8_activations(bits=bits, symmetric=symmetric, power_of_two=True)
    lo, hi = torch.tensor(-neg), torch.tensor(pos)
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=symmetric)
    s, z = power_of_two(lo, hi, scale, zp, spec)
    assert torch.isfinite(s) and float(s) > 0 and spec.qmin <= int(z) <= spec.qmax
    assert float(qmath.fake_quantize(torch.zeros(()), s, z, spec.qmin, spec.qmax)) == 0.0


@PROPERTY
@given(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.one_of(st.sampled_from([0.0, 1e-30, 1e-20, 3e38]), st.floats(1e-30, 1e30)),
    st.one_of(st.sampled_from([0.0, 1e-30, 3e38]), st.floats(1e-30, 1e30)),
)
def test_bias_codes_fit_int32_with_the_right_sign(bias, input_scale, weight_scale):
    b = torch.tensor([bias, -bias, 0.0])
    q = qmath.quantize_bias(b, torch.tensor(input_scale), torch.full((3,), weight_scale))
    assert q.dtype == torch.int32
    codes = q.tolist()
    assert all(-INT32_MAX <= c <= INT32_MAX for c in codes)
    for value, code in zip(b.tolist(), codes, strict=True):
        assert code == 0 or (code > 0) == (value > 0)
    if qmath.bias_representable(b, torch.tensor(input_scale), torch.full((3,), weight_scale)):
        scale = torch.tensor(input_scale) * torch.tensor(weight_scale)
        assert abs(codes[0] * float(scale) - bias) <= float(scale) * 0.5 * (1 + 1e-6)
