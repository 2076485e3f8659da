"""Small helpers shared by graph passes."""

from __future__ import annotations

import operator

import torch
from torch import fx

# node.meta key: why a graph pass had to leave this node float; placement reports it instead of "no int8 rule".
FLOAT_REASON = "eightbit_float_reason"


def attr_value(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node, else None (also for non-constant inputs)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return operator.attrgetter(node.target)(gm)


def add_constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """Register `value` as a new buffer with a unique flat name and return a get_attr node for it."""
    base = name.replace(".", "_")
    unique, i = base, 0
    while hasattr(gm, unique):
        i += 1
        unique = f"{base}_{i}"
    gm.register_buffer(unique, value.detach().clone())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(unique)


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost nn.Module that produced `node` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # torch.export records e.g. "L['self'].layer1[0].conv1" or "layer1.0.conv1"; normalise to dotted form.
    for junk in ("L['self'].", "L['self']", "L__self__"):
        path = path.replace(junk, "")
    return path.replace("[", ".").replace("]", "").lstrip(".")
