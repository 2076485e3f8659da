"""The deployment report of an int8 .tflite: alignment waste, weights, arena, int16 overflow, TFLM vs reference."""

import pytest

pytest.importorskip("tflite_micro")

from eightbit.analysis.deployment import alignment_waste, deployment_report, main  # noqa: E402
from eightbit.export.tflite import input_codes, samples_of, tflite_bytes  # noqa: E402
from tests.tflite_models import quantized  # noqa: E402


def test_alignment_waste():
    assert alignment_waste("CONV_2D", 16, 32, 16) == 0
    assert alignment_waste("CONV_2D", 3, 16, 16) == pytest.approx(1 - 3 / 16)
    assert alignment_waste("DEPTHWISE_CONV_2D", 24, 24, 16) == pytest.approx(1 - 24 / 32)


def test_report_on_a_tiny_model(tmp_path, capsys):
    qm = quantized("depthwise")
    model, _ = tflite_bytes(qm.graph_module, qm._example_args)
    samples = [input_codes(qm.graph_module, s) for s in samples_of(qm._example_args)]
    report = deployment_report(model, samples, alignment=16)
    dot = [r for r in report.layers if r.products]
    assert [r.op for r in dot] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED"]
    stem = dot[0]
    assert (stem.in_channels, stem.out_channels, stem.products) == (3, 16, 27)
    assert stem.weight_bytes == 16 * 27 + 16 * 4  # int8 filter + int32 bias
    assert report.arena_bytes > 0 and report.first_mismatch is None and report.n1 == 2
    assert all(r.max_partial > 0 for r in dot)
    path = tmp_path / "m.tflite"
    path.write_bytes(model)
    assert main([str(path), "--alignment", "32"]) == 0
    assert "first layer where TFLM differs from eightbit.integer: none" in capsys.readouterr().out
