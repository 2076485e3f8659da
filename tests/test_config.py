import dataclasses

import pytest

from eightbit import Granularity, OpKind, QuantConfig, QuantSpec, int8_weights, uint8_activations
from eightbit.config import OverflowFix, overflow_fix_active, seven_bit


def test_defaults_match_fast_x86_formats():
    cfg = QuantConfig()
    assert (cfg.weights.qmin, cfg.weights.qmax, cfg.weights.per_channel) == (-127, 127, True)
    assert (cfg.activations.qmin, cfg.activations.qmax, cfg.activations.symmetric) == (0, 255, False)


def test_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().fold_batchnorm = False
    with pytest.raises(TypeError):
        QuantSpec(8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits"),
        (dict(bits=17), "bits"),
        (dict(narrow_range=True, signed=False), "narrow_range"),
        (dict(method="kl2"), "valid methods"),
        (dict(percentile=10.0), "percentile"),
        (dict(granularity="per_tensor"), "Granularity"),
    ],
)
def test_invalid_specs_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantSpec(**kwargs)


def test_keep_float_takes_tuples_and_enums():
    with pytest.raises(TypeError, match="tuples"):
        QuantConfig(keep_float="fc")
    with pytest.raises(TypeError, match="OpKind"):
        QuantConfig(keep_float_ops=("conv",))
    assert QuantConfig(keep_float_ops=(OpKind.ADD,)).keep_float_ops == (OpKind.ADD,)


def test_bit_widths_and_containers():
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    assert (spec.qmin, spec.qmax, spec.container_bits) == (-8, 7, 8)
    assert QuantSpec(bits=12).container_bits == 16
    assert uint8_activations(granularity=Granularity.PER_CHANNEL).per_channel


def test_overflow_fix_applies_to_signed_8bit_weights_when_the_cpu_saturates():
    cfg = QuantConfig()
    assert overflow_fix_active(cfg, saturation_risk=True)
    assert not overflow_fix_active(cfg, saturation_risk=False)
    assert not overflow_fix_active(QuantConfig(overflow_fix=OverflowFix.DISABLE), saturation_risk=True)
    assert overflow_fix_active(QuantConfig(overflow_fix=OverflowFix.ENABLE), saturation_risk=False)
    assert not overflow_fix_active(QuantConfig(weights=int8_weights(bits=6)), saturation_risk=True)
    assert (seven_bit(int8_weights()).qmin, seven_bit(int8_weights()).qmax) == (-63, 63)
    assert seven_bit(int8_weights(narrow_range=False)).qmin == -63


def test_output_aware_methods_roles_and_limits():
    eq = QuantConfig(activations=uint8_activations(method="eq"), weights=int8_weights(method="eq"))
    assert (eq.activations.method, eq.weights.method) == ("eq", "eq")
    QuantConfig(activations=uint8_activations(method="cross_entropy"), weights=int8_weights(method="eq"))
    QuantConfig(weights=int8_weights(method="eq", granularity=Granularity.PER_TENSOR))
    with pytest.raises(ValueError, match="for activations only"):
        QuantConfig(weights=int8_weights(method="cross_entropy"))
    with pytest.raises(ValueError, match="channel_axis"):
        QuantConfig(weights=int8_weights(method="eq", channel_axis=1))
    with pytest.raises(ValueError, match="power_of_two"):
        QuantConfig(weights=int8_weights(method="eq"), activations=uint8_activations(power_of_two=True))
    with pytest.raises(ValueError, match="per-tensor"):
        QuantConfig(activations=uint8_activations(method="cross_entropy", granularity=Granularity.PER_CHANNEL))
