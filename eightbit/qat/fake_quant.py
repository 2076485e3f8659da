"""Fake quantization with learnable parameters: pure functions (STE rounding, LSQ gradient scaling, the fake
quantizer itself) and `FakeQuantizer`, the module with MegEngine-style switches for observing, fake-quantizing
and learning.

Forward values equal `eightbit::quantize` followed by `eightbit::dequantize` bit for bit (same division, same
half-to-even rounding), so a QAT model in eval mode computes what its converted model computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from eightbit import qmath
from eightbit.calibration.encodings import Encoding
from eightbit.qat.distributed import reduce_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) (half to even) in the forward pass, identity gradient (straight-through estimator).

    x + (round(x) - x) is exactly round(x): the difference of two floats this close is exact (Sterbenz)."""
    return x + (torch.round(x) - x).detach()


def lsq_grad_factor(values_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp): N values share one scale (per sample for activations, per
    channel for weights) and Qp = qmax is the largest positive code."""
    return 1.0 / math.sqrt(max(values_per_scale, 1) * max(qmax, 1))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale, differentiable.

    Computed as round(clip(x / s, qmin - z, qmax - z)) * s, LSQ's order, which gives the same values for integer
    z and the paper's gradients (STE): d/dx is 1 inside the clipping range and 0 outside; d/dscale is
    round(x/s) - x/s inside and qmin - z (-Qn) or qmax - z (Qp) outside; d/dzero_point is 0 inside and -scale
    outside.  `zero_point` must hold integer values (round it with `round_ste` first when it is learned)."""
    s = qmath.broadcast(scale, x, axis)
    z = qmath.broadcast(zero_point, x, axis)
    return round_ste(torch.clamp(x / s, qmin - z, qmax - z)) * s


class _LsqFakeQuantize(torch.autograd.Function):
    """round(clip(x / s, qmin - z, qmax - z)) * s with LSQ's gradients, as one autograd node.

    Fast path, whenever the zero point is one number (per-tensor, or per-channel with equal zero points, as for
    symmetric weights): the clip bounds are plain numbers, and no boolean mask is ever built (on CPU a mask and
    its use cost ~20x an arithmetic pass).  The forward pass is divide, clamp, round, multiply; a learning scale
    adds LSQ's per-value term (round(v) - v inside the clip range, the bound outside: two more passes), saved
    for the backward pass, which is then one pass for the input (the STE mask through `hardtanh_backward`, with
    bounds one float below / above the clip bounds so that the bounds themselves count as inside) and one dot
    product per learned parameter.  `learn` False (a frozen quantizer): no LSQ term, zero parameter gradients.
    Other zero points (per-channel, unequal) take the general path: masks, recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis, factor: float, learn: bool):
        ctx.config = (qmin, qmax, axis, factor, learn)
        ctx.bounds = _scalar_bounds(zero_point, qmin, qmax, x.dtype)
        s = qmath.broadcast(scale, x, axis)
        if ctx.bounds is None:
            z = qmath.broadcast(zero_point, x, axis)
            ctx.save_for_backward(x, scale, zero_point)
            return torch.clamp(x / s, qmin - z, qmax - z).round_().mul_(s)
        lo, hi, below, above = ctx.bounds
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        v = x / s
        q = torch.clamp(v, lo, hi).round_()
        out = q * s
        term = None
        if need_s and learn:
            # LSQ's d out / d s per value: round(v) - v inside the clip range; outside, v * 0 leaves the bound.
            term = q.sub_(torch.ops.aten.hardtanh_backward(v, v, below, above))
        ctx.save_for_backward(v if need_x or (need_z and learn) else None, term, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.bounds is None:
            return (*_general_backward(ctx, grad), None, None, None, None, None)
        v, term, scale = ctx.saved_tensors
        _, _, axis, factor, learn = ctx.config
        _, _, below, above = ctx.bounds
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        grad_x = grad_s = grad_z = None
        if v is not None:
            grad_x = torch.ops.aten.hardtanh_backward(grad, v, below, above)  # STE: grad inside, 0 outside
        if need_s:
            grad_s = _channel_dot(grad, term, axis).reshape(scale.shape) * factor if learn else torch.zeros_like(scale)
        if need_z:
            if learn:  # d out / d z is -s where clipped, 0 inside
                clipped = _channel_sum(grad, axis) - _channel_sum(grad_x, axis)
                grad_z = -clipped.reshape(scale.shape) * scale * factor
            else:
                grad_z = torch.zeros_like(scale)
        return grad_x if need_x else None, grad_s, grad_z, None, None, None, None, None


def _scalar_bounds(zero_point: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype):
    """(lo, hi, below, above) when every zero point is the same number, else None: the clip bounds in code
    units and the nearest `dtype` values beyond them (the exclusive bounds `hardtanh_backward` takes)."""
    kind = _NUMPY_FLOATS.get(dtype)
    flat = zero_point.detach().reshape(-1)
    if kind is None or flat.numel() == 0:
        return None
    z = float(flat[0])
    if flat.numel() > 1 and not bool((flat == z).all()):
        return None
    lo, hi = qmin - z, qmax - z
    below = float(np.nextafter(kind(lo), kind(-np.inf)))
    above = float(np.nextafter(kind(hi), kind(np.inf)))
    return lo, hi, below, above


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def _reduced_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if axis is None or d != axis % x.dim()]


def _channel_dot(a: torch.Tensor, b: torch.Tensor, axis: int | None) -> torch.Tensor:
    """sum(a * b), per channel along `axis`; per tensor a dot product (one pass, no temporary)."""
    if axis is None:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(_reduced_dims(a, axis))


def _channel_sum(a: torch.Tensor, axis: int | None) -> torch.Tensor:
    return a.sum() if axis is None else a.sum(_reduced_dims(a, axis))


def _general_backward(ctx, grad):
    """LSQ's gradients with per-channel clip bounds: masks, and x / s recomputed (only x was saved)."""
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, factor, learn = ctx.config
    s, z = qmath.broadcast(scale, x, axis), qmath.broadcast(zero_point, x, axis)
    lo, hi = qmin - z, qmax - z
    v = x / s
    inside = (v >= lo) & (v <= hi)
    grad_x = grad * inside if ctx.needs_input_grad[0] else None
    dims = _reduced_dims(x, axis)
    grad_scale = grad_zp = None
    if ctx.needs_input_grad[1]:
        # round(clip(v)) is lo / hi where clipped, so subtracting v only inside gives LSQ's d out / d s.
        term = torch.clamp(v, lo, hi).round_().sub_(v * inside)
        grad_scale = (grad * term).sum(dims).reshape(scale.shape) * factor
    if ctx.needs_input_grad[2]:
        grad_zp = -(grad * ~inside).sum(dims).reshape(zero_point.shape) * scale * factor
    if not learn:
        grad_scale = None if grad_scale is None else torch.zeros_like(grad_scale)
        grad_zp = None if grad_zp is None else torch.zeros_like(grad_zp)
    return grad_x, grad_scale, grad_zp


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None,
    grad_factor: float,
    learn: bool = True,
) -> torch.Tensor:
    """`fake_quantize` (same values, same gradients) with the scale and zero-point gradients multiplied by
    `grad_factor` (LSQ's g), as one autograd node: cheaper in training than autograd through the composed ops.
    `learn` False gives the scale and zero point zero gradients (and skips computing them)."""
    return _LsqFakeQuantize.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor, learn)


