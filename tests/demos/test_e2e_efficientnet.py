"""End to end on the real model: EfficientNet-Lite0 with its ImageNet weights, judged on ONNX Runtime."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from eightbit import quantize
from eightbit.analysis import metrics
from eightbit.runtime.backends import Backend, load

zoo = pytest.importorskip("eightbit.demos.zoo")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = zoo.efficientnet_lite0()
    images, labels = zoo.imagenet_photos()
    x = torch.stack([zoo.preprocess(im) for im in images])
    qm = quantize(model, zoo.augmented_crops(images, 128, seed=1).split(32), progress=False)
    path = tmp_path_factory.mktemp("e2e") / "effnet_int8.onnx"
    report = qm.export_onnx(path)
    with torch.no_grad():
        reference = model(x).numpy()
    return path, report, x.numpy(), labels.numpy(), reference


@pytest.mark.parametrize("backend", [Backend.ORT, Backend.OPENVINO])
def test_int8_keeps_accuracy_on_the_runtime(exported, backend):
    path, _, x, labels, reference = exported
    runner = load(path, backend)
    logits = runner.run({runner.input_names[0]: x})[0]
    assert metrics.top1_agreement(reference, logits) >= 19
    assert metrics.topk_hits(logits, labels, 5) >= 19
    assert metrics.mean_cosine(reference, logits) >= 0.99


def test_export_is_small_and_close_to_simulation(exported):
    path, report, *_ = exported
    assert report.size_bytes < 0.3 * 18.7e6  # the fp32 ONNX is 18.7 MB
    assert report.parity.max_steps < 8


def test_onnx_runtime_runs_every_layer_in_int8(exported, tmp_path):
    path, *_ = exported
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0
    assert not {"Conv", "FusedConv", "Gemm", "ReduceMean"} & set(ops)
    assert np.isfinite(ops.total())
