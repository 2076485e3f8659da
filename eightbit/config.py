"""Quantization configuration: frozen, keyword-only dataclasses validated on construction.

A `QuantSpec` says how one kind of tensor (weights or activations) is quantized; a `QuantConfig` says which
spec applies where and what stays float.  Defaults follow what runs fast on x86 VNNI runtimes: int8 symmetric
per-channel weights with the narrow range [-127, 127] and uint8 asymmetric per-tensor activations.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from eightbit.calibration.methods import METHODS, lookup_method


class Granularity(enum.Enum):
    """One scale for the whole tensor, or one per channel along `QuantSpec.channel_axis`."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class OpKind(enum.Enum):
    """Op families the quantizer knows; used to keep whole families in float."""

    CONV = "conv"
    LINEAR = "linear"
    MATMUL = "matmul"
    ADD = "add"
    CONCAT = "concat"
    POOL = "pool"
    MUL = "mul"
    ACTIVATION = "activation"


class Target(enum.Enum):
    """Where the quantized model runs; placement follows that runtime's int8 kernels.

    ONNX: ONNX Runtime / OpenVINO QDQ (the default).  TFLITE: LiteRT and TensorFlow Lite Micro, fully int8: every
    op including the classifier has an int8 output, average pooling and concatenation keep their input's
    parameters, and LOGISTIC / SOFTMAX outputs get TFLite's fixed parameters (scale 1/256, lowest code = 0.0).
    """

    ONNX = "onnx"
    TFLITE = "tflite"


class Scheme(enum.Enum):
    """Number format.  UNIFORM is affine integer quantization (what int8 runtimes execute); LOG2 (weights only)
    and FP16 are simulated for accuracy studies: LOG2 cannot be exported, FP16 exports as an fp16 model."""

    UNIFORM = "uniform"
    LOG2 = "log2"
    FP16 = "fp16"


