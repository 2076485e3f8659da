"""Small helpers shared by graph passes."""

from __future__ import annotations

import dataclasses
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


def output_names(gm: fx.GraphModule) -> list[str]:
    """A name per tensor leaf of the graph's output: the keys of a dict or `ModelOutput` the model returned
    (`last_hidden_state`, `logits`), else `output` (one leaf) or `output_<i>`."""
    (flat,) = next(n for n in gm.graph.nodes if n.op == "output").args
    leaves = torch.utils._pytree.tree_leaves(flat)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]  # constants are no outputs
    default = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    paths = _leaf_paths(spec, ()) if spec is not None else None
    if not paths or len(paths) != len(leaves):
        return default
    names = [".".join(paths[i]) if paths[i] and all(isinstance(k, str) for k in paths[i]) else None for i in tensors]
    return names if None not in names and len(set(names)) == len(names) else default


def _leaf_paths(spec, prefix: tuple) -> list[tuple] | None:
    """The key path of every leaf of a pytree spec: strings for dict keys and named fields, ints for positions."""
    if spec.is_leaf():
        return [prefix]
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    context = spec.context
    if (
        isinstance(context, (list, tuple))
        and len(context) == len(children)
        and all(isinstance(k, str) for k in context)
    ):
        keys = list(context)  # dict / ModelOutput keys
    elif dataclasses.is_dataclass(spec.type) and isinstance(context, (list, tuple)) and context:
        keys = list(context[0])  # torch.export.register_dataclass: (fields that are not None, fields that are)
    elif isinstance(context, type) and hasattr(context, "_fields"):
        keys = list(context._fields)  # namedtuple
    else:
        keys = list(range(len(children)))
    if len(keys) != len(children):
        keys = list(range(len(children)))
    out = []
    for key, child in zip(keys, children, strict=True):
        paths = _leaf_paths(child, (*prefix, key))
        if paths is None:
            return None
        out += paths
    return out
