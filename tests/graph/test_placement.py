from collections import Counter

import torch

from eightbit import OpKind, QuantConfig, quantize
from eightbit.graph.capture import capture
from eightbit.graph.placement import place
from eightbit.graph.transforms import fold_batchnorm
from tests.helpers import ConcatNet, DepthwiseNet, ResidualNet, calibration_batches


def _ops(qm):
    return Counter(str(n.target) for n in qm.graph_module.graph.nodes if n.op == "call_function")


def _placement(model, config=None):
    gm = capture(model.eval(), (torch.randn(2, 3, 16, 16),)).graph_module
    fold_batchnorm(gm)
    return place(gm, config or QuantConfig())


def test_residual_net_node_counts():
    qm = quantize(ResidualNet().eval(), calibration_batches(), progress=False)
    ops = _ops(qm)
    # Q/DQ on: input, relu out (shared by the add), conv out, add out, max-pool out (shared),
    # pool out, flatten out (shared with pool) -> 7 activation Q's.
    assert ops["eightbit.quantize.default"] == 7
    # 7 activation DQ's + 3 weights + 3 int32 biases (stem bias is the folded BN's).
    assert ops["eightbit.dequantize.default"] == 13
    # The ReLU is dropped: its quantize (zero point 0) already clamps at 0.
    assert ops["aten.relu.default"] == 0 and ops["aten.add.Tensor"] == 1
    groups = _placement(ResidualNet()).groups
    assert len(groups) == 5  # input, relu, conv, add+maxpool, avgpool+flatten


def test_maxpool_and_flatten_share_input_parameters():
    p = _placement(ResidualNet())
    by_tensor = p.group_of()
    assert by_tensor["max_pool2d"] == by_tensor["add"]
    assert by_tensor["flatten"] == by_tensor["adaptive_avg_pool2d"]


def test_relu_is_fused_into_conv_output():
    p = _placement(ResidualNet())
    tensors = p.group_of()
    assert "relu" in tensors and "conv2d" not in tensors  # Q after the ReLU, not between conv and ReLU


def test_depthwise_net_quantizes_every_conv_and_relu6_fuses():
    p = _placement(DepthwiseNet())
    kinds = Counter(rule.kind for rule in p.quantized_ops.values())
    assert kinds[OpKind.CONV] == 3 and kinds[OpKind.LINEAR] == 1 and kinds[OpKind.POOL] == 1
    tensors = p.group_of()
    assert {"relu6", "relu6_1"} <= set(tensors) and "conv2d" not in tensors and "conv2d_1" not in tensors
    assert "linear" not in tensors  # the model output stays float


def test_concat_inputs_and_output_are_quantized():
    p = _placement(ConcatNet())
    tensors = p.group_of()
    assert {"relu", "relu_1", "cat"} <= set(tensors)
    assert "cat" in {n for n, r in p.quantized_ops.items() if r.kind is OpKind.CONCAT}


def test_keep_float_by_module_name_and_op_kind():
    p = _placement(ResidualNet(), QuantConfig(keep_float=("fc",)))
    assert "linear" in p.float_ops and "fc" in p.float_ops["linear"]
    p = _placement(ResidualNet(), QuantConfig(keep_float_ops=(OpKind.ADD,)))
    assert "add" in p.float_ops and "add" not in p.quantized_ops
    qm = quantize(ResidualNet().eval(), calibration_batches(), config=QuantConfig(keep_float=("fc",)), progress=False)
    assert "linear" not in qm.weight_encodings and "conv2d" in qm.weight_encodings


def test_quantize_outputs_option():
    p = _placement(DepthwiseNet(), QuantConfig(quantize_outputs=True))
    assert "linear" in p.group_of()


def test_clamp_is_kept_when_the_quantize_does_not_imply_it():
    import torch
    from torch import nn

    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.c(torch.clamp(x, -0.5, 0.5)) + self.c(torch.relu(x))

    model = Clamped().eval()
    qm = quantize(model, calibration_batches(), progress=False)
    ops = _ops(qm)
    # clamp(-0.5, 0.5) is tighter than the input quantize's range: kept; relu before a zp-0 quantize: dropped.
    assert ops["aten.clamp.default"] == 1 and ops["aten.relu.default"] == 0
    x = torch.randn(2, 3, 16, 16)  # the calibration size: height and width were captured static
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x).flatten(1), qm(x).flatten(1)).min() > 0.98
