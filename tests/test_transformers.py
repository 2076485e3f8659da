"""A tiny randomly initialised BERT (2 layers) through the whole pipeline: capture with dynamic batch and
sequence, SmoothQuant, int8 linears and attention matmuls, ONNX export run on ONNX Runtime and OpenVINO."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from eightbit import quantize  # noqa: E402
from eightbit.api import _prepare, _smooth  # noqa: E402
from eightbit.config import OpKind, QuantConfig, SmoothQuant  # noqa: E402
from eightbit.runtime.backends import Backend, load  # noqa: E402
from eightbit.text import SentenceEncoder  # noqa: E402
from tests.helpers import tiny_bert_encoder  # noqa: E402

CONFIG = QuantConfig(smooth_quant=SmoothQuant(alphas=(0.5, 0.8), search_batches=2))


def _encoder():
    return tiny_bert_encoder()


def _batch(lengths, seq_len=None, seed=0):
    """Random ids with right padding: row i has lengths[i] real tokens (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    seq_len = seq_len or max(lengths)
    ids = torch.randint(5, 120, (len(lengths), seq_len), generator=g)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _calibration():
    return [_batch([5 + (i + j) % 11 for j in range(4)], seed=i) for i in range(8)]


@pytest.fixture(scope="module")
def quantized():
    model = _encoder()
    return model, quantize(model, _calibration(), config=CONFIG, progress=False)


def test_linears_and_attention_matmuls_are_int8_layernorm_softmax_gelu_float(quantized):
    _, qm = quantized
    kinds = Counter(rule.kind for rule in qm.placement.quantized_ops.values())
    assert kinds == {OpKind.LINEAR: 12, OpKind.MATMUL: 4}  # Q K V O FC1 FC2 and QK^T, PV, per layer
    floats = " ".join(qm.placement.float_ops.values())
    for op in ("layer_norm", "softmax", "gelu"):
        assert op in floats
    residual = [n for n, why in qm.placement.float_ops.items() if why == "its output feeds no int8 op"]
    assert len(residual) >= 4  # residual adds feed LayerNorm: kept float
    assert qm.smooth_alpha in (0.5, 0.8)


def test_smoothing_leaves_the_fp32_model_unchanged():
    model = _encoder()
    batches = _calibration()
    prepared = _prepare(model, batches[0], CONFIG)
    _smooth(prepared, lambda: [tuple(b.values()) for b in batches], CONFIG)
    assert any("smooth" in str(n.args[1]) for n in prepared.gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    with torch.no_grad():
        for b in (_batch([3, 9, 6], seed=50), _batch([12], seed=51)):
            want = model(**b)
            got = prepared.gm(b["input_ids"], b["attention_mask"])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_padding_does_not_change_int8_embeddings(quantized):
    _, qm = quantized
    padded = _batch([4, 10, 7], seq_len=12, seed=3)
    with torch.no_grad():
        together = qm(**padded)
        for i, n in enumerate([4, 10, 7]):
            alone = qm(padded["input_ids"][i : i + 1, :n], padded["attention_mask"][i : i + 1, :n])
            cos = torch.nn.functional.cosine_similarity(alone, together[i : i + 1]).item()
            assert cos > 0.999


@pytest.mark.parametrize("backend", [Backend.ORT, Backend.OPENVINO])
def test_export_runs_with_other_batch_sizes_and_sequence_lengths(quantized, tmp_path_factory, backend):
    model, qm = quantized
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    report = qm.export_onnx(path)
    assert report.parity.max_steps < 8
    runner = load(path, backend)
    assert runner.input_names == ["input_ids", "attention_mask"]
    for lengths, seq_len in (([6], 6), ([9, 20, 14], 20)):
        feeds = _batch(lengths, seq_len, seed=7)
        got = runner.run({k: v.numpy() for k, v in feeds.items()})[0]
        with torch.no_grad():
            simulated, fp32 = qm(**feeds).numpy(), model(**feeds).numpy()
        assert got.shape == (len(lengths), 32)
        assert _min_cosine(got, simulated) > 0.995
        assert _min_cosine(got, fp32) > 0.98


def test_onnx_runtime_runs_every_matmul_in_int8(quantized, tmp_path):
    _, qm = quantized
    qm.export_onnx(tmp_path / "bert.onnx")
    model = onnx.load(tmp_path / "bert.onnx")
    int8_tables = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert any(i.dims[0] == 120 for i in int8_tables)  # the token embedding table is stored as int8 rows
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "bert.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "optimized.onnx").graph.node
    ops = Counter(n.op_type for n in nodes)
    assert ops["MatMul"] == 0 and ops["FusedMatMul"] == 0
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 16
    producer = {out: n.op_type for n in nodes for out in n.output}
    mul_inputs = [producer.get(i) for n in nodes if n.op_type == "Mul" for i in n.input]
    assert "MatMulIntegerToFloat" not in mul_inputs  # the attention scale is folded into Q's dequantize
    # Shapes are recorded in the file, so ORT can prove the residual adds fusable into its LayerNorm kernel.
    assert ops["SkipLayerNormalization"] == 4


def test_direct_emission_matches_the_dynamo_exporter(quantized, tmp_path):
    from eightbit.export import emit
    from eightbit.export.onnx import DIRECT, _dynamo_model

    _, qm = quantized
    assert qm.export_onnx(tmp_path / "bert.onnx").exporter == DIRECT
    kwargs = dict(input_names=qm.input_names, dynamic_axes=qm.dynamic_axes, opset=20)
    direct = emit.emit_model(qm.graph_module, qm._example_args, **kwargs)
    dynamo = _dynamo_model(qm.graph_module, qm._example_args, **kwargs)
    onnx.checker.check_model(direct, full_check=True)
    for lengths, seq_len in (([6], 6), ([9, 20, 14], 20)):
        feeds = {k: v.numpy() for k, v in _batch(lengths, seq_len, seed=7).items()}
        got, want = (
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (direct, dynamo)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _relative(name: str):
    torch.manual_seed(0)
    common = dict(vocab_size=120, num_attention_heads=2, max_position_embeddings=80)
    if name == "roberta":
        config = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, **common)
        return transformers.RobertaModel(config, add_pooling_layer=False)
    config = transformers.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=120)
    return transformers.DistilBertModel(config)


@pytest.mark.parametrize("name", ["roberta", "distilbert"])
def test_bert_relatives_quantize_and_export(name, tmp_path):
    model = SentenceEncoder(_relative(name).eval()).eval()
    calibration = [{k: v.clamp(min=1) for k, v in b.items()} for b in _calibration()]  # RoBERTa pads with id 1
    qm = quantize(model, calibration, config=CONFIG, progress=False)
    kinds = Counter(rule.kind for rule in qm.placement.quantized_ops.values())
    assert kinds == {OpKind.LINEAR: 12, OpKind.MATMUL: 4}
    report = qm.export_onnx(tmp_path / f"{name}.onnx")
    assert report.parity.max_steps < 8
    feeds = _batch([4, 13], seed=11)
    got = load(tmp_path / f"{name}.onnx", Backend.ORT).run({k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        assert _min_cosine(got, model(**feeds).numpy()) > 0.98
