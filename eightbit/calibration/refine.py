"""Output-aware calibration (`eq`, `cross_entropy`): the plumbing around the searches in `calibration.layerwise`.

The sample inputs kept by the calibration pass are replayed through the observed float graph, with observers
acting as identities.  The replay runs the samples' batches in lock step, node by node, and frees each value
after its last use, so memory is that of one forward pass over the samples plus the layers held for a search.
Each quantized conv/linear with a constant weight (a "target") is handed to the search with its input and float
output; the search's ranges come back as overrides for `activation_encodings` (per tensor group) and `convert`
(per layer weight).

- `eq`: per tensor group read by targets, EasyQuant over those layers together (the clip is per group, so its
  objective is the cosine summed over them); other readers of the group (add, concat, matmul) are not scored.
  With `eq` weights the layers' per-channel weight scales are searched too; with `eq` weights and another
  activation method, only the weight scales are searched, the inputs quantized as that method decided.
- `cross_entropy`: every group keeps `mse`, except the input group of the target(s) producing the model's
  output (the logits), whose clip is searched for the least softmax KL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from eightbit import qmath
from eightbit.calibration import layerwise
from eightbit.calibration.calibrate import OBSERVER_PREFIX
from eightbit.calibration.encodings import Encoding, layer_weight_spec, weight_axis
from eightbit.calibration.layerwise import LayerSamples
from eightbit.calibration.methods import lookup_method
from eightbit.calibration.observers import Observer, Statistic
from eightbit.config import OpKind, QuantConfig
from eightbit.graph import ops
from eightbit.graph.placement import FUSED_ACTIVATIONS, SHARED_PARAMS_OPS, OpRule, Placement
from eightbit.graph.utils import attr_value

Range = tuple[torch.Tensor, torch.Tensor]
_CHUNK_ELEMENTS = 1 << 22  # outputs scored per layer run (16 MB of float32)
_aten = torch.ops.aten
# A model may end in softmax: its input is still the logits.
_LOGIT_PASS = {_aten.softmax.int, _aten.log_softmax.int, _aten._softmax.default, _aten._log_softmax.default}


def output_aware_ranges(
    gm: fx.GraphModule,
    placement: Placement,
    observers: dict[str, Observer],
    act: dict[str, Encoding],
    chunks: Sequence[tuple],
    config: QuantConfig,
    *,
    overflow_fix: bool,
) -> tuple[dict[str, Range], dict[str, Range]]:
    """(activation ranges by tensor group, weight ranges by layer node name) chosen by the config's output-aware
    methods, from the sample input batches `chunks` replayed through the observed graph `gm`.  `act` are the
    encodings of the activation method's own ranges (the weight-only search quantizes inputs with them)."""
    if not chunks:
        raise ValueError(
            f"calibration methods {config.activations.method!r}/{config.weights.method!r} search scales on sample "
            "inputs, but the calibration kept none; calibrate again with representative data"
        )
    targets = find_targets(gm, placement)
    act_method = config.activations.method
    search_weights = lookup_method(config.weights.method).output_aware
    act_ranges: dict[str, Range] = {}
    weight_ranges: dict[str, Range] = {}
    with torch.no_grad():
        if act_method == "eq":
            for group, names, layers in _group_layers(gm, targets, chunks, config, overflow_fix, set(targets)):
                lo, hi = _minmax(observers[group])
                t, factors = layerwise.easyquant(layers, lo, hi, config.activations, search_weights=search_weights)
                act_ranges[group] = (lo * t, hi * t)
                if search_weights:
                    for name, layer, f in zip(names, layers, factors, strict=True):
                        weight_ranges[name] = (layer.weight_range[0] * f, layer.weight_range[1] * f)
            return act_ranges, weight_ranges
        if act_method == "cross_entropy":
            heads = logit_layers(gm, targets)
            if not heads:
                raise ValueError(
                    "cross_entropy searches the input clip of the int8 conv/linear layer producing the model's "
                    "output, and this model has none (kept float, or the output comes from another op); use mse"
                )
            for group, _, layers in _group_layers(gm, targets, chunks, config, overflow_fix, heads):
                lo, hi = _minmax(observers[group])
                t, _ = layerwise.cross_entropy_clip(layers, lo, hi, config.activations)
                act_ranges[group] = (lo * t, hi * t)
        if search_weights:
            for group, names, layers in _group_layers(gm, targets, chunks, config, overflow_fix, set(targets)):
                quantize_input = _input_quantizer(act[group], act_ranges.get(group), config)
                for name, layer in zip(names, layers, strict=True):
                    f, _ = layerwise.search_weight_scales(layer, [quantize_input(x) for x in layer.inputs])
                    weight_ranges[name] = (layer.weight_range[0] * f, layer.weight_range[1] * f)
    return act_ranges, weight_ranges


