"""One spelling per quantizable op: rewrites run right after capture, so placement, BN folding, convert and the
ONNX emitter each know one form.

ATen spells the same layer several ways, and a rule for one spelling leaves the others float without a word:
`nn.Conv2d(padding="same")` is `aten.conv2d.padding`, GPT-2's `Conv1D` is `aten.addmm`, `x @ W + b` is a
matmul and an add, `x += y` is `aten.add_`, `torch.baddbmm` and matmul-like `torch.einsum` hide a batched
matrix product.  Each rewrite is exact (or exact up to float summation order) and leaves anything it cannot
prove equivalent alone.  The math that decides (padding sizes, einsum plans) is in pure functions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from eightbit.graph.utils import add_constant, attr_value

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------- pure math


def same_padding(kernel: list[int], dilation: list[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim that PyTorch's padding='same' applies (stride 1): the
    total dilation * (kernel - 1), the odd element after, as `torch.nn.functional.conv2d` does."""
    pads = []
    for k, d in zip(kernel, dilation, strict=True):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


@dataclass(frozen=True)
class EinsumPlan:
    """How a two-operand einsum is one matmul: permute each operand, matmul, permute the result."""

    perm_a: tuple[int, ...]  # a -> [batch..., free_a..., contracted]
    perm_b: tuple[int, ...]  # b -> [batch..., contracted, free_b]
    perm_out: tuple[int, ...]  # matmul result [batch..., free_a..., free_b] -> the einsum's output order


def einsum_matmul_plan(equation: str) -> EinsumPlan | None:
    """The matmul form of a two-operand einsum such as 'bhqd,bhkd->bhqk' or 'bnd,dk->bnk', or None when the
    equation is not one matrix product (ellipsis, repeated letters, sums over one operand, several contracted
    letters, or several free letters on both sides)."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    free_a = [c for c in a if c in out and c not in b]
    free_b = [c for c in b if c in out and c not in a]
    only_one = [c for c in a + b if c not in out and not (c in a and c in b)]
    if only_one or len(contracted) != 1 or len(free_b) != 1 or not free_a or (batch and len(free_a) > 1):
        return None
    order_a = batch + free_a + contracted
    order_b = batch + contracted + free_b
    result = batch + free_a + free_b
    return EinsumPlan(
        tuple(a.index(c) for c in order_a),
        tuple(b.index(c) for c in order_b),
        tuple(result.index(c) for c in out),
    )


# ------------------------------------------------------------------------------------------- graph helpers


def _fake_value(gm: fx.GraphModule, target, args, kwargs):
    """The output meta value of `target` on the recorded values of its inputs (fake tensors)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = torch._guards.detect_fake_mode(vals)

    def value(n: fx.Node):
        val = n.meta.get("val")
        if val is None and n.op == "get_attr":
            real = attr_value(gm, n)
            val = mode.from_tensor(real, static_shapes=True) if mode is not None else real.to("meta")
            n.meta["val"] = val
        return val

    args, kwargs = fx.node.map_arg((args, kwargs), value)
    if mode is None:
        return target(*args, **kwargs)
    with mode:
        return target(*args, **kwargs)


def _call(gm: fx.GraphModule, like: fx.Node, target, args, kwargs=None) -> fx.Node:
    """A new call before `like`, with its metadata (module path, stack) and a recorded output value."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(like):
        node = gm.graph.call_function(target, tuple(args), kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    node.meta["val"] = _fake_value(gm, target, args, kwargs)
    return node


def _replace(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _constant(gm: fx.GraphModule, like: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """A new constant; its meta value is filled from the tensor when a new call reads it (`_fake_value`)."""
    return add_constant(gm, like, name, value)


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


# ------------------------------------------------------------------------------------------- in-place ops


def _functional_twin(target):
    """aten.add_.Tensor -> aten.add.Tensor: the out-of-place overload of an op that writes its first argument
    only; None for anything else."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    packet = target.overloadpacket.__name__
    schema = target._schema
    writes = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
    if not packet.endswith("_") or packet.startswith("_") or not writes or not writes[0] or any(writes[1:]):
        return None
    twin = getattr(getattr(aten, packet[:-1], None), target._overloadname, None)
    return twin if isinstance(twin, torch._ops.OpOverload) else None


