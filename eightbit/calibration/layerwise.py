"""Output-aware scale search, layer by layer: EasyQuant, and the softmax-KL clip of the logits' layer.

Pure tensor functions.  A layer is its own op `op(x, w)` (the graph's conv with its stride/padding/groups, or
linear; bias included), its constant weight with the weight clipping range convert would use, and the float
inputs and outputs it produced on a few sample inputs.  Candidate clipping ranges are scored by the
int8-simulated output (fake-quantized input and weight through the same op) against the float output.  Nothing
here knows about graphs: `eightbit.calibration.refine` records the layers and applies the results.

Scores are accumulated over chunks of samples as sums of products, so one chunk's output is in memory at a time.
Candidate ranges are factors of the starting range; asymmetric zero points are recomputed from each scaled range
with `qmath.qparams_from_range`, exactly as convert will.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from eightbit import qmath

# Search windows, as factors of the starting range (EasyQuant searches [0.5, 1.2] x the max-based weight scale).
ACTIVATION_FACTORS = torch.linspace(0.5, 1.0, 51)
WEIGHT_FACTORS = torch.linspace(0.5, 1.2, 71)
LOGIT_FACTORS = torch.linspace(0.2, 1.0, 81)


@dataclass
class LayerSamples:
    """One quantized layer and what it saw on the sample inputs.

    op: (x, w) -> y, the layer's own op with its other arguments (bias, stride, ...) bound.
    weight: the float weight; output channels along axis 0.
    inputs, outputs: float inputs and the float outputs op(x, weight), in matching chunks.
    out_axis: the output-channel axis of y (1 for conv, -1 for linear).
    weight_spec: the weight code range convert will use (7-bit codes where the overflow fix applies).
    weight_range: the starting weight range (lo, hi): per output channel, or 0-d tensors for per-tensor weights.
    """

    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    out_axis: int
    weight_spec: object
    weight_range: tuple[torch.Tensor, torch.Tensor]
    _reference_norms: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def reference_norms(self) -> torch.Tensor:
        """Per output channel, the sum of squares of the float outputs (computed once: every candidate needs it)."""
        if self._reference_norms is None:
            self._reference_norms = sum(_per_channel_sum(y * y, self.out_axis) for y in self.outputs)
        return self._reference_norms

    @property
    def weight_axis(self) -> int | None:
        return None if self.weight_range[0].dim() == 0 else 0

    def quantized_weight(self, factor: torch.Tensor | float = 1.0) -> torch.Tensor:
        """The weight fake-quantized with range factor * weight_range (factor: scalar or one per channel)."""
        lo, hi = self.weight_range
        return fake_quantize_range(self.weight, lo * factor, hi * factor, self.weight_spec, self.weight_axis)


def fake_quantize_range(x: torch.Tensor, lo, hi, spec, axis: int | None = None) -> torch.Tensor:
    """x as the int8 model sees it with the clipping range [lo, hi] (scale and zero point as convert computes
    them from a range)."""
    scale, zp = qmath.qparams_from_range(lo, hi, qmin=spec.qmin, qmax=spec.qmax, symmetric=spec.symmetric)
    if axis is not None and scale.dim() > 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    # qmath.fake_quantize's arithmetic in place and without the integer round trip (codes are exact in float32):
    # the same values, in half the passes over the data.  The searches run this once per candidate.
    zp = zp.to(torch.float32)
    q = torch.div(x, scale).round_().add_(zp).clamp_(spec.qmin, spec.qmax)
    return q.sub_(zp).mul_(scale)


def _per_channel_sum(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum of p over all axes but `axis`, in float64.  Contiguous runs are summed first in float32 (cascade
    summation: accurate to ~1e-7, and 3-4x faster than a strided float64 reduction), then the partial sums in
    float64."""
    axis = axis % p.dim()
    if axis == p.dim() - 1:
        return p.reshape(-1, p.shape[-1]).double().sum(0)
    partial = p.flatten(axis + 1).sum(-1) if axis + 1 < p.dim() else p
    return partial.reshape(-1, p.shape[axis]).double().sum(0)


def channel_sums(reference: torch.Tensor, candidate: torch.Tensor, axis: int) -> torch.Tensor:
    """[3, channels]: per output channel, sum(reference * candidate), sum(candidate^2), sum(reference^2), the terms
    of a cosine that add up across chunks."""
    r, c = reference.float(), candidate.float()
    return torch.stack([_per_channel_sum(p, axis) for p in (r * c, c * c, r * r)])


def cosine_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Cosine from `channel_sums` terms (along dim 0); 1 where both sides are all zero, 0 where one is."""
    dot, cc, rr = sums
    denom = (cc * rr).sqrt()
    zero = torch.where((cc == 0) & (rr == 0), 1.0, 0.0).to(dot.dtype)
    return torch.where(denom > 0, dot / denom.clamp_min(1e-300), zero)


def output_sums(layer: LayerSamples, inputs: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """`channel_sums` of op(inputs, weight) against the recorded float outputs, summed over chunks."""
    dot = cc = 0
    for x, y in zip(inputs, layer.outputs, strict=True):
        c = layer.op(x, weight)
        dot = dot + _per_channel_sum(y * c, layer.out_axis)
        cc = cc + _per_channel_sum(c.mul_(c), layer.out_axis)
    return torch.stack([dot, cc, layer.reference_norms])


def output_cosine(layer: LayerSamples, inputs: Sequence[torch.Tensor], weight: torch.Tensor) -> float:
    """Cosine between the layer's whole output (all samples, all channels) for `inputs`/`weight` and the float one."""
    return float(cosine_from_sums(output_sums(layer, inputs, weight).sum(dim=1)))