def find_targets(gm: fx.GraphModule, placement: Placement) -> dict[str, tuple[str, OpRule]]:
    """Quantized conv/linear layers with a constant weight whose input is an observed tensor group:
    node name -> (input group, rule)."""
    found = {}
    for node in gm.graph.nodes:
        rule = placement.quantized_ops.get(node.name)
        if rule is None or node.op != "call_function" or rule.kind not in (OpKind.CONV, OpKind.LINEAR):
            continue
        if rule.weight_arg is None or attr_value(gm, node.args[rule.weight_arg]) is None:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        if not str(source.target).startswith(OBSERVER_PREFIX):
            continue
        others = [a for i, a in enumerate(node.args) if i not in (0, rule.weight_arg)] + list(node.kwargs.values())
        if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in others):
            continue  # the op must be a function of (input, weight) alone
        found[node.name] = (str(source.target)[len(OBSERVER_PREFIX) :], rule)
    return found


def logit_layers(gm: fx.GraphModule, targets: dict) -> set[str]:
    """The targets that produce a model output, through data movement, fused activations, output observers and
    softmax."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    found: set[str] = set()
    for node in output.all_input_nodes:
        while True:
            if node.name in targets:
                found.add(node.name)
                break
            observer = node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX)
            passes = node.op == "call_function" and node.target in (SHARED_PARAMS_OPS | FUSED_ACTIVATIONS | _LOGIT_PASS)
            if not (observer or passes) or not node.args or not isinstance(node.args[0], fx.Node):
                break
            node = node.args[0]
    return found


class _FloatGraph(fx.Interpreter):
    """Runs the observed graph on one batch with its observers as identities (their statistics stay as they are)."""

    def __init__(self, gm: fx.GraphModule, args: tuple) -> None:
        super().__init__(gm)
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))

    def call_module(self, target, args, kwargs):
        if str(target).startswith(OBSERVER_PREFIX):
            return args[0]
        return super().call_module(target, args, kwargs)


def replay(gm: fx.GraphModule, chunks: Sequence[tuple], wanted: set[str]) -> Iterator[tuple[fx.Node, list, list]]:
    """Run every batch of `chunks` through `gm` in lock step; for each node named in `wanted`, yield (node, its
    fetched (args, kwargs) per batch, its output per batch).  Values are freed after their last use."""
    runs = [_FloatGraph(gm, args) for args in chunks]
    last_uses = runs[0].user_to_last_uses
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        for run in runs:
            run.env[node] = run.run_node(node)
        if node.name in wanted:
            yield node, [run.fetch_args_kwargs_from_env(node) for run in runs], [run.env[node] for run in runs]
        for dead in last_uses.get(node, ()):
            for run in runs:
                del run.env[dead]


def _group_layers(
    gm: fx.GraphModule, targets: dict, chunks: Sequence[tuple], config: QuantConfig, overflow_fix: bool, wanted
) -> Iterator[tuple[str, list[str], list[LayerSamples]]]:
    """(input group, its wanted layers' names, their samples) as soon as the replay has reached the last of them;
    a group's layers are dropped once the caller is done with them."""
    expected: dict[str, int] = {}
    for name in wanted:
        expected[targets[name][0]] = expected.get(targets[name][0], 0) + 1
    pending: dict[str, dict[str, LayerSamples]] = {}
    for node, fetched, outputs in replay(gm, chunks, set(wanted)):
        group, rule = targets[node.name]
        layers = pending.setdefault(group, {})
        layers[node.name] = layer_samples(node, rule, fetched, outputs, config, overflow_fix)
        if len(layers) == expected[group]:
            del pending[group]
            yield group, list(layers), list(layers.values())


def layer_samples(
    node: fx.Node, rule: OpRule, fetched: list, outputs: list, config: QuantConfig, overflow_fix: bool
) -> LayerSamples:
    """One conv/linear layer of the replay as `layerwise.LayerSamples`: its op as a function of (input, weight)
    with the node's other arguments bound, its float weight with the spec and starting range convert would use,
    and its inputs/outputs over the replayed batches (`fetched`: the node's (args, kwargs) per batch; `outputs`:
    its output per batch), merged into chunks of bounded size.  A padded conv gets its inputs padded once and an
    unpadded op.  Shared by the output-aware searches here and by `calibration.adaround`."""
    args, kwargs = fetched[0]
    pos = rule.weight_arg

    def op(x, w, target=node.target, args=args, kwargs=kwargs):
        bound = list(args)
        bound[0], bound[pos] = x, w
        return target(*bound, **kwargs)

    weight = args[pos].detach().float()
    spec = layer_weight_spec(weight, config.weights, overflow_fix)
    axis = weight_axis(spec)
    # Same starting range as convert: the weight method's (max |w| per channel for eq).
    weight_range = lookup_method(config.weights.method).weight_range(weight, spec, axis)
    linear = rule.kind is OpKind.LINEAR
    inputs = [a[0] for a, _ in fetched]
    if node.target is ops.CONV2D_PADDED:
        # Pad once rather than once per candidate: quantization maps the zero padding to exactly zero, so
        # padding before or after fake quantization gives the same values.
        _, _, bias, stride, pads, dilation, groups = args
        inputs = [F.pad(x, [pads[1], pads[3], pads[0], pads[2]]) for x in inputs]

        def op(x, w, bias=bias, stride=stride, dilation=dilation, groups=groups):
            return F.conv2d(x, w, bias, stride, 0, dilation, groups)

    inputs, outputs = _rechunk(inputs, outputs, linear)
    return LayerSamples(op, weight, inputs, outputs, -1 if linear else 1, spec, weight_range)


def _rechunk(inputs: list[torch.Tensor], outputs: list[torch.Tensor], rows: bool):
    """Merge the batches and split inputs and outputs alike into chunks of bounded output size.  Linear
    inputs/outputs become rows (batches of different sequence lengths merge); conv batches merge when their
    shapes agree, and are kept as they are otherwise."""
    if rows:
        inputs = [t.reshape(-1, t.shape[-1]) for t in inputs]
        outputs = [t.reshape(-1, t.shape[-1]) for t in outputs]
    if len({t.shape[1:] for t in inputs}) != 1 or len({t.shape[1:] for t in outputs}) != 1:
        return inputs, outputs
    x, y = torch.cat(inputs), torch.cat(outputs)
    size = max(1, _CHUNK_ELEMENTS // max(1, y[0].numel())) if y.shape[0] else 1
    return list(x.split(size)), list(y.split(size))


def _minmax(observer: Observer) -> Range:
    stats = observer.stats[Statistic.MINMAX]
    return stats.lo.float(), stats.hi.float()


def _input_quantizer(enc: Encoding, searched: Range | None, config: QuantConfig):
    """x -> x as the int8 model quantizes it (per tensor): by the searched range, else by the group's encoding."""
    if searched is not None:
        return lambda x: layerwise.fake_quantize_range(x, *searched, config.activations)
    scale, zp = enc.tensors_()
    return lambda x: qmath.fake_quantize(x, scale, zp, enc.qmin, enc.qmax)
