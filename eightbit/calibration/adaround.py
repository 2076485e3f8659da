"""AdaRound (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding each weight to the nearest code is optimal per weight, not per layer: at 4 bits the errors of a
layer's weights add up in its output.  AdaRound learns, per weight, whether to round down or up: the code is
floor(w / s) + h with h = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (a rectified sigmoid), V trained by
Adam to minimise the layer's output error against fp32 on calibration inputs, plus a regulariser
sum(1 - |2h - 1|^beta) whose beta is annealed from 20 to 2 so that every h ends at 0 or 1.  A learned code is
never more than one step from round-to-nearest (floor or floor + 1).

Layers are done one at a time in graph order, with asymmetric reconstruction: each layer's input comes from the
already quantized model (earlier layers with their learned weights, activations fake-quantized with their
encodings), its target from the float model.  Both are replayed in lock step over the kept calibration samples,
node by node, each value freed after its last use, so memory is one forward pass of the samples (twice) plus
the layer being optimised.  Where a layer's only user is a ReLU / ReLU6 / clamp, the loss is taken after it.

The pure functions come first; `adaround_layers` is the replay around them; `rounding_to_text` /
`rounding_from_text` store the decisions (one bit per weight) in the encodings file.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from eightbit import qmath
from eightbit.calibration.calibrate import OBSERVER_PREFIX
from eightbit.calibration.encodings import Encoding, weight_encoding
from eightbit.calibration.refine import find_targets, layer_samples
from eightbit.config import QuantConfig
from eightbit.graph.placement import FUSED_ACTIVATIONS, Placement
from eightbit.graph.transforms.bias_correction import bias_shift
from eightbit.graph.utils import add_constant, attr_value

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)


# ---------------------------------------------------------------------------------------------------------
# Pure tensor functions


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1): reaches exactly 0 and 1."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_logits(remainder: torch.Tensor) -> torch.Tensor:
    """V with h(V) = remainder (the fractional part of w / s), so training starts at the unrounded weight."""
    r = remainder.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1; beta large leaves h free, beta small pushes it."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def annealed_beta(step: int, steps: int, warm_up: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's beta at `step`: None during the warm-up share of the steps, then linear start -> end."""
    first = int(warm_up * steps)
    if step < first:
        return None
    return start + (end - start) * (step - first) / max(1, steps - first - 1)


@dataclass(frozen=True)
class Grid:
    """A weight's quantization grid: floor(w / scale), zero point, code range, and channel axis."""

    floor: torch.Tensor
    remainder: torch.Tensor
    scale: torch.Tensor  # broadcast to the weight's shape
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @classmethod
    def of(cls, w: torch.Tensor, enc: Encoding) -> Grid:
        scale, zp = enc.tensors_()
        shape = [1] * w.dim()
        if enc.axis is not None:
            shape[enc.axis] = -1
        scale, zp = scale.reshape(shape), zp.to(torch.float32).reshape(shape)
        ratio = w.detach().float() / scale
        base = torch.floor(ratio)
        return cls(base, ratio - base, scale, zp, enc.qmin, enc.qmax)

    def weight(self, up: torch.Tensor) -> torch.Tensor:
        """The dequantized weight with codes floor + up (up: 0/1, or soft values in [0, 1] while training)."""
        codes = torch.clamp(self.floor + self.zero_point + up, self.qmin, self.qmax)
        return (codes - self.zero_point) * self.scale

    def nearest(self) -> torch.Tensor:
        """The round-to-nearest decisions (up where the remainder is above one half; ties as torch.round)."""
        return (torch.round(self.floor + self.remainder) - self.floor).clamp(0, 1)


@dataclass
class LayerResult:
    """One layer's learned rounding: decisions (bool, True = up), the dequantized weight, and the output MSE
    against fp32 on the samples with round-to-nearest and with the learned rounding."""

    up: torch.Tensor
    weight: torch.Tensor
    nearest_mse: float
    learned_mse: float


