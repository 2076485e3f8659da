"""ONNX handlers for shapes, indexing, masks and reductions (see `eightbit.export.emitter`).

Symbolic sizes (`aten.sym_size.int`, the dynamic batch and sequence lengths) are 1-element int64 tensors
here: they are only read as parts of shapes, slice bounds and ranges.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch import fx

from eightbit.export.emitter import Emitter, Unsupported, _arg, _np_dtype, _onnx_dtype, aten, handles

# ------------------------------------------------------------------------------------------- shapes


@handles(aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default)
def _identity(em: Emitter, node: fx.Node) -> str:
    return em.value(node.args[0])


@handles(aten.flatten.using_ints)
def _flatten(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    rank = em.rank(x)
    start, end = _arg(node, 1, "start_dim", 0) % rank, _arg(node, 2, "end_dim", -1) % rank
    if end != rank - 1:
        raise Unsupported("flatten that keeps trailing dims")
    if start == 0:
        return em.add("Reshape", [em.value(x), em.ints([-1])], "flatten")
    # Keep the leading dims as they are (0 = copy from the input), merge the rest.
    return em.add("Reshape", [em.value(x), em.ints([0] * start + [-1])], "flatten")


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(em: Emitter, node: fx.Node) -> str:
    return em.add("Reshape", [em.value(node.args[0]), em.shape_list(node.args[1])], "reshape")


@handles(aten.permute.default)
def _permute(em: Emitter, node: fx.Node) -> str:
    rank = em.rank(node.args[0])
    return em.add("Transpose", [em.value(node.args[0])], "transpose", perm=[d % rank for d in node.args[1]])


@handles(aten.transpose.int, aten.t.default)
def _transpose(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    rank = em.rank(x)
    a, b = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return em.add("Transpose", [em.value(x)], "transpose", perm=perm)


@handles(aten.unsqueeze.default)
def _unsqueeze(em: Emitter, node: fx.Node) -> str:
    return em.add("Unsqueeze", [em.value(node.args[0]), em.ints([node.args[1]])], "unsqueeze")


@handles(aten.squeeze.dims, aten.squeeze.dim)
def _squeeze(em: Emitter, node: fx.Node) -> str:
    dims = node.args[1]
    return em.add("Squeeze", [em.value(node.args[0]), em.ints([dims] if isinstance(dims, int) else dims)], "squeeze")


@handles(aten.cat.default)
def _cat(em: Emitter, node: fx.Node) -> str:
    return em.add("Concat", [em.value(t) for t in node.args[0]], "concat", axis=int(_arg(node, 1, "dim", 0)))


@handles(aten.sym_size.int)
def _sym_size(em: Emitter, node: fx.Node) -> str:
    # A symbolic size is kept as a 1-element int64 tensor: it is only ever read as part of a shape.
    dim = node.args[1]
    bounds = {"start": dim} if dim == -1 else {"start": dim, "end": dim + 1}
    return em.add("Shape", [em.value(node.args[0])], "size", **bounds)


@handles(aten.slice.Tensor)
def _slice(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    dim, start, end, step = (
        _arg(node, i, n, d) for i, n, d in ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1))
    )
    start = 0 if start is None else start
    end = np.iinfo(np.int64).max if end is None else end
    bounds = [em.shape_list([v]) for v in (start, end)]
    return em.add("Slice", [em.value(x), *bounds, em.ints([dim]), em.ints([step])], "slice")


@handles(aten.select.int)
def _select(em: Emitter, node: fx.Node) -> str:
    """x.select(dim, i) (x[:, 0], a CLS token): Gather of one index (negative counts from the end), then the
    axis is dropped."""
    x, dim, index = node.args[:3]
    if not isinstance(index, int):
        raise Unsupported("select at a computed index")
    row = em.add("Gather", [em.value(x), em.ints([index])], "select", axis=int(dim))
    return em.add("Squeeze", [row, em.ints([dim])], "select")


@handles(aten.expand.default)
def _expand(em: Emitter, node: fx.Node) -> str:
    # torch's -1 keeps a dim; ONNX Expand broadcasts both ways, so a 1 does the same.
    sizes = [1 if isinstance(s, int) and s == -1 else s for s in node.args[1]]
    return em.add("Expand", [em.value(node.args[0]), em.shape_list(sizes)], "expand")


@handles(aten.expand_as.default)
def _expand_as(em: Emitter, node: fx.Node) -> str:
    shape = em.add("Shape", [em.value(node.args[1])], "shape")
    return em.add("Expand", [em.value(node.args[0]), shape], "expand")


@handles(aten.gather.default)
def _gather(em: Emitter, node: fx.Node) -> str:
    x, dim, index = node.args[:3]
    return em.add("GatherElements", [em.value(x), em.value(index)], "gather", axis=int(dim))


@handles(aten.index.Tensor)
def _index(em: Emitter, node: fx.Node) -> str:
    """x[i0, i1, ...] with index tensors for the leading dims: the indices broadcast together, stack on a
    new last axis, and GatherND reads the rows."""
    x, indices = node.args[:2]
    if any(i is None or em.dtype(i) == torch.bool for i in indices):
        raise Unsupported("indexing with None (sliced) dims or boolean masks")
    names = [em.cast_to(i, torch.int64) for i in indices]
    zeros = em.add("Mul", [names[0], em.ints([0])], "zeros")
    for name in names[1:]:  # zeros in the broadcast shape of all the indices
        zeros = em.add("Add", [zeros, em.add("Mul", [name, em.ints([0])], "zeros")], "zeros")
    parts = [em.add("Unsqueeze", [em.add("Add", [n, zeros], "index"), em.ints([-1])], "index") for n in names]
    stacked = parts[0] if len(parts) == 1 else em.add("Concat", parts, "indices", axis=-1)
    return em.add("GatherND", [em.value(x), stacked], "index")


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(em: Emitter, node: fx.Node) -> str:
    args = list(node.args)
    start, end, step = ([0, *args, 1] if len(args) == 1 else [*args, 1] if len(args) == 2 else args)[:3]
    if any(not isinstance(v, (int, fx.Node)) for v in (start, end, step)):
        raise Unsupported("arange with non-integer bounds")
    dtype = em.dtype(node)
    scalars = [em.add("Reshape", [em.shape_list([v]), em.ints([])], "scalar") for v in (start, end, step)]
    if dtype != torch.int64:
        scalars = [em.add("Cast", [s], "cast", to=_onnx_dtype(dtype)) for s in scalars]
    return em.add("Range", scalars, "arange")


@handles(aten.new_ones.default, aten.new_zeros.default)
def _new_filled(em: Emitter, node: fx.Node) -> str:
    fill = 1 if node.target == aten.new_ones.default else 0
    value = np.array([fill], dtype=_np_dtype(em.dtype(node)))
    return em.add("ConstantOfShape", [em.shape_list(node.args[1])], "filled", value=numpy_helper.from_array(value))


_COMPARE = {
    aten.ge.Scalar: "GreaterOrEqual",
    aten.gt.Scalar: "Greater",
    aten.le.Scalar: "LessOrEqual",
    aten.lt.Scalar: "Less",
    aten.eq.Scalar: "Equal",
    aten.ne.Scalar: "Equal",
    aten.ge.Tensor: "GreaterOrEqual",
    aten.gt.Tensor: "Greater",
    aten.le.Tensor: "LessOrEqual",
    aten.lt.Tensor: "Less",
    aten.eq.Tensor: "Equal",
    aten.ne.Tensor: "Equal",
}


def _compare(em: Emitter, node: fx.Node) -> str:
    a, b = node.args[:2]
    if isinstance(b, fx.Node):
        dtype = torch.promote_types(em.dtype(a), em.dtype(b))
    else:  # a float scalar against an integer tensor compares in float, as torch does
        dtype = torch.float32 if isinstance(b, float) and not em.dtype(a).is_floating_point else em.dtype(a)
    out = em.add(_COMPARE[node.target], [em.cast_to(a, dtype), em.cast_to(b, dtype)], "compare")
    return em.add("Not", [out], "not") if node.target in (aten.ne.Scalar, aten.ne.Tensor) else out


for _target in _COMPARE:
    handles(_target)(_compare)


@handles(aten.__and__.Tensor, aten.logical_and.default, aten.__or__.Tensor, aten.logical_or.default)
def _logical(em: Emitter, node: fx.Node) -> str:
    if any(em.dtype(a) != torch.bool for a in node.args[:2]):
        raise Unsupported("bitwise and/or of integers")
    op = "And" if node.target in (aten.__and__.Tensor, aten.logical_and.default) else "Or"
    return em.add(op, [em.value(a) for a in node.args[:2]], op.lower())


@handles(aten.logical_not.default, aten.bitwise_not.default)
def _not(em: Emitter, node: fx.Node) -> str:
    if em.dtype(node.args[0]) != torch.bool:
        raise Unsupported("bitwise not of integers")
    return em.add("Not", [em.value(node.args[0])], "not")


@handles(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(em: Emitter, node: fx.Node) -> str:
    cond, a, b = node.args[:3]
    dtype = em.dtype(node)
    return em.add("Where", [em.value(cond), em.cast_to(a, dtype), em.cast_to(b, dtype)], "where")


@handles(aten.sum.dim_IntList)
def _sum(em: Emitter, node: fx.Node) -> str:
    x, dims = node.args[:2]
    if not dims:
        raise Unsupported("sum over all dims")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    data = em.cast_to(x, em.dtype(node))  # sum of bools/ints promotes
    return em.add("ReduceSum", [data, em.ints(dims)], "sum", keepdims=int(keepdim))


@handles(aten.linalg_vector_norm.default)
def _vector_norm(em: Emitter, node: fx.Node) -> str:
    x = node.args[0]
    order, dims, keepdim = _arg(node, 1, "ord", 2), _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    if order != 2 or dims is None or _arg(node, 4, "dtype") is not None:
        raise Unsupported("vector norm other than L2 over given dims")
    return em.add("ReduceL2", [em.value(x), em.ints(dims)], "norm", keepdims=int(keepdim))


@handles(aten.cumsum.default)
def _cumsum(em: Emitter, node: fx.Node) -> str:
    x, dim = node.args[:2]
    return em.add(
        "CumSum", [em.cast_to(x, em.dtype(node)), em.add("Reshape", [em.ints([dim]), em.ints([])], "axis")], "cumsum"
    )


@handles(aten.type_as.default)
def _type_as(em: Emitter, node: fx.Node) -> str:
    return em.cast_to(node.args[0], em.dtype(node.args[1]))


_SYM_ARITHMETIC = {operator.add: "Add", operator.sub: "Sub", operator.mul: "Mul", operator.floordiv: "Div"}


def _sym_arithmetic(em: Emitter, node: fx.Node) -> str:
    # Sizes are non-negative, so integer Div is floor division.
    a, b = (em.shape_list([v]) for v in node.args[:2])
    return em.add(_SYM_ARITHMETIC[node.target], [a, b], "size")


for _target in _SYM_ARITHMETIC:
    handles(_target)(_sym_arithmetic)


@handles(aten.constant_pad_nd.default, aten.pad.default)
def _constant_pad(em: Emitter, node: fx.Node) -> str:
    x, pad = node.args[:2]
    if node.target == aten.pad.default:
        if _arg(node, 2, "mode", "constant") != "constant":
            raise Unsupported("reflect/replicate/circular padding")
        value = _arg(node, 3, "value") or 0
    else:
        value = _arg(node, 2, "value", 0)
    if any(not isinstance(p, int) or p < 0 for p in pad):
        raise Unsupported("symbolic or negative (cropping) padding")
    rank = em.rank(x)
    # torch lists (begin, end) pairs from the last dim backwards; ONNX all begins, then all ends, from dim 0.
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    fill = em.constant(value, _np_dtype(em.dtype(x)))
    return em.add("Pad", [em.value(x), em.ints(begins + ends), fill], "pad", mode="constant")


@handles(aten.split.Tensor, aten.split_with_sizes.default)
def _split(em: Emitter, node: fx.Node) -> list[str]:
    """Split into the pieces capture recorded; the ONNX names of all pieces (read by `getitem`)."""
    x = node.args[0]
    dim = int(_arg(node, 2, "dim", 0))
    pieces = node.meta.get("val")
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p.shape[dim], int) for p in pieces):
        raise Unsupported("split into pieces of symbolic size")
    sizes = em.ints([p.shape[dim] for p in pieces])
    outs = [em.fresh("split") for _ in pieces]
    em.nodes.append(helper.make_node("Split", [em.value(x), sizes], outs, name=outs[0], axis=dim))
    return outs


@handles(operator.getitem)
def _getitem(em: Emitter, node: fx.Node) -> str:
    pieces = em.names.get(node.args[0])
    if not isinstance(pieces, list):
        raise Unsupported("getitem of something other than split pieces")
    return pieces[node.args[1]]


@handles(aten.full_like.default)
def _full_like(em: Emitter, node: fx.Node) -> str:
    value = np.array([node.args[1]], dtype=_np_dtype(em.dtype(node)))
    shape = em.add("Shape", [em.value(node.args[0])], "shape")
    return em.add("ConstantOfShape", [shape], "full", value=numpy_helper.from_array(value))