def _returns_alias(node: fx.Node) -> bool:
    target = node.target if node.op == "call_function" else None
    if not isinstance(target, torch._ops.OpOverload):
        return node.op == "call_function"  # unknown Python callables (getitem...): assume they may alias
    return any(r.alias_info is not None for r in target._schema.returns)


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Rewrite in-place ops (`add_`, `relu_`, `hardtanh_`, `mul_`...) on intermediate tensors into their
    out-of-place twins; returns the count.

    Exact when nothing else can observe the mutation: the mutated tensor is made by a non-aliasing op (not an
    input, parameter or view), and no view of it exists; its readers after the in-place op read the new value.
    """
    count = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        twin = _functional_twin(node.target) if node.op == "call_function" else None
        base = node.args[0] if twin is not None and node.args else None
        if not isinstance(base, fx.Node) or base.op != "call_function" or _returns_alias(base):
            continue
        others = [u for u in base.users if u is not node]
        if any(_returns_alias(u) and order.get(u, len(order)) < order[node] for u in others):
            continue  # a view taken before the mutation would see it
        new = _call(gm, node, twin, node.args, node.kwargs)
        order[new] = order[node]
        for user in others:
            if order.get(user, len(order)) > order[node]:
                user.replace_input_with(base, new)
        _replace(gm, node, new)
        count += 1
    return count


# ------------------------------------------------------------------------------------------- convolutions

_STRING_PADDED = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default}
_STRING_PADDED[aten.conv3d.padding] = aten.conv3d.default


def explicit_conv_padding(gm: fx.GraphModule) -> int:
    """Rewrite convolutions with string padding ('same', 'valid') into the integer-padding spelling; an
    asymmetric 'same' becomes a zero pad before the convolution (which `fuse_pad_into_conv` merges back into
    a 2-D conv's ONNX pads).  Returns the count."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, _STRING_PADDED)]:
        x, weight = node.args[:2]
        w_val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        w_val = w_val if isinstance(w_val, torch.Tensor) else attr_value(gm, weight)
        if w_val is None:
            continue
        dims = w_val.dim() - 2
        stride = _per_dim(_arg(node, 3, "stride", 1), dims)
        mode = _arg(node, 4, "padding", "valid")
        dilation = _per_dim(_arg(node, 5, "dilation", 1), dims)
        groups = _arg(node, 6, "groups", 1)
        kernel = [int(k) for k in w_val.shape[2:]]
        if mode == "valid":
            pads = [(0, 0)] * dims
        elif mode == "same" and all(s == 1 for s in stride):
            pads = same_padding(kernel, dilation)
        else:
            continue
        if all(before == after for before, after in pads):
            padding = [before for before, _ in pads]
        else:
            flat = [p for before, after in reversed(pads) for p in (before, after)]  # F.pad order: last dim first
            x = _call(gm, node, aten.constant_pad_nd.default, (x, flat, 0.0))
            padding = [0] * dims
        bias = _arg(node, 2, "bias")
        new = _call(gm, node, _STRING_PADDED[node.target], (x, weight, bias, stride, padding, dilation, groups))
        _replace(gm, node, new)
        count += 1
    return count


def _per_dim(value, dims: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


# ------------------------------------------------------------------------------------------- linear layers

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def _constant_matrix(gm: fx.GraphModule, node) -> tuple[torch.Tensor, list[fx.Node]] | None:
    """The 2-D constant behind `node` (a get_attr, possibly through a transpose), and the transpose nodes."""
    through = []
    if _is_call(node, _TRANSPOSES):
        through.append(node)
        node = node.args[0]
    value = attr_value(gm, node)
    if value is None or value.dim() != 2 or not value.is_floating_point():
        return None
    if through:
        t = through[0]
        if t.target is aten.permute.default and [d % 2 for d in t.args[1]] != [1, 0]:
            return None
        if t.target is aten.transpose.int and sorted(d % 2 for d in t.args[1:3]) != [0, 1]:
            return None
        value = value.t()
    return value, through


def addmm_to_linear(gm: fx.GraphModule) -> int:
    """addmm(b, x, W) with constant W and b, beta = alpha = 1 (GPT-2's Conv1D) -> linear(x, W^T, b)."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.addmm.default})]:
        bias, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        found = _constant_matrix(gm, w)
        b = attr_value(gm, bias)
        if found is None or b is None or b.dim() != 1 or b.shape[0] != found[0].shape[1]:
            continue
        weight = _constant(gm, node, f"{node.name}_linear_weight", found[0].t().contiguous())
        _replace(gm, node, _call(gm, node, aten.linear.default, (x, weight, bias)))
        count += 1
    return count


def matmul_add_to_linear(gm: fx.GraphModule) -> int:
    """x @ W (+ b) with a constant 2-D W (and a constant bias over the output features) -> linear(x, W^T, b).

    As a matmul the constant W would be a float operand (placement quantizes activations of matmuls, not
    constants); as a linear layer it gets per-channel int8 weights and an int32 bias."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.matmul.default, aten.mm.default})]:
        x, w = node.args[:2]
        found = _constant_matrix(gm, w)
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if found is None or not isinstance(x_val, torch.Tensor) or x_val.dim() < 2:
            continue  # a 1-D x would drop an axis that linear keeps
        matrix, _ = found
        out = node
        bias = None
        (user,) = node.users if len(node.users) == 1 else (None,)
        if _is_call(user, {aten.add.Tensor}) and user.kwargs.get("alpha", 1) == 1:
            other = user.args[1] if user.args[0] is node else user.args[0]
            b = attr_value(gm, other)
            if b is not None and b.dim() == 1 and b.shape[0] == matrix.shape[1] and b.is_floating_point():
                bias, out = other, user
        weight = _constant(gm, node, f"{node.name}_linear_weight", matrix.t().contiguous())
        _replace(gm, out, _call(gm, out, aten.linear.default, (x, weight, bias)))
        if out is not node:
            gm.graph.erase_node(node)
        count += 1
    return count


# ------------------------------------------------------------------------------------------- batched products


def baddbmm_to_bmm(gm: fx.GraphModule) -> int:
    """baddbmm(c, a, b, beta, alpha) -> beta * c + alpha * bmm(a, b), so the product is an int8 bmm."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.baddbmm.default})]:
        c, a, b = node.args[:3]
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        product = _call(gm, node, aten.bmm.default, (a, b))
        if alpha != 1:
            product = _call(gm, node, aten.mul.Tensor, (product, alpha))
        if beta != 0:
            if beta != 1:
                c = _call(gm, node, aten.mul.Tensor, (c, beta))
            product = _call(gm, node, aten.add.Tensor, (c, product))
        _replace(gm, node, product)
        count += 1
    return count


def einsum_to_matmul(gm: fx.GraphModule) -> int:
    """Two-operand einsums that are one matrix product (see `einsum_matmul_plan`) -> permute, matmul, permute."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.einsum.default})]:
        equation, operands = node.args[0], node.args[1]
        plan = einsum_matmul_plan(equation) if len(operands) == 2 else None
        if plan is None:
            continue
        a, b = (_permuted(gm, node, t, perm) for t, perm in zip(operands, (plan.perm_a, plan.perm_b), strict=True))
        out = _permuted(gm, node, _call(gm, node, aten.matmul.default, (a, b)), plan.perm_out)
        _replace(gm, node, out)
        count += 1
    return count


def _permuted(gm: fx.GraphModule, like: fx.Node, x: fx.Node, perm: tuple[int, ...]) -> fx.Node:
    if list(perm) == list(range(len(perm))):
        return x
    return _call(gm, like, aten.permute.default, (x, list(perm)))


# ------------------------------------------------------------------------------------------- constants

_WEIGHT_NORMS = {aten._weight_norm.default}


def fold_constant_weight_norm(gm: fx.GraphModule) -> int:
    """weight_norm(v, g) of constant v, g (wav2vec2's positional conv) -> its constant value, so the layer
    has a constant weight that can be stored as int8."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, _WEIGHT_NORMS)]:
        v, g = (attr_value(gm, a) for a in node.args[:2])
        if v is None or g is None:
            continue
        with torch.no_grad():
            value = node.target(v.detach(), g.detach(), *node.args[2:])
        _replace(gm, node, _constant(gm, node, f"{node.name}_value", value))
        count += 1
    return count


def drop_eval_dropout_(gm: fx.GraphModule) -> int:
    """dropout_(x, p, train=False) writes nothing and returns x: its readers read x (MobileNetV2's classifier)."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.dropout_.default})]:
        if not _arg(node, 2, "train", False):
            _replace(gm, node, node.args[0])
            count += 1
    return count


def _is_grad_mode_region(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "wrap_with_set_grad_enabled"


def inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Inline `torch.no_grad()` / `enable_grad()` regions (higher-order `wrap_with_set_grad_enabled` calls,
    e.g. Llama's rotary embedding) into the graph: grad mode changes no value at inference, and placement,
    MAC counting and the ONNX emitter then see the ops inside.  Returns the count."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_grad_mode_region(n)]:
        body = getattr(gm, node.args[1].target, None) if isinstance(node.args[1], fx.Node) else None
        if not isinstance(body, fx.GraphModule) or any(n.op in ("call_module", "get_attr") for n in body.graph.nodes):
            continue
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], node.args[2:], strict=True))
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "call_function":
                    env[inner] = gm.graph.node_copy(inner, env.__getitem__)
        (results,) = next(n for n in body.graph.nodes if n.op == "output").args
        results = fx.node.map_arg(results, env.__getitem__)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise RuntimeError(f"unexpected reader {user} of a grad-mode region")
            _replace(gm, user, results[user.args[1]])
        gm.graph.erase_node(node)
        count += 1
    return count


def whole_input_avg_pool_to_mean(gm: fx.GraphModule) -> int:
    """avg_pool2d whose window covers the whole (static) input, without padding (EfficientNet's pooler:
    AvgPool2d(hidden_dim, ceil_mode=True)) -> mean over H, W: the same numbers, written as a global average
    pool (ONNX AveragePool divides clipped ceil-mode windows differently from PyTorch)."""
    count = 0
    for node in [n for n in gm.graph.nodes if _is_call(n, {aten.avg_pool2d.default})]:
        x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        out = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() != 4:
            continue
        kernel = _per_dim(node.args[1], 2)
        padding = _per_dim(_arg(node, 3, "padding", 0), 2)
        spatial = [x.shape[2], x.shape[3]]
        static = all(isinstance(v, int) for v in spatial) and all(isinstance(v, int) for v in out.shape[2:])
        if not static or any(padding) or _arg(node, 6, "divisor_override") is not None:
            continue
        if list(out.shape[2:]) != [1, 1] or any(k < size for k, size in zip(kernel, spatial, strict=True)):
            continue
        _replace(gm, node, _call(gm, node, aten.mean.dim, (node.args[0], [-2, -1], True)))
        count += 1
    return count


def normalize_spellings(gm: fx.GraphModule) -> dict[str, int]:
    """Every rewrite of this module, in dependency order; returns the count of each (for tests and logs)."""
    counts = {
        "grad_mode_regions": inline_grad_mode_regions(gm),
        "eval_dropout_": drop_eval_dropout_(gm),
        "inplace": functionalize_inplace(gm),
        "weight_norm": fold_constant_weight_norm(gm),
        "conv_padding": explicit_conv_padding(gm),
        "addmm": addmm_to_linear(gm),
        "baddbmm": baddbmm_to_bmm(gm),
        "einsum": einsum_to_matmul(gm),
        "matmul_linear": matmul_add_to_linear(gm),
        "global_avg_pool": whole_input_avg_pool_to_mean(gm),
    }
    if any(counts.values()):
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return counts
