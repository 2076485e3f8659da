"""A conv/linear layer during QAT: fp32 shadow weight, fake-quantized weight, and simulated BatchNorm folding.

With a BatchNorm, the weight that is fake-quantized is the folded one (Jacob et al. 2018; torch.ao's ConvBn):
while BN trains, w * gamma / sigma_running is quantized, the conv output is rescaled by sigma_running / gamma and
BN runs with batch statistics (so the result equals conv(x, q(w_folded)) with the running-statistics fold
replaced by the batch one); once frozen, or in eval mode, the layer is exactly conv(x, q(w_folded), b_folded)
with the running statistics, computed by the PTQ fold itself (`fold_bn`), which is what convert stores.
The rescale by sigma_running / gamma is applied to the quantized weight (one pass over the weight) rather than
to the conv output (passes over the activation), which is the same per output channel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from eightbit.graph.transforms.fold_bn import fold_bn
from eightbit.qat.fake_quant import FakeQuantizer, round_ste


class BatchNormState(nn.Module):
    """The parameters and running statistics of a BatchNorm that follows a conv/linear."""

    def __init__(self, gamma, beta, mean, var, eps: float, momentum: float | None) -> None:
        super().__init__()
        channels = mean.shape[0]
        self.weight = nn.Parameter((torch.ones(channels) if gamma is None else gamma).detach().float().clone())
        self.bias = nn.Parameter((torch.zeros(channels) if beta is None else beta).detach().float().clone())
        self.register_buffer("running_mean", mean.detach().float().clone())
        self.register_buffer("running_var", var.detach().float().clone())
        self.eps = float(eps)
        self.momentum = 0.1 if momentum is None else float(momentum)


class QATLayer(nn.Module):
    """One conv/linear op of the captured graph with trainable weights.

    target, rest_args, kwargs: the ATen op and its arguments after (input, weight, bias).
    quantizer: the weight's fake quantizer; None for a layer kept float (it still trains).
    batchnorm: a following BatchNorm whose folding is simulated; None when there is none or it was folded.
    """

    def __init__(
        self,
        node_name: str,
        target,
        rest_args: tuple,
        kwargs: dict,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantizer: FakeQuantizer | None,
        batchnorm: BatchNormState | None = None,
    ) -> None:
        super().__init__()
        self.node_name = node_name
        self.target = target
        self.rest_args = tuple(rest_args)
        self.kwargs = dict(kwargs)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.quantizer = quantizer
        self.batchnorm = batchnorm
        self.bn_frozen = False
        self.__dict__["input_quantizer"] = None  # the activation quantizer feeding this layer (not a submodule)

    def quantize_bias_with(self, input_quantizer: FakeQuantizer | None) -> None:
        """Simulate the int32 bias (scale input_scale * weight_scale) that convert stores, given the layer's
        per-tensor input quantizer."""
        if input_quantizer is not None and input_quantizer.axis is None and self.quantizer is not None:
            self.__dict__["input_quantizer"] = input_quantizer

    def get_extra_state(self) -> dict:
        return {"bn_frozen": self.bn_frozen}

    def set_extra_state(self, state: dict) -> None:
        self.bn_frozen = state["bn_frozen"]

    def extra_repr(self) -> str:
        return f"{self.node_name}: {self.target}, batchnorm={'frozen' if self.bn_frozen else 'training'}"

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.quantizer is None else self.quantizer(w)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with the BatchNorm folded in with its running statistics (differentiable)."""
        bn = self.batchnorm
        if bn is None:
            return self.weight, self.bias
        return fold_bn(self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batchnorm is not None and self.training and not self.bn_frozen:
            return self._forward_bn_training(x)
        w, b = self.folded()
        return self.target(x, self._quantize_weight(w), self._quantize_bias(b), *self.rest_args, **self.kwargs)

    def _quantize_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        source = self.input_quantizer
        if b is None or source is None or not source.fake_quant or not self.quantizer.fake_quant:
            return b
        step = source.current_scale() * self.quantizer.current_scale()
        limit = float(torch.iinfo(torch.int32).max)
        return torch.clamp(round_ste(b / step), -limit, limit) * step

    def _forward_bn_training(self, x: torch.Tensor) -> torch.Tensor:
        """conv(x, q(w * f)) / f + b, then BatchNorm with batch statistics (f = gamma / sigma_running).

        The division by f is applied to the quantized weight, not to the output: per output channel,
        conv(x, q(w * f)) / f = conv(x, q(w * f) / f), so the rescale costs a pass over the weight instead of
        two over the activation (forward and backward), and the bias goes into the conv itself."""
        bn = self.batchnorm
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        # gamma = 0 makes the BN output beta whatever its input: any finite rescale will do, 1 avoids 0 / 0.
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        shape = (-1, *([1] * (self.weight.dim() - 1)))
        w = self._quantize_weight(self.weight * factor.reshape(shape)) / factor.reshape(shape)
        y = self.target(x, w, self.bias, *self.rest_args, **self.kwargs)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)

    @torch.no_grad()
    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias convert quantizes: exactly those of the eval-mode forward pass."""
        w, b = self.folded()
        return w.detach().clone(), None if b is None else b.detach().clone()
