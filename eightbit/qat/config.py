"""QAT settings: a frozen, keyword-only dataclass validated on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BatchNormMode(enum.Enum):
    """How a BatchNorm that follows a conv/linear is handled during QAT.

    SIMULATE: keep it and simulate its folding: the weight that is fake-quantized is the folded weight, with batch
        statistics while BN trains and running statistics once frozen (`QATConfig.freeze_bn_after`).
    FOLD: fold it into the conv/linear with its running statistics before training (as PTQ does); the folded
        weight and bias are then trained directly.
    """

    SIMULATE = "simulate"
    FOLD = "fold"


@dataclass(frozen=True, kw_only=True)
class QATConfig:
    """How the fake quantizers train.  A step is one forward pass in training mode.

    learn_scales: learn scales with LSQ (Esser et al. 2019: STE, scale gradient scaled by 1/sqrt(N * Qp)); off, the
        scales keep their PTQ (or observed) values.
    learn_zero_points: also learn zero points of asymmetric activations (STE through the rounding).
    observe_steps: for the first N steps every quantizer observes ranges (moving average of each batch's min/max,
        reduced across DDP ranks) and sets its parameters from them instead of learning; learning starts after.
    observer_momentum: moving-average momentum of the activation observers (weights always use the current
        weight's range).
    freeze_quantizers_after: stop learning quantization parameters after this many steps (None: never).
    batchnorm: BatchNormMode for conv/linear -> BatchNorm pairs.
    freeze_bn_after: with SIMULATE, switch BatchNorms to their running statistics (and stop updating them) after
        this many steps (None: never; 0: from the start).  A BatchNorm that follows no conv/linear (for example
        input preprocessing) is always frozen.
    """

    learn_scales: bool = True
    learn_zero_points: bool = False
    observe_steps: int = 0
    observer_momentum: float = 0.9
    freeze_quantizers_after: int | None = None
    batchnorm: BatchNormMode = BatchNormMode.SIMULATE
    freeze_bn_after: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batchnorm, BatchNormMode):
            raise TypeError(
                f"batchnorm must be a BatchNormMode ({[m.value for m in BatchNormMode]}), got {self.batchnorm!r}"
            )
        if self.observe_steps < 0:
            raise ValueError(f"observe_steps must be >= 0, got {self.observe_steps}")
        if not 0.0 <= self.observer_momentum < 1.0:
            raise ValueError(f"observer_momentum must be in [0, 1), got {self.observer_momentum}")
        for name in ("freeze_quantizers_after", "freeze_bn_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None or >= 0, got {value}")
