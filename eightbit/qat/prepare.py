"""`prepare_qat`: calibrate as PTQ does, then turn observers into learnable fake quantizers and weight layers into
`QATLayer`s; `QATModel.convert()` turns them back into the graph the PTQ convert expects.

Why the graph trains: the captured graph is an ordinary `fx.GraphModule` of differentiable ATen ops whose weights
are parameters, so autograd runs through it.  Capture is in eval mode, so torch.export specialises BatchNorm to
its running statistics and removes dropout; conv/linear -> BatchNorm pairs get their training behaviour back
from `QATLayer` (simulated folding), any other BatchNorm (e.g. input preprocessing) stays frozen, and dropout is
not simulated.  A second capture of the float model (same example inputs, hence the same node names) finds
which BatchNorm followed which layer; a layer whose folded weight does not match that BatchNorm exactly keeps
the PTQ fold (as with `BatchNormMode.FOLD`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import fx, nn

from eightbit.api import QuantizedModel, _Prepared, calibrate
from eightbit.calibration.calibrate import OBSERVER_PREFIX
from eightbit.config import QuantConfig, Scheme
from eightbit.graph import ops
from eightbit.graph.capture import capture
from eightbit.graph.transforms.fold_bn import _BATCHNORM, fold_bn
from eightbit.graph.utils import add_constant, attr_value
from eightbit.qat.config import BatchNormMode, QATConfig
from eightbit.qat.fake_quant import FakeQuantizer
from eightbit.qat.layers import BatchNormState, QATLayer

aten = torch.ops.aten

LAYER_PREFIX = "eightbit_qat_"
_WEIGHT_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default, ops.CONV2D_PADDED}


class QATModel(nn.Module):
    """A model in quantization-aware training: trains like any `nn.Module`; `convert()` gives the int8 model.

    Its parameters are the fp32 shadow weights (of `QATLayer`s and any float layers) and the quantization
    parameters (`FakeQuantizer`s).  A step is one forward pass in training mode; the `QATConfig` schedule
    (observe, learn, freeze quantizers, freeze BatchNorm) advances with it.  `ptq_model` is the PTQ model the
    quantization parameters started from (not a submodule: not trained, not in `state_dict`).
    """

    def __init__(self, graph_module: fx.GraphModule, prepared: _Prepared, qat: QATConfig, ptq_model) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.qat_config = qat
        self.steps = 0
        self.__dict__["_prepared"] = prepared  # metadata for convert (its graph is not used)
        self.__dict__["ptq_model"] = ptq_model

    @property
    def config(self) -> QuantConfig:
        return self._prepared.config

    @property
    def input_names(self) -> list[str]:
        return self._prepared.input_names

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = state["steps"]

    def forward(self, *args, **kwargs):
        plan = self._prepared.binder.plan
        if plan is not None:
            args, kwargs = plan.graph_inputs(args, kwargs), {}
        if kwargs:
            rest = self.input_names[len(args) :]
            if set(kwargs) != set(rest):
                raise TypeError(f"this model takes the inputs {self.input_names}; got keywords {sorted(kwargs)}")
            args = (*args, *(kwargs[n] for n in rest))
        if self.training:
            self._advance_schedule()
        return self.graph_module(*args)

    def train(self, mode: bool = True) -> QATModel:
        # torch.export's module refuses train()/eval() (its graph is specialised to one mode); here the mode is
        # meaningful only to the QAT modules, so the flag is set directly on every module.
        for module in self.modules():
            module.training = mode
        return self

    def quantizers(self) -> dict[str, FakeQuantizer]:
        """Every fake quantizer by module name (activation groups, then weights)."""
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, FakeQuantizer)}

    def layers(self) -> dict[str, QATLayer]:
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, QATLayer)}

    def set_quantizers(
        self, *, observing: bool | None = None, fake_quant: bool | None = None, learning: bool | None = None
    ) -> None:
        """Set a switch on every quantizer (None leaves it); set single quantizers through `quantizers()`."""
        for q in self.quantizers().values():
            for name, value in (("observing", observing), ("fake_quant", fake_quant), ("learning", learning)):
                if value is not None:
                    setattr(q, name, value)

    def freeze_batchnorm(self, frozen: bool = True) -> None:
        """Use the running statistics (and stop updating them) in every simulated BatchNorm."""
        for layer in self.layers().values():
            layer.bn_frozen = frozen

    def _advance_schedule(self) -> None:
        """Switches change only at the steps the schedule names, so a user's own changes in between stay."""
        qat, step = self.qat_config, self.steps
        if qat.observe_steps and step == 0:
            self.set_quantizers(observing=True, learning=False)
        if qat.observe_steps and step == qat.observe_steps:
            self.set_quantizers(observing=False, learning=qat.learn_scales or qat.learn_zero_points)
        if qat.freeze_quantizers_after is not None and step == qat.freeze_quantizers_after:
            self.set_quantizers(observing=False, learning=False)
        if qat.freeze_bn_after is not None and step == qat.freeze_bn_after:
            self.freeze_batchnorm()
        self.steps += 1

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weights, quantization parameters): quantization parameters usually want no weight decay."""
        quant = {id(p) for q in self.quantizers().values() for p in q.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        return [p for p in params if id(p) not in quant], [p for p in params if id(p) in quant]

    @torch.no_grad()
    def convert(self) -> QuantizedModel:
        """The int8 `QuantizedModel` with the learned weights and quantization parameters (this model is left
        as it is): the PTQ convert on the same placement, so summary, encodings and ONNX export are PTQ's."""
        gm = copy.deepcopy(self.graph_module)
        for module in gm.modules():
            module.training = False
        weight_ranges = {}
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(LAYER_PREFIX):
                layer: QATLayer = gm.get_submodule(str(node.target))
                _restore_layer(gm, node, layer)
                if layer.quantizer is not None:
                    weight_ranges[layer.node_name] = layer.quantizer.encoding([layer.node_name])
        placement = self._prepared.placement
        act = {g: gm.get_submodule(OBSERVER_PREFIX + g).encoding(placement.groups[g]) for g in placement.groups}
        prepared = replace(self._prepared, gm=gm)
        return prepared.finish(act, self.config, weight_ranges)


