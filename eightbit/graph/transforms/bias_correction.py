"""Analytical bias correction: absorb the mean output shift that weight rounding causes into the bias."""

from __future__ import annotations

import torch


def bias_shift(weight_error: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """E[(W_q - W) x] per output channel, given the per-input-channel mean of x.

    weight_error: W_q - W, shaped [out, in/groups, *kernel] (conv) or [out, in] (linear).
    Subtracting the result from the bias makes the quantized layer's output unbiased on the calibration data
    (Nagel et al., "Data-Free Quantization", 2019).  Near zero padding is ignored: it only lowers the mean.
    """
    if weight_error.dim() == 2:
        return weight_error.double() @ input_mean.double()
    per_input = weight_error.double().sum(dim=tuple(range(2, weight_error.dim())))  # [out, in/groups]
    out_channels, in_per_group = per_input.shape
    means = input_mean.double().reshape(groups, in_per_group).repeat_interleave(out_channels // groups, dim=0)
    return (per_input * means).sum(dim=1)