def search_activation_clip(
    layers: Sequence[LayerSamples],
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec,
    factors: torch.Tensor = ACTIVATION_FACTORS,
    weights: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor t (one of `factors`) of the input range, [t*lo, t*hi], that maximises the output cosine summed
    over `layers` (the layers reading one tensor group).  Each layer's weight is `weights[i]` (already
    fake-quantized), by default its `quantized_weight()`.  Returns (best factor, score per factor); ties go to
    the smaller factor."""
    weights = [layer.quantized_weight() for layer in layers] if weights is None else weights
    scores = torch.zeros(len(factors), dtype=torch.float64)
    for i, t in enumerate(factors):
        for layer, w in zip(layers, weights, strict=True):
            xq = [fake_quantize_range(x, lo * t, hi * t, spec) for x in layer.inputs]
            scores[i] += output_cosine(layer, xq, w)
    return factors[int(torch.argmax(scores))], scores


def search_weight_scales(
    layer: LayerSamples, inputs: Sequence[torch.Tensor], factors: torch.Tensor = WEIGHT_FACTORS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, the factor f (one of `factors`) of the weight range, f * weight_range, that maximises
    the cosine between that channel's output and its float output, for the given (fake-quantized) `inputs`.

    Output channel c depends only on weight row c, so every channel is searched at once: one run of the layer
    per factor.  A per-tensor weight range gets one factor, scored on the whole output.  Returns (factors: one
    per channel, or 0-d; scores [factors, channels] or [factors]); ties go to the smaller factor."""
    per_channel = layer.weight_axis is not None
    rows = []
    for f in factors:
        sums = output_sums(layer, inputs, layer.quantized_weight(f))
        rows.append(cosine_from_sums(sums if per_channel else sums.sum(dim=1)))
    scores = torch.stack(rows)
    return factors[scores.argmax(dim=0)], scores


def easyquant(
    layers: Sequence[LayerSamples],
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec,
    *,
    search_weights: bool = True,
    rounds: int = 2,
    activation_factors: torch.Tensor = ACTIVATION_FACTORS,
    weight_factors: torch.Tensor = WEIGHT_FACTORS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EasyQuant (Wu et al., 2020) for the layers reading one tensor group: alternately search the shared input
    clip (`search_activation_clip`, weights at their current scales) and each layer's per-channel weight scales
    (`search_weight_scales`, input at the current clip), `rounds` times.  Windows stay relative to the starting
    ranges ([lo, hi] and each layer's weight_range), as in the paper, so rounds refine rather than compound.

    Returns (input range factor t, one weight factor tensor per layer): the ranges are [t*lo, t*hi] and
    factor * weight_range.  Without `search_weights`, weights stay at their ranges and one round is enough."""
    weight_factor = [torch.ones(()) for _ in layers]
    t = torch.ones(())
    for _ in range(rounds if search_weights else 1):
        weights = [layer.quantized_weight(f) for layer, f in zip(layers, weight_factor, strict=True)]
        t, _ = search_activation_clip(layers, lo, hi, spec, activation_factors, weights)
        if search_weights:
            for i, layer in enumerate(layers):
                xq = [fake_quantize_range(x, lo * t, hi * t, spec) for x in layer.inputs]
                weight_factor[i], _ = search_weight_scales(layer, xq, weight_factors)
    return t, weight_factor


def softmax_kl(reference: torch.Tensor, candidate: torch.Tensor, axis: int) -> torch.Tensor:
    """KL(softmax(reference) || softmax(candidate)) along `axis`, one value per remaining position (float64)."""
    log_p = torch.log_softmax(reference.double(), axis)
    log_q = torch.log_softmax(candidate.double(), axis)
    return (log_p.exp() * (log_p - log_q)).sum(axis)


def cross_entropy_clip(
    layers: Sequence[LayerSamples],
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec,
    factors: torch.Tensor = LOGIT_FACTORS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the layer(s) producing the model's logits, the factor t (one of `factors`) of their input range,
    [t*lo, t*hi], that minimises the mean KL(softmax(float logits) || softmax(int8-simulated logits)), summed
    over `layers`; weights are quantized at their weight range.  Softmax runs over each layer's output-channel
    axis (the classes; per position for a conv head).  Returns (best factor, mean KL per factor); ties go to the
    smaller factor."""
    weights = [layer.quantized_weight() for layer in layers]
    scores = torch.zeros(len(factors), dtype=torch.float64)
    for i, t in enumerate(factors):
        for layer, w in zip(layers, weights, strict=True):
            total, count = 0.0, 0
            for x, y in zip(layer.inputs, layer.outputs, strict=True):
                kl = softmax_kl(y, layer.op(fake_quantize_range(x, lo * t, hi * t, spec), w), layer.out_axis)
                total, count = total + float(kl.sum()), count + kl.numel()
            scores[i] += total / max(count, 1)
    return factors[int(torch.argmin(scores))], scores