class OverflowFix(enum.Enum):
    """Keep int8 weights to 7-bit codes ([-63, 63]) so x86 CPUs without VNNI cannot saturate.

    Such CPUs (AVX2, AVX-512 without VNNI) multiply u8 activations by s8 weights with VPMADDUBSW, which sums
    pairs of products into int16: 255 * 127 * 2 overflows, and ONNX Runtime's results silently drift from
    the exact int8 model.  7-bit weights cannot overflow (255 * 63 * 2 < 32767).
    AUTO applies the fix when the CPU running eightbit lacks VNNI.  Depthwise convolutions keep 8 bits: their
    kernels accumulate in int32 directly and do not saturate (checked against ONNX Runtime's reference).
    """

    AUTO = "auto"
    ENABLE = "enable"
    DISABLE = "disable"


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one class of tensors.

    bits: 2..16. Values above 8 need 16-bit containers in ONNX (opset 21).
    symmetric: zero point fixed at the middle of the range (0 for signed types).
    signed: int8-style range instead of uint8-style.
    channel_axis: the per-channel axis; None means 0 (output channels) for weights, 1 for activations.
    narrow_range: drop the most negative code so the range is symmetric ([-127, 127] for int8).
    method: calibration method name, a key of `eightbit.calibration.methods.METHODS`.
    power_of_two: round scales to powers of two (shift-only NPUs); exported as ordinary Q/DQ.
    scheme: UNIFORM (default), or LOG2 / FP16 simulated for study (see Scheme).
    percentile: the upper percentile kept by the `percentile` method.
    """

    bits: int = 8
    symmetric: bool = False
    signed: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    channel_axis: int | None = None
    narrow_range: bool = False
    method: str = "minmax"
    percentile: float = 99.99
    power_of_two: bool = False
    scheme: Scheme = Scheme.UNIFORM

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if not isinstance(self.scheme, Scheme):
            raise TypeError(f"scheme must be a Scheme, got {self.scheme!r}")
        if not isinstance(self.granularity, Granularity):
            raise TypeError(f"granularity must be a Granularity, got {self.granularity!r}")
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range only applies to signed types; use signed=True or narrow_range=False")
        lookup_method(self.method)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity is Granularity.PER_CHANNEL

    @property
    def container_bits(self) -> int:
        """Width of the integer type that stores the codes (8 or 16)."""
        return 8 if self.bits <= 8 else 16


def int8_weights(**overrides) -> QuantSpec:
    """The default weight spec: int8, symmetric, per output channel, narrow range [-127, 127]."""
    base = dict(bits=8, symmetric=True, signed=True, granularity=Granularity.PER_CHANNEL, narrow_range=True)
    return QuantSpec(**{**base, **overrides})


def uint8_activations(**overrides) -> QuantSpec:
    """The default activation spec: uint8, asymmetric, per tensor, min/max calibration."""
    base = dict(bits=8, symmetric=False, signed=False, granularity=Granularity.PER_TENSOR)
    return QuantSpec(**{**base, **overrides})


class Relu6Handling(enum.Enum):
    """What cross-layer equalization does with a ReLU6 between two layers (see
    `eightbit.graph.transforms.equalize`): BOUNDED equalizes within the limits that keep the function exact on
    the calibration data, TO_RELU turns the ReLU6 into a ReLU (AIMET; changes the float model), SKIP leaves the
    pair alone."""

    BOUNDED = "bounded"
    TO_RELU = "to_relu"
    SKIP = "skip"


@dataclass(frozen=True, kw_only=True)
class Equalize:
    """Cross-layer equalization + high-bias absorption settings (Nagel et al. 2019), applied after BatchNorm
    folding and before calibration; for per-tensor weights (see `eightbit.graph.transforms.equalize`).

    relu6: what to do with ReLU6 between two layers (Relu6Handling); BOUNDED costs one extra pass over the
        calibration data (the per-channel maxima it keeps exact).
    absorb_high_bias: move bias offsets across ReLUs into the next layer, from the folded BatchNorms' statistics.
    sigmas: the offset moved is max(0, beta - sigmas * |gamma|).
    max_rounds, tolerance: chains are equalized round after round until no scale changes by more than
        `tolerance` (relative), at most `max_rounds` times.
    """

    relu6: Relu6Handling = Relu6Handling.BOUNDED
    absorb_high_bias: bool = True
    sigmas: float = 3.0
    max_rounds: int = 50
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if not isinstance(self.relu6, Relu6Handling):
            raise TypeError(f"relu6 takes a Relu6Handling ({[h.value for h in Relu6Handling]}), got {self.relu6!r}")
        if not isinstance(self.absorb_high_bias, bool):
            raise TypeError(f"absorb_high_bias must be True or False, got {self.absorb_high_bias!r}")
        if not self.sigmas >= 0:
            raise ValueError(f"sigmas must be >= 0, got {self.sigmas}")
        if not (isinstance(self.max_rounds, int) and self.max_rounds >= 1):
            raise ValueError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


@dataclass(frozen=True, kw_only=True)
class AdaRound:
    """AdaRound settings (Nagel et al. 2020; see `eightbit.calibration.adaround`): learned up/down rounding of
    every conv/linear weight, layer by layer, on the first `samples` calibration inputs.

    iterations: Adam steps per layer, each on `batch_size` random samples (the paper uses 10000 x 32; the
        default finishes EfficientNet-Lite0 in a few minutes on 2 cores).
    reg_weight: weight of the rounding regulariser; warm_up: share of the steps without it; lr: Adam's rate.
    """

    iterations: int = 200
    samples: int = 64
    batch_size: int = 8
    reg_weight: float = 0.01
    warm_up: float = 0.2
    lr: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("iterations", "samples", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"AdaRound {name} must be an integer >= 1, got {value!r}")
        if not self.reg_weight >= 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if not 0 <= self.warm_up < 1:
            raise ValueError(f"warm_up must be in [0, 1), got {self.warm_up}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class SmoothQuant:
    """SmoothQuant settings (see `eightbit.graph.transforms.smooth_quant`).

    alphas: migration strength(s) in [0, 1].  One value is used as is; with several, each is tried on the first
        `search_batches` calibration batches and the one with the lowest output error against fp32 is kept.
        The default searches 0.5-0.9: the paper's 0.5 was worse than no smoothing on all-MiniLM-L6-v2 here
        (mean embedding cosine 0.982 vs 0.990), 0.7-0.85 best (0.995).
    """

    alphas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    search_batches: int = 4

    def __post_init__(self) -> None:
        if not self.alphas or not all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"SmoothQuant alphas must be a non-empty tuple of numbers in [0, 1], got {self.alphas!r}")
        if self.search_batches < 1:
            raise ValueError(f"search_batches must be >= 1, got {self.search_batches}")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What to quantize and how.

    keep_float: qualified submodule names (as in `model.named_modules()`) whose ops stay float; a name also
        covers everything below it.
    keep_float_ops: op families that stay float everywhere.
    keep_float_nodes: single ops kept float, by graph node name (the "op" column of `summary()`); what the
        accuracy-driven fallback (`eightbit.analysis.fallback`) writes, since one module may hold several ops.
    fold_batchnorm: fold eval-mode BatchNorm into the preceding conv/linear before quantizing.
    quantize_outputs: also quantize model outputs made by linear/matmul layers (left float by default: logits
        keep full precision and int8 Gemm/MatMul kernels accept float outputs).  Outputs of other ops are
        always quantized, since runtimes would otherwise run the op itself in float.
    bias_correction: fold the mean output shift caused by weight rounding into each layer's bias.
    quantize_embeddings: store embedding tables (token, position) as int8 with one scale per row, weight-only:
        4x smaller files at a negligible error (each looked-up row is dequantized, the lookup stays exact).
    overflow_fix: 7-bit weight codes against int16 saturation on x86 CPUs without VNNI (see OverflowFix).
    smooth_quant: migrate activation outliers into linear weights before calibrating (transformers); None: off.
    target: the runtime whose int8 kernel constraints placement applies (see Target).
    equalize: cross-layer equalization + high-bias absorption before calibrating (per-tensor weights); None: off.
    adaround: learn each conv/linear weight's rounding on calibration samples (low-bit weights); None: off.
        With bias_correction, the mean output shift of the learned rounding is corrected as for round-to-nearest.
    """

    weights: QuantSpec = field(default_factory=int8_weights)
    activations: QuantSpec = field(default_factory=uint8_activations)
    keep_float: tuple[str, ...] = ()
    keep_float_ops: tuple[OpKind, ...] = ()
    keep_float_nodes: tuple[str, ...] = ()
    fold_batchnorm: bool = True
    quantize_outputs: bool = False
    overflow_fix: OverflowFix = OverflowFix.AUTO
    bias_correction: bool = True
    quantize_embeddings: bool = True
    smooth_quant: SmoothQuant | None = None
    target: Target = Target.ONNX
    equalize: Equalize | None = None
    adaround: AdaRound | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            raise TypeError(f"target must be a Target ({[t.value for t in Target]}), got {self.target!r}")
        if not isinstance(self.weights, QuantSpec) or not isinstance(self.activations, QuantSpec):
            raise TypeError("weights and activations must be QuantSpec instances")
        if not isinstance(self.overflow_fix, OverflowFix):
            raise TypeError(f"overflow_fix must be an OverflowFix, got {self.overflow_fix!r}")
        if self.smooth_quant is not None and not isinstance(self.smooth_quant, SmoothQuant):
            raise TypeError(f"smooth_quant takes a SmoothQuant(alphas=...) or None, got {self.smooth_quant!r}")
        if self.equalize is not None and not isinstance(self.equalize, Equalize):
            raise TypeError(f"equalize takes an Equalize(...) or None, got {self.equalize!r}")
        if self.adaround is not None:
            self._check_adaround()
        if isinstance(self.keep_float, str) or isinstance(self.keep_float_ops, (str, OpKind)):
            raise TypeError("keep_float and keep_float_ops take tuples, e.g. keep_float=('classifier',)")
        if isinstance(self.keep_float_nodes, str) or not all(isinstance(n, str) for n in self.keep_float_nodes):
            raise TypeError("keep_float_nodes takes a tuple of op names as summary() lists them, e.g. ('conv2d_3',)")
        for kind in self.keep_float_ops:
            if not isinstance(kind, OpKind):
                raise TypeError(f"keep_float_ops takes OpKind members ({[k.value for k in OpKind]}), got {kind!r}")
        if self.activations.per_channel and self.activations.bits not in (8, 16):
            raise ValueError("per-channel activations are supported at 8 or 16 bits only")
        if self.activations.scheme is Scheme.LOG2:
            raise ValueError("log2 quantization is supported for weights only")
        if (self.weights.scheme is Scheme.FP16) != (self.activations.scheme is Scheme.FP16):
            raise ValueError("fp16 applies to weights and activations together: set scheme=Scheme.FP16 on both")
        if lookup_method(self.weights.method).weight_range is None:
            raise ValueError(
                f"method {self.weights.method!r} is for activations only; weights take "
                f"{sorted(n for n, m in METHODS.items() if m.weight_range)}"
            )
        if lookup_method(self.activations.method).activation_range is None:
            raise ValueError(
                f"method {self.activations.method!r} is for weights only; activations take "
                f"{sorted(n for n, m in METHODS.items() if m.activation_range)}"
            )
        act_method, weight_method = lookup_method(self.activations.method), lookup_method(self.weights.method)
        if self.activations.per_channel and (act_method.needs_histogram or act_method.output_aware):
            raise ValueError(f"method {self.activations.method!r} supports per-tensor activations only")
        if act_method.output_aware or weight_method.output_aware:
            self._check_output_aware()

    def _check_adaround(self) -> None:
        if not isinstance(self.adaround, AdaRound):
            raise TypeError(f"adaround takes an AdaRound(...) or None, got {self.adaround!r}")
        if self.weights.scheme is not Scheme.UNIFORM or self.weights.power_of_two:
            raise ValueError("AdaRound learns integer codes on a fixed grid: use uniform weights without power_of_two")
        if lookup_method(self.weights.method).output_aware:
            raise ValueError("AdaRound cannot be combined with eq (searched) weight scales; use minmax or mse weights")

    def _check_output_aware(self) -> None:
        # The searches pick scales directly: power-of-two rounding or a non-integer format afterwards would
        # change what they measured.
        names = f"{self.activations.method!r}/{self.weights.method!r}"
        if self.weights.scheme is not Scheme.UNIFORM or self.activations.scheme is not Scheme.UNIFORM:
            raise ValueError(f"output-aware calibration ({names}) needs the uniform (integer) scheme")
        if self.activations.per_channel:
            raise ValueError(f"output-aware calibration ({names}) supports per-tensor activations only")
        if self.weights.power_of_two or self.activations.power_of_two:
            raise ValueError(f"output-aware calibration ({names}) cannot be combined with power_of_two scales")
        if lookup_method(self.weights.method).output_aware and self.weights.channel_axis not in (None, 0):
            raise ValueError("eq weights are searched per output channel: leave the weight channel_axis at 0")


def overflow_fix_active(config: QuantConfig, saturation_risk: bool) -> bool:
    """Whether 7-bit weight codes are used for GEMM-backed layers (see OverflowFix)."""
    fix = config.overflow_fix
    spec = config.weights
    # AUTO is about x86 ONNX Runtime / oneDNN; TFLite runtimes (XNNPACK, TFLM) accumulate int8 products in int32.
    auto = fix is OverflowFix.AUTO and saturation_risk and config.target is Target.ONNX
    wanted = fix is OverflowFix.ENABLE or auto
    return wanted and spec.signed and spec.bits == 8


def seven_bit(spec: QuantSpec) -> QuantSpec:
    """The same spec with 7-bit codes ([-63, 63] when narrow)."""
    return replace(spec, bits=7, narrow_range=True)
