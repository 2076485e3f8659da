"""Multiply-accumulate accounting: how much of a model's arithmetic runs in int8.

Op rows mislead (a classifier's one float Linear is one row out of fifty but may be most of the work; a float
LayerNorm is a row but no multiply-accumulates), so the share that is int8 is counted in MACs of the ops
that do them: convolutions, linear layers and matrix products.  The sizes are the ones capture recorded
(`node.meta["val"]`); symbolic sizes (the dynamic batch and sequence) count at their example value.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx

from eightbit.graph import ops
from eightbit.graph.placement import Placement
from eightbit.graph.utils import attr_value

aten = torch.ops.aten

# Warn when more than this share of the multiply-accumulates stays float.  10%: above it a model is no
# longer "an int8 model with a few float layers" (the speedup of int8 kernels is capped near 1 / share).
FLOAT_MAC_WARNING_SHARE = 0.10


class MostlyFloatWarning(UserWarning):
    """More than `FLOAT_MAC_WARNING_SHARE` of the model's multiply-accumulates stay float."""


_CONVS = {
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
    ops.CONV2D_PADDED,
}
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}


def _shape(gm: fx.GraphModule, arg) -> tuple[int, ...] | None:
    """The example sizes of a node's value (symbolic sizes at their hint), or None."""
    if not isinstance(arg, fx.Node):
        return None
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor):
        val = attr_value(gm, arg)
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(_size(s) for s in val.shape)


def _size(s) -> int:
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Multiply-accumulates of one conv / linear / matmul-like node for the example input; 0 for other ops."""
    if node.op != "call_function":
        return 0
    target, args = node.target, node.args
    out = _shape(gm, node)
    if out is None:
        return 0
    if target in _CONVS:
        w = _shape(gm, args[1])
        return math.prod(out) * math.prod(w[1:]) if w else 0
    if target is aten.linear.default:
        w = _shape(gm, args[1])
        return math.prod(out) * w[-1] if w else 0
    if target in _MATMULS or target in (aten.addmm.default, aten.baddbmm.default):
        a = _shape(gm, args[1] if target in (aten.addmm.default, aten.baddbmm.default) else args[0])
        return math.prod(out) * a[-1] if a else 0
    if target is aten.einsum.default:
        return _einsum_macs(gm, node)
    return 0


def _einsum_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    equation, operands = node.args[0], node.args[1]
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, operand in zip(inputs, operands, strict=False):
        shape = _shape(gm, operand)
        if shape is None or "." in letters or len(letters) != len(shape):
            return 0
        sizes.update(zip(letters, shape, strict=True))
    return math.prod(sizes.values()) if len(operands) > 1 else 0


@dataclass
class MacReport:
    """Multiply-accumulates per compute node, split into int8 and float (with the reason it stayed float)."""

    int8: dict[str, int] = field(default_factory=dict)
    float: dict[str, tuple[int, str]] = field(default_factory=dict)  # node -> (MACs, why)

    @property
    def total(self) -> int:
        return sum(self.int8.values()) + sum(m for m, _ in self.float.values())

    @property
    def int8_share(self) -> float:
        """Share of the multiply-accumulates that run in int8 (1.0 for a model without any)."""
        return sum(self.int8.values()) / self.total if self.total else 1.0

    def top_float(self, n: int = 5) -> list[tuple[str, int, str]]:
        """The n float ops with the most MACs: (node, MACs, why)."""
        ranked = sorted(self.float.items(), key=lambda kv: -kv[1][0])
        return [(name, macs, why) for name, (macs, why) in ranked[:n] if macs > 0]

    def headline(self) -> str:
        """One line: the int8 share of MACs."""
        return (
            f"int8 share: {100 * self.int8_share:.1f}% of {_human(self.total)} multiply-accumulates "
            f"(conv/linear/matmul) run in int8"
        )

    def float_lines(self, n: int = 5) -> list[str]:
        total = max(self.total, 1)
        return [f"  {name}: {100 * macs / total:.1f}% of MACs, float: {why}" for name, macs, why in self.top_float(n)]


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def count_macs(gm: fx.GraphModule, placement: Placement) -> MacReport:
    """MACs of every compute node of the placed (not yet converted) graph, int8 or float."""
    report = MacReport()
    for node in gm.graph.nodes:
        macs = node_macs(gm, node)
        if macs == 0:
            continue
        if node.name in placement.quantized_ops:
            report.int8[node.name] = macs
        else:
            why = placement.float_ops.get(node.name, "no int8 rule")
            report.float[node.name] = (macs, why)
    return report


def warn_if_mostly_float(report: MacReport, threshold: float = FLOAT_MAC_WARNING_SHARE) -> None:
    """Warn (`MostlyFloatWarning`) when more than `threshold` of the MACs stay float, naming the largest."""
    if report.total == 0 or 1.0 - report.int8_share <= threshold:
        return
    lines = "\n".join(report.float_lines())
    warnings.warn(
        f"eightbit: only {100 * report.int8_share:.1f}% of the multiply-accumulates run in int8 "
        f"(more than {100 * threshold:.0f}% stay float); the largest float ops:\n{lines}\n"
        "See QuantizedModel.summary() for every op.",
        MostlyFloatWarning,
        stacklevel=3,
    )