def learn_rounding(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grid: Grid,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    iterations: int,
    batch_size: int,
    reg_weight: float = 0.01,
    warm_up: float = 0.2,
    lr: float = 1e-2,
    out_axis: int = 1,
    seed: int = 0,
    progress=None,
) -> LayerResult:
    """AdaRound for one layer: `op(x, w)` is the layer (with its activation), `inputs` its (quantized-path)
    inputs and `targets` the float outputs, batched along dim 0.  Trains for `iterations` Adam steps on random
    batches of `batch_size`; returns the hard decisions and both output errors."""
    v = initial_logits(grid.remainder).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = range(iterations) if progress is None else progress(range(iterations))
    for step in steps:
        rows = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=generator)
        h = rectified_sigmoid(v)
        out = op(inputs[rows], grid.weight(h))
        loss = _reconstruction(out, targets[rows], out_axis)
        beta = annealed_beta(step, iterations, warm_up)
        if beta is not None:
            loss = loss + reg_weight * rounding_regularizer(h, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    up = (v.detach() >= 0).float()  # h(V) >= 0.5
    nearest = grid.weight(grid.nearest())
    learned = grid.weight(up)
    return LayerResult(
        up.bool(), learned, _output_mse(op, nearest, inputs, targets), _output_mse(op, learned, inputs, targets)
    )


def _reconstruction(out: torch.Tensor, target: torch.Tensor, axis: int) -> torch.Tensor:
    """Squared error summed over the output channels, averaged over the rest (AIMET's scale for the loss)."""
    return (out - target).pow(2).sum(dim=axis).mean()


@torch.no_grad()
def _output_mse(op, weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 16) -> float:
    total = count = 0.0
    for x, y in zip(inputs.split(chunk), targets.split(chunk), strict=True):
        total += float((op(x, weight) - y).double().pow(2).sum())
        count += y.numel()
    return total / max(count, 1)


def rounding_to_text(up: torch.Tensor) -> str:
    """The decisions as base64 of one bit per weight (row-major)."""
    bits = np.packbits(up.reshape(-1).to(torch.uint8).numpy())
    return base64.b64encode(bits.tobytes()).decode("ascii")


def rounding_from_text(text: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `rounding_to_text` for a weight of `shape`."""
    count = math.prod(shape)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:count]
    if bits.size != count:
        raise ValueError(f"saved AdaRound decisions hold {bits.size} weights, the layer has {count}; re-run AdaRound")
    return torch.from_numpy(bits.astype(np.float32)).reshape(tuple(shape)).bool()


# ---------------------------------------------------------------------------------------------------------
# The replay


class _Run(fx.Interpreter):
    """One batch through the observed graph: observers are identities (float path) or fake-quantize with their
    group's encoding (quantized path); `weights` replaces layers' weights by their learned values."""

    def __init__(self, gm, args, encodings: dict[str, Encoding] | None, weights: dict[str, tuple[int, torch.Tensor]]):
        super().__init__(gm)
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        self.encodings = encodings
        self.weights = weights

    def call_module(self, target, args, kwargs):
        if not str(target).startswith(OBSERVER_PREFIX):
            return super().call_module(target, args, kwargs)
        if self.encodings is None:
            return args[0]
        enc = self.encodings[str(target)[len(OBSERVER_PREFIX) :]]
        scale, zp = enc.tensors_()
        return qmath.fake_quantize(args[0], scale, zp, enc.qmin, enc.qmax, enc.axis)

    def run_node(self, n):
        if n.name not in self.weights:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        pos, weight = self.weights[n.name]
        args = list(args)
        args[pos] = weight
        return n.target(*args, **kwargs)


def _activation_after(node: fx.Node):
    """The fused activation that alone reads `node`, as a function (identity if none)."""
    if len(node.users) != 1:
        return lambda y: y
    (user,) = node.users
    if user.op != "call_function" or user.target not in FUSED_ACTIVATIONS or user.args[0] is not node:
        return lambda y: y
    rest, kwargs = user.args[1:], dict(user.kwargs)
    return lambda y, target=user.target: target(y, *rest, **kwargs)


def adaround_layers(
    gm: fx.GraphModule,
    placement: Placement,
    act: dict[str, Encoding],
    chunks: Sequence[tuple],
    config: QuantConfig,
    *,
    overflow_fix: bool,
    progress: bool = True,
) -> dict[str, tuple[LayerResult, Encoding]]:
    """Learn the rounding of every quantized conv/linear weight (`refine.find_targets`) in graph order, from the
    sample batches `chunks`; returns layer node name -> (result, the weight encoding it was learned for)."""
    if not chunks:
        raise ValueError("AdaRound learns from kept calibration samples, but none were kept; calibrate with data")
    settings = config.adaround
    targets = find_targets(gm, placement)
    learned: dict[str, tuple[int, torch.Tensor]] = {}
    results: dict[str, tuple[LayerResult, Encoding]] = {}
    float_runs = [_Run(gm, args, None, {}) for args in chunks]
    quant_runs = [_Run(gm, args, act, learned) for args in chunks]
    last_uses = float_runs[0].user_to_last_uses
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            for run in float_runs:
                run.env[node] = run.run_node(node)
            if node.name in targets:
                rule = targets[node.name][1]
                fetched = [run.fetch_args_kwargs_from_env(node) for run in quant_runs]
                outputs = [run.env[node] for run in float_runs]
                layer = layer_samples(node, rule, fetched, outputs, config, overflow_fix)
                result, enc = _learn_layer(node, layer, settings, progress)
                learned[node.name] = (rule.weight_arg, result.weight)
                results[node.name] = (result, enc)
            for run in quant_runs:
                run.env[node] = run.run_node(node)
            for dead in last_uses.get(node, ()):
                for run in (*float_runs, *quant_runs):
                    del run.env[dead]
    return results


def _learn_layer(node: fx.Node, layer, settings, progress: bool) -> tuple[LayerResult, Encoding]:
    enc = weight_encoding(layer.weight, layer.weight_spec, layer.weight_range)
    activation = _activation_after(node)

    def op(x, w, inner=layer.op):
        return activation(inner(x, w))

    inputs, targets = torch.cat(layer.inputs), activation(torch.cat(layer.outputs))
    bar = (lambda it: tqdm(it, desc=f"AdaRound {node.name}", leave=False)) if progress else None
    with torch.enable_grad():
        result = learn_rounding(
            op,
            Grid.of(layer.weight, enc),
            inputs,
            targets,
            iterations=settings.iterations,
            batch_size=settings.batch_size,
            reg_weight=settings.reg_weight,
            warm_up=settings.warm_up,
            lr=settings.lr,
            out_axis=layer.out_axis,
            progress=bar,
        )
    return result, enc


def apply_learned_weights(
    gm: fx.GraphModule, placement: Placement, weights: dict[str, torch.Tensor], act: dict[str, Encoding] | None = None
) -> None:
    """Replace each layer's weight by its learned (dequantized) value: convert then rounds it to exactly the
    learned codes, given the same weight range.  With `act` (bias correction on), each layer's bias also absorbs
    the mean output shift of the learned rounding (E[(W_learned - W) x], from its input group's channel mean),
    the correction convert applies to round-to-nearest weights and cannot see once the weight is replaced."""
    nodes = {n.name: n for n in gm.graph.nodes}
    groups = {name: group for name, (group, _) in find_targets(gm, placement).items()}
    for name, weight in weights.items():
        node = nodes[name]
        rule = placement.quantized_ops[name]
        args = list(node.args)
        if act is not None and name in groups:
            _correct_bias(gm, node, rule, args, weight, act[groups[name]])
        args[rule.weight_arg] = add_constant(gm, node, f"{name}_adarounded_weight", weight)
        node.args = tuple(args)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _correct_bias(gm: fx.GraphModule, node: fx.Node, rule, args: list, weight: torch.Tensor, enc: Encoding) -> None:
    original = attr_value(gm, args[rule.weight_arg])
    pos = rule.bias_arg
    bias = attr_value(gm, args[pos]) if pos is not None and pos < len(args) else None
    groups = args[6] if node.target is not torch.ops.aten.linear.default and len(args) > 6 else 1
    if original is None or bias is None or enc.mean is None or len(enc.mean) != original.shape[1] * groups:
        return
    shift = bias_shift(weight - original.detach().float(), torch.tensor(enc.mean), groups).float()
    args[pos] = add_constant(gm, node, f"{node.name}_adaround_bias", bias.detach().float() - shift)


def saved_weights(gm: fx.GraphModule, placement: Placement, saved: dict) -> dict[str, torch.Tensor]:
    """From saved weight encodings with AdaRound decisions: layer -> the learned dequantized weight."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = {}
    for name, raw in saved.items():
        if not raw.get("rounding") or name not in nodes or name not in placement.quantized_ops:
            continue
        w = attr_value(gm, nodes[name].args[placement.quantized_ops[name].weight_arg])
        if w is None:
            continue
        enc = Encoding(**{**raw, "range": tuple(raw["range"]) if raw.get("range") else None})
        found[name] = Grid.of(w, enc).weight(rounding_from_text(raw["rounding"], w.shape).float())
    return found


def summary_line(results: dict[str, tuple[LayerResult, Encoding]]) -> str:
    """One line for `QuantizedModel.summary()`: layers rounded and the output MSE per layer, nearest -> learned."""
    if not results:
        return "AdaRound: no layers"
    ratios = [r.learned_mse / r.nearest_mse for r, _ in results.values() if r.nearest_mse > 0]
    per_layer = ", ".join(f"{k} {r.nearest_mse:.3g}->{r.learned_mse:.3g}" for k, (r, _) in results.items())
    mean = sum(ratios) / max(1, len(ratios))
    return (
        f"AdaRound: {len(results)} layers; layer output MSE vs fp32 learned/nearest, mean {mean:.2f} "
        f"(per layer, nearest->learned: {per_layer})"
    )