class FakeQuantizer(nn.Module):
    """A learnable fake quantizer for one tensor group or one weight.

    Parameters: `scale` (or `log2_scale` for power-of-two scales, trained in the log2 domain and rounded to an
    integer exponent in the forward pass) and, when learned, `zero_point`.  Switches (saved in `state_dict`):
    observing: in training mode, set the parameters from the observed range (moving average of each batch's
        min/max, reduced over DDP ranks) before quantizing;
    fake_quant: quantize at all (off: identity);
    learning: the parameters get gradients (off: they get zero gradients, so DDP still sees them used).
    """

    def __init__(
        self,
        encoding: Encoding,
        *,
        symmetric: bool,
        power_of_two: bool,
        learn_scale: bool = True,
        learn_zero_point: bool = False,
        momentum: float = 0.9,
        per_sample: bool = True,
    ) -> None:
        super().__init__()
        self.qmin, self.qmax, self.axis = encoding.qmin, encoding.qmax, encoding.axis
        self.symmetric, self.power_of_two, self.momentum = symmetric, power_of_two, momentum
        self.per_sample = per_sample  # activations: N counts one sample's values; weights: the whole tensor's
        scale, zp = (t.float() for t in encoding.tensors_())
        if power_of_two:
            self.log2_scale = nn.Parameter(torch.log2(scale))
        else:
            self.scale = nn.Parameter(scale.clone())
        if not learn_scale:
            self._scale_param().requires_grad_(False)
        learn_zp = learn_zero_point and not symmetric
        if learn_zp:
            self.zero_point = nn.Parameter(zp.clone())
        else:
            self.register_buffer("zero_point", zp.clone())
        # Scales stay above 1/1024 of their initial value: LSQ steps can overshoot zero on small scales.
        self.register_buffer("min_scale", scale.clone() / 1024)
        lo, hi = encoding.range if encoding.range else (scale * (self.qmin - zp), scale * (self.qmax - zp))
        self.register_buffer("observed_lo", torch.as_tensor(lo, dtype=torch.float32).reshape(scale.shape).clone())
        self.register_buffer("observed_hi", torch.as_tensor(hi, dtype=torch.float32).reshape(scale.shape).clone())
        self.observing = False
        self.fake_quant = True
        self.learning = learn_scale or learn_zp

    # -- state ------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"observing": self.observing, "fake_quant": self.fake_quant, "learning": self.learning}

    def set_extra_state(self, state: dict) -> None:
        self.observing, self.fake_quant, self.learning = state["observing"], state["fake_quant"], state["learning"]

    def extra_repr(self) -> str:
        return (
            f"codes=[{self.qmin}, {self.qmax}], axis={self.axis}, power_of_two={self.power_of_two}, "
            f"observing={self.observing}, fake_quant={self.fake_quant}, learning={self.learning}"
        )

    # -- parameters -------------------------------------------------------------------------------------------
    def _scale_param(self) -> nn.Parameter:
        return self.log2_scale if self.power_of_two else self.scale

    def _positive(self, scale: torch.Tensor) -> torch.Tensor:
        # Straight-through floor: the value is clamped, the gradient still flows so the scale can grow back.
        return scale + (torch.maximum(scale, self.min_scale) - scale).detach()

    def _raw_scale(self) -> torch.Tensor:
        if self.power_of_two:
            return torch.exp2(round_ste(self.log2_scale))
        return self._positive(self.scale)

    def current_scale(self) -> torch.Tensor:
        """The scale the forward pass uses now (a power of two when `power_of_two`)."""
        return self._raw_scale().detach()

    def current_zero_point(self) -> torch.Tensor:
        """The integer zero point the forward pass uses now."""
        return torch.clamp(torch.round(self.zero_point.detach()), self.qmin, self.qmax)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observing:
            self.observe(x)
        if not self.fake_quant:
            return x
        factor = lsq_grad_factor(self._values_per_scale(x), self.qmax)
        scale = self._raw_scale()
        zp = self.zero_point
        # A buffer is copied: observing later in this forward pass (shared groups) updates it in place.
        zp = torch.clamp(round_ste(zp), self.qmin, self.qmax) if isinstance(zp, nn.Parameter) else zp.clone()
        # Not learning (frozen, or eval mode): the parameters still get (zero) gradients, so DDP sees them used.
        learn = self.training and self.learning
        return lsq_fake_quantize(x, scale, zp, self.qmin, self.qmax, self.axis, factor, learn)

    def _values_per_scale(self, x: torch.Tensor) -> int:
        n = x.numel()
        if self.per_sample and x.dim() > 0:
            n //= max(x.shape[0], 1)
        if self.axis is not None:
            n //= max(x.shape[self.axis], 1)
        return n

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold `x`'s range (over all DDP ranks) into the moving average and set the parameters from it."""
        if self.axis is None:
            lo, hi = torch.aminmax(x.detach())
        else:
            lo, hi = torch.aminmax(x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1), dim=1)
        lo, hi = reduce_range(lo.float(), hi.float())
        m = self.momentum if self.per_sample else 0.0  # weights: the current weight's range
        self.observed_lo.mul_(m).add_((1 - m) * lo)
        self.observed_hi.mul_(m).add_((1 - m) * hi)
        scale, zp = qmath.qparams_from_range(
            self.observed_lo, self.observed_hi, qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric
        )
        if self.power_of_two:
            self.log2_scale.copy_(torch.ceil(torch.log2(scale)))  # ceil: never clips more than observed
            if not self.symmetric:
                s = torch.exp2(self.log2_scale)
                zp = torch.clamp(
                    self.qmin - torch.round(torch.minimum(self.observed_lo, torch.zeros(())) / s), self.qmin, self.qmax
                )
        else:
            self.scale.copy_(scale)
        self.zero_point.copy_(zp.float())

    # -- conversion -------------------------------------------------------------------------------------------
    def encoding(self, tensors: list[str]) -> Encoding:
        """The current parameters as a PTQ `Encoding` (what convert puts in the Q/DQ pair)."""
        scale, zp = self.current_scale(), self.current_zero_point()
        lo, hi = scale * (self.qmin - zp), scale * (self.qmax - zp)
        flat = lambda t: t.reshape(-1).tolist()  # noqa: E731
        return Encoding(
            flat(scale),
            [int(v) for v in flat(zp)],
            self.qmin,
            self.qmax,
            self.axis,
            (flat(lo), flat(hi)),
            tensors=list(tensors),
        )
