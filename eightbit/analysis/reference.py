"""The float side of a quantized model, rebuilt for analysis: the captured float graph with one switch per
quantizer (each activation tensor group, each weight) that turns int8 simulation on or off, and quantized
variants that keep chosen ops float while reusing every other encoding unchanged.

Both are made from the user's float model, captured again exactly as `quantize` captured it (same example
inputs, BatchNorm folding and placement); the quantized model's own encodings supply the ranges, so nothing is
recalibrated.  `Reference.check` verifies that all switches on reproduce the quantized model.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import torch
from torch import fx, nn

from eightbit import qmath, saved
from eightbit.api import _calibration_batches, _prepare, _Prepared
from eightbit.calibration.calibrate import OBSERVER_PREFIX, insert_observers
from eightbit.calibration.encodings import Encoding
from eightbit.config import Scheme
from eightbit.convert import _bias_shift
from eightbit.graph import ops
from eightbit.graph.placement import _activation_inputs, _fused_chain_end, place
from eightbit.graph.utils import attr_value
from eightbit.model import QuantizedModel, float_model_of

TAP_PREFIX = "eightbit_tap_"
WEIGHT_PREFIX = "eightbit_weight_switch_"


class QuantSwitch(nn.Module):
    """A tensor group's Q/DQ pair that can be switched off (identity); records what passes when `recording`."""

    def __init__(self, enc: Encoding) -> None:
        super().__init__()
        self.enc = enc
        scale, zp = enc.tensors_()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.axis = -1 if enc.axis is None else enc.axis
        self.on = False
        self.recording = False
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (value before, value after) per call

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The codes this group gives `x` (the model's own quantize op)."""
        return ops.quantize(x, self.scale, self.zero_point, self.enc.qmin, self.enc.qmax, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enc.scheme == Scheme.FP16.value:
            out = ops.round_fp16(x) if self.on else x
        else:
            out = ops.dequantize(self.quantize(x), self.scale, self.zero_point, self.axis) if self.on else x
        if self.recording:
            self.seen.append((x.detach(), out.detach()))
        return out


class WeightSwitch(nn.Module):
    """A layer's constant weight (or bias): the float value, or the value the int8 model computes with."""

    def __init__(self, float_value: torch.Tensor, int8_value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("float_value", float_value.detach().clone())
        self.register_buffer("int8_value", int8_value.detach().clone())
        self.on = False

    def forward(self) -> torch.Tensor:
        return self.int8_value if self.on else self.float_value


class Tap(nn.Module):
    """Identity that keeps the last value through it (an op's output, before any output quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.value = x.detach()
        return x


class Reference:
    """The float model captured again for `qm`, its switchable graph, and quantized variants of `qm`.

    ops: the quantized op names (graph order); op_groups / op_weights: the switches each op owns when it runs
    int8 alone (its input and output tensor groups; its weight and bias)."""

    def __init__(self, qm: QuantizedModel, model: nn.Module | None = None, input_fn=None) -> None:
        model = model if model is not None else float_model_of(qm)
        if model is None:
            raise ValueError(
                "pass the float model this QuantizedModel was quantized from (model=...): the reference to it is "
                "kept only while the caller holds the model"
            )
        config = qm.config
        unsupported = [n for n in ("equalize", "smooth_quant", "adaround") if getattr(config, n) is not None]
        if unsupported:
            raise ValueError(
                f"per-layer analysis and fallback rebuild the float graph from the model, and {unsupported} "
                "rewrote it before calibration (from calibration data); analyze the model quantized without them"
            )
        if qm.weights_fingerprint is not None and saved.weights_fingerprint(model) != qm.weights_fingerprint:
            raise ValueError(
                "this is not the float model the QuantizedModel was made from (its weights fingerprint differs); "
                "pass the model as it was when quantized"
            )
        modes = [(m, m.training) for m in model.modules()]
        try:
            self.prepared: _Prepared = _prepare(model.eval(), qm._example_args, config, input_fn)
        finally:
            for module, training in modes:  # the user's model is left as it was given
                module.training = training
        if self.prepared.placement.groups != qm.placement.groups:
            raise ValueError("the float model's graph does not match the quantized model's (tensor groups differ)")
        self.qm = qm
        self.model_name = type(model).__name__
        self.ops = list(qm.placement.quantized_ops)
        self.group_of = self.prepared.placement.group_of()
        self.gm, self.switches, self.weights, self.taps = self._switchable()
        self.op_groups, self.op_weights = self._ownership()

    # -- the switchable graph -------------------------------------------------------------------------------------

    def _switchable(self):
        gm = copy.deepcopy(self.prepared.gm)
        placement, config = self.prepared.placement, self.qm.config
        insert_observers(gm, placement, config.activations, needs=frozenset())
        switches = {}
        for group in placement.groups:
            switches[group] = QuantSwitch(self.qm.activation_encodings[group])
            setattr(gm, OBSERVER_PREFIX + group, switches[group])
        nodes = {n.name: n for n in gm.graph.nodes}
        weights, taps, input_taps = {}, {}, {}
        for name in self.ops:
            node, rule = nodes[name], placement.quantized_ops[name]
            taps[name] = _insert_tap(gm, _fused_chain_end(node), name)
            inputs = enumerate(_inputs(node, rule))
            input_taps[name] = [_side_tap(gm, _before_switch(a), f"{name}_in{i}") for i, a in inputs]
            if rule.weight_arg is not None and name in self.qm.weight_encodings:
                weights[name] = self._weight_switches(gm, node, rule, switches)
        gm.recompile()
        self.input_taps = input_taps
        return gm, switches, weights, taps

    def _weight_switches(self, gm, node, rule, switches) -> list[WeightSwitch]:
        """Switches for the weight (and bias) of one layer, with the int8 model's values: the weight through its
        encoding, the bias less its bias correction."""
        enc = self.qm.weight_encodings[node.name]
        w = attr_value(gm, node.args[rule.weight_arg])
        if w is None or enc.scheme != Scheme.UNIFORM.value:
            return []
        scale, zp = enc.tensors_()
        axis = -1 if enc.axis is None else enc.axis
        q = ops.quantize(w.detach().float(), scale, zp, enc.qmin, enc.qmax, axis)
        made = [_replace_arg(gm, node, rule.weight_arg, WeightSwitch(w, ops.dequantize(q, scale, zp, axis)))]
        bias = attr_value(gm, node.args[rule.bias_arg]) if rule.bias_arg is not None else None
        if bias is None or len(node.args) <= rule.bias_arg:
            return made
        source = node.args[rule.activation_args[0]]  # the input's switch call
        group = str(source.target)[len(OBSERVER_PREFIX) :] if source.op == "call_module" else None
        act = self.qm.activation_encodings.get(group)
        shift = None
        if self.qm.config.bias_correction and act is not None:
            shift = _bias_shift(node, rule, list(node.args), {source: act}, w, q, enc)
        corrected = bias.detach().float() - (0 if shift is None else shift)
        made.append(_replace_arg(gm, node, rule.bias_arg, WeightSwitch(bias, _int32_bias(corrected, act, scale))))
        return made

    def _ownership(self) -> tuple[dict[str, list[str]], dict[str, list[WeightSwitch]]]:
        """Per op, the tensor groups it quantizes: its activation inputs, and its output when the op itself
        quantizes it (placement lists the tensors quantized only for their consumers in `consumers`)."""
        placement = self.prepared.placement
        nodes = {n.name: n for n in self.prepared.gm.graph.nodes}
        groups = {}
        for name in self.ops:
            node, rule = nodes[name], placement.quantized_ops[name]
            tensors = [t.name for t in _activation_inputs(node, rule)]
            end = _fused_chain_end(node).name
            if end in self.group_of and end not in placement.consumers:
                tensors.append(end)
            groups[name] = list(dict.fromkeys(self.group_of[t] for t in tensors if t in self.group_of))
        return groups, {name: self.weights.get(name, []) for name in self.ops}

    def set_int8(self, ops_on: set[str] | None) -> None:
        """Switch the quantizers owned by `ops_on` on and every other one off (None: all on, the int8 model)."""
        groups = set(self.switches) if ops_on is None else {g for op in ops_on for g in self.op_groups[op]}
        for group, switch in self.switches.items():
            switch.on = group in groups
        for op, switches in self.op_weights.items():
            for switch in switches:
                switch.on = ops_on is None or op in ops_on

    def record(self, on: bool) -> None:
        for module in [*self.switches.values(), *self.taps.values(), *itertools.chain(*self.input_taps.values())]:
            module.recording = on
            if isinstance(module, QuantSwitch):
                module.seen = []

    def batches(self, data, count: int) -> list[tuple]:
        """The first `count` batches of `data` as the captured graph takes them (through `input_fn`)."""
        found = list(itertools.islice(_calibration_batches(data, self.prepared), count))
        if not found:
            raise ValueError("the analysis data yielded no batches; pass a few batches of model inputs")
        return found

    @torch.no_grad()
    def run(self, args: tuple):
        return self.gm(*args)

    @torch.no_grad()
    def check(self, args: tuple) -> float:
        """SQNR (dB) of the switchable graph with every quantizer on against the quantized model itself: far above
        the int8 model's own error, or the analysis would not describe that model (RuntimeError)."""
        self.set_int8(None)
        got, want = _flat(self.run(args)), _flat(self.qm(*args))
        self.set_int8(set())
        reference = _flat(self.run(args))
        agreement, own = sqnr_db(want, got), sqnr_db(reference, want)
        if agreement < min(own + 20.0, 60.0):
            raise RuntimeError(
                f"the rebuilt int8 graph differs from the quantized model (SQNR {agreement:.1f} dB between them, "
                f"the int8 error itself {own:.1f} dB); the analysis would not describe this model"
            )
        return agreement

    # -- quantized variants ---------------------------------------------------------------------------------------

    def variant(self, float_ops) -> QuantizedModel:
        """`qm` with `float_ops` (op names) kept float too: same encodings for every remaining quantizer and
        weight, no recalibration.  With no ops it is `qm` itself, rebuilt."""
        unknown = sorted(set(float_ops) - set(self.ops))
        if unknown:
            raise ValueError(f"{unknown} are not int8 ops of this model; choose from {self.ops}")
        config = self.qm.config
        keep = tuple(dict.fromkeys([*config.keep_float_nodes, *sorted(float_ops)]))
        config = replace(config, keep_float_nodes=keep)
        prepared = copy.deepcopy(self.prepared)
        prepared.config = config
        prepared.placement = place(prepared.gm, config)
        insert_observers(prepared.gm, prepared.placement, config.activations, needs=frozenset())
        act = {}
        for group, members in prepared.placement.groups.items():
            # Keeping ops float only removes tensors from groups: each new group lies inside one old group.
            act[group] = replace(copy.deepcopy(self.qm.activation_encodings[self.group_of[members[0]]]))
            act[group].tensors = list(members)
        weights = {
            k: copy.deepcopy(v) for k, v in self.qm.weight_encodings.items() if k in prepared.placement.quantized_ops
        }
        return prepared.finish(act, config, weights, [n for n in self.qm.notes if n not in prepared.notes])


def _int32_bias(bias: torch.Tensor, act: Encoding | None, w_scale: torch.Tensor) -> torch.Tensor:
    """The bias as the int8 model adds it: its int32 codes at scale input_scale * weight_scale, dequantized
    exactly as convert's graph does (float when the input is per-channel or the codes would not fit, as there).
    Bit-exact matters: a bias off by a rounding error flips quantization codes downstream."""
    if act is None or act.axis is not None:
        return bias
    in_scale = torch.tensor(act.scale[0])
    if not qmath.bias_representable(bias, in_scale, w_scale):
        return bias
    q = qmath.quantize_bias(bias, in_scale, w_scale)
    scale = (in_scale * w_scale).reshape(-1).expand(bias.shape[0]).contiguous()
    return ops.dequantize(q, scale, torch.zeros(bias.shape[0], dtype=torch.int32), 0)


def _insert_tap(gm: fx.GraphModule, node: fx.Node, name: str) -> Tap:
    tap = Tap()
    target = TAP_PREFIX + name
    gm.add_submodule(target, tap)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(target, (node,))
    call.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    return tap


def _side_tap(gm: fx.GraphModule, node: fx.Node, name: str) -> Tap:
    """A tap that reads `node` and feeds nothing (records the value without changing any path)."""
    tap = Tap()
    target = TAP_PREFIX + name
    gm.add_submodule(target, tap)
    # Every placeholder stays ahead of the other nodes.
    after = [n for n in gm.graph.nodes if n.op == "placeholder"][-1] if node.op == "placeholder" else node
    with gm.graph.inserting_after(after):
        gm.graph.call_module(target, (node,))
    return tap


def _inputs(node: fx.Node, rule) -> list[fx.Node]:
    """The op's activation inputs as it reads them (through quantizers): positions of `rule.activation_args`."""
    found = []
    for pos in rule.activation_args:
        arg = node.args[pos] if pos < len(node.args) else None
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            val = _before_switch(item).meta.get("val") if isinstance(item, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                found.append(item)
    return found


def _before_switch(node: fx.Node) -> fx.Node:
    """The value a quantizer call receives (the node itself when it is no quantizer)."""
    if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
        return node.args[0]
    return node


def _replace_arg(gm: fx.GraphModule, node: fx.Node, pos: int, switch: WeightSwitch) -> WeightSwitch:
    target = f"{WEIGHT_PREFIX}{node.name}_{pos}"
    gm.add_submodule(target, switch)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(target, ())
    args = list(node.args)
    args[pos] = call
    node.args = tuple(args)
    return switch


def _flat(output) -> torch.Tensor:
    """Every floating-point output leaf, flattened per sample into one (batch, features) matrix."""
    leaves = torch.utils._pytree.tree_leaves(output)
    leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("the model has no floating-point output to compare")
    batch = leaves[0].shape[0] if leaves[0].dim() else 1
    if all(t.dim() and t.shape[0] == batch for t in leaves):
        return torch.cat([t.reshape(batch, -1).double() for t in leaves], dim=1)
    return torch.cat([t.reshape(-1).double() for t in leaves]).reshape(1, -1)


SQNR_CAP_DB = 100.0  # identical tensors (no noise at all) report this instead of infinity


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """10 log10(signal power / noise power) of candidate against reference, capped at SQNR_CAP_DB."""
    reference, candidate = reference.double(), candidate.double()
    return power_db(float(reference.pow(2).sum()), float((candidate - reference).pow(2).sum()))


def power_db(signal: float, noise: float) -> float:
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * torch.log10(torch.tensor(max(signal, 1e-300) / noise, dtype=torch.float64)).item()