def _restore_layer(gm: fx.GraphModule, node: fx.Node, layer: QATLayer) -> None:
    w, b = layer.effective_weights()
    w_node = add_constant(gm, node, f"{layer.node_name}_weight", w)
    b_node = None if b is None else add_constant(gm, node, f"{layer.node_name}_bias", b)
    with gm.graph.inserting_before(node):
        op = gm.graph.call_function(layer.target, (node.args[0], w_node, b_node, *layer.rest_args), layer.kwargs)
    node.replace_all_uses_with(op)
    gm.graph.erase_node(node)
    op.name = layer.node_name  # placement and encodings are keyed by the original node name


def prepare_qat(
    model: nn.Module,
    calibration_data: Iterable,
    example_inputs=None,
    *,
    config: QuantConfig | None = None,
    qat: QATConfig | None = None,
    progress: bool = True,
) -> QATModel:
    """A trainable QAT model of `model` (never modified), its quantization parameters initialised by a PTQ
    calibration on `calibration_data` with the config's calibration methods.

    Bias correction is not applied (training adjusts the biases), so `config.bias_correction` is ignored."""
    config = replace(config or QuantConfig(), bias_correction=False)
    qat = qat or QATConfig()
    if not isinstance(qat, QATConfig):
        raise TypeError(f"qat takes a QATConfig, got {type(qat).__name__}")
    if Scheme.UNIFORM not in (config.weights.scheme,) or config.activations.scheme is not Scheme.UNIFORM:
        raise ValueError("QAT trains integer (uniform) quantization; log2 and fp16 schemes are for PTQ studies only")
    calibration = calibrate(model, calibration_data, example_inputs, config=config, progress=progress)
    ptq = calibration.quantize()  # works on a copy: the calibrated graph below is ours to rewrite
    prepared = calibration._prepared
    gm = prepared.gm
    _install_activation_quantizers(gm, ptq, config, qat)
    batchnorms = _batchnorm_sources(model, prepared) if qat.batchnorm is BatchNormMode.SIMULATE else {}
    _install_layers(gm, prepared, ptq, config, qat, batchnorms)
    _freeze_remaining_batchnorms(gm)
    _drop_unused_attributes(gm)
    gm.recompile()
    qat_model = QATModel(gm, prepared, qat, ptq)
    if qat.freeze_bn_after == 0:
        qat_model.freeze_batchnorm()
    return qat_model.train()


def _install_activation_quantizers(gm: fx.GraphModule, ptq: QuantizedModel, config: QuantConfig, qat: QATConfig):
    """Swap each observer for a fake quantizer under the same name: the graph keeps its call sites."""
    spec = config.activations
    for group, enc in ptq.activation_encodings.items():
        fq = FakeQuantizer(
            enc,
            symmetric=spec.symmetric,
            power_of_two=spec.power_of_two,
            learn_scale=qat.learn_scales,
            learn_zero_point=qat.learn_zero_points,
            momentum=qat.observer_momentum,
        )
        setattr(gm, OBSERVER_PREFIX + group, fq)


def _install_layers(gm, prepared: _Prepared, ptq: QuantizedModel, config: QuantConfig, qat: QATConfig, batchnorms):
    """Replace every conv/linear with a constant weight by a `QATLayer` (fake-quantized when PTQ quantizes it)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _WEIGHT_OPS:
            continue
        weight = attr_value(gm, node.args[1])
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = attr_value(gm, bias_node)
        if weight is None or (bias_node is not None and bias is None):
            continue  # weights computed at run time: an ordinary float op, trained as it is
        enc = ptq.weight_encodings.get(node.name) if node.name in prepared.placement.quantized_ops else None
        quantizer = None
        if enc is not None:
            quantizer = FakeQuantizer(
                enc,
                symmetric=config.weights.symmetric,
                power_of_two=config.weights.power_of_two,
                learn_scale=qat.learn_scales,
                per_sample=False,
            )
        bn = batchnorms.get(node.name)
        if bn is not None:
            weight, bias, bn_state = bn
        else:
            bn_state = None
        layer = QATLayer(node.name, node.target, node.args[3:], node.kwargs, weight, bias, quantizer, bn_state)
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and str(source.target).startswith(OBSERVER_PREFIX)
        ):
            layer.quantize_bias_with(gm.get_submodule(str(source.target)))
        target = LAYER_PREFIX + node.name
        gm.add_submodule(target, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _batchnorm_sources(model: nn.Module, prepared: _Prepared) -> dict[str, tuple]:
    """Layer node name -> (unfolded weight, bias, BatchNormState) for every layer whose PTQ fold is reproduced
    exactly by folding that BatchNorm into the float model's own weights."""
    float_gm = capture(prepared.binder.plan.module(model), prepared.args).graph_module
    found = {}
    for bn in float_gm.graph.nodes:
        if bn.op != "call_function" or bn.target not in _BATCHNORM:
            continue
        a = bn.args
        if bn.target is aten.batch_norm.default:
            if a[5]:
                continue
            producer, gamma, beta, mean, var, momentum, eps = a[0], a[1], a[2], a[3], a[4], a[6], a[7]
        else:
            producer, gamma, beta, mean, var, momentum, eps = a[0], a[1], a[2], a[3], a[4], a[5], a[6]
        if not isinstance(producer, fx.Node) or producer.target not in _WEIGHT_OPS or len(producer.users) != 1:
            continue
        w = attr_value(float_gm, producer.args[1])
        b = attr_value(float_gm, producer.args[2]) if len(producer.args) > 2 else None
        stats = [attr_value(float_gm, n) for n in (gamma, beta, mean, var)]
        target = _node_named(prepared.gm, producer.name)
        if w is None or stats[2] is None or stats[3] is None or target is None:
            continue
        folded_w, folded_b = fold_bn(w, b, *stats, eps)
        if torch.equal(folded_w, attr_value(prepared.gm, target.args[1])) and torch.equal(
            folded_b, attr_value(prepared.gm, target.args[2])
        ):
            found[producer.name] = (w, b, BatchNormState(*stats, eps=eps, momentum=momentum))
    return found


def _node_named(gm: fx.GraphModule, name: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.name == name and n.target in _WEIGHT_OPS), None)


def _freeze_remaining_batchnorms(gm: fx.GraphModule) -> None:
    """A BatchNorm that follows no conv/linear (input preprocessing) stays frozen: eval statistics, no training."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _BATCHNORM:
            for arg in node.args[1:5]:
                value = attr_value(gm, arg)
                if isinstance(value, nn.Parameter):
                    value.requires_grad_(False)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Remove parameters and buffers no node reads any more (weights replaced by QATLayers, folded BN
    parameters): unused parameters would never get gradients, which DDP refuses."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    keep_prefixes = (LAYER_PREFIX, OBSERVER_PREFIX)
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for name in names:
        if name in used or name.startswith(keep_prefixes):
            continue
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        delattr(module, leaf)
