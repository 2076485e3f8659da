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


def _tiny(name: str, **kwargs):
    qm = quantized(name)
    model, _ = tflite_bytes(qm.graph_module, qm._example_args, **kwargs)
    return model, [input_codes(qm.graph_module, s) for s in samples_of(qm._example_args)]


def test_every_output_model_computes_the_same():
    import numpy as np

    from eightbit.export.tflite_run import LiteRTKernels, run_litert, with_every_output

    model, samples = _tiny("activations")
    every = with_every_output(model)
    for kernels in LiteRTKernels:
        plain = run_litert(model, samples[0], kernels=kernels)[0]
        assert np.array_equal(run_litert(every, samples[0], kernels=kernels)[-1], plain)


def test_litert_kernel_sets_against_tflm():
    from eightbit.analysis.runtime_agreement import compare_runtimes
    from eightbit.export.tflite_run import LiteRTKernels

    model, samples = _tiny("conv_variants")
    results = {r.kernels: r for r in compare_runtimes(model, samples)}
    assert set(results) == set(LiteRTKernels)
    for r in results.values():
        assert r.samples == len(samples) and r.total > 0
        assert r.worst_kernel_codes <= 1, str(r)  # every kernel alone rounds within 1 code of TFLM
        assert set(r.kernel_errors) >= {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D"}
        if r.max_codes:  # an output that differs has a first operator that differs
            assert r.first_divergence is not None
        for op in ("CONV_2D", "DEPTHWISE_CONV_2D"):  # within 1 code: one of the two is the correctly rounded value
            e = r.kernel_errors[op]
            assert e.litert_correct + e.tflm_correct == e.differing
    reference = results[LiteRTKernels.REFERENCE]
    assert reference.max_codes <= 1 and reference.top1_flips == 0
    assert "LiteRT reference vs TFLM" in str(reference)


def test_runtime_comparison_refuses_float_io():
    from eightbit.analysis.runtime_agreement import compare_runtimes

    model, samples = _tiny("residual", float_io=True)
    with pytest.raises(ValueError, match="float_io=False"):
        compare_runtimes(model, samples)


def test_report_cli(tmp_path, capsys):
    import numpy as np

    from eightbit.cli import main as cli

    model, samples = _tiny("depthwise")
    path = tmp_path / "m.tflite"
    path.write_bytes(model)
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.concatenate([s[0] for s in samples]))
    assert cli(["report", "--target", "mcu", str(path), "--inputs", str(inputs), "--alignment", "32"]) == 0
    out = capsys.readouterr().out
    assert "waste @32" in out and "TFLM arena" in out and "LiteRT xnnpack vs TFLM on 2 samples" in out
    np.save(inputs, np.concatenate([s[0] for s in samples]).astype(np.float32))
    assert cli(["report", "--target", "mcu", str(path), "--inputs", str(inputs)]) == 2
    assert "int8 input codes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["report", str(path)])  # --target is required


def test_exact_output_is_the_reference_before_rounding():
    import numpy as np

    from eightbit.integer.executor import IntegerReference

    model, samples = _tiny("conv_variants")
    reference = IntegerReference(model)
    _, values = reference.run(samples[0])
    dots = [i for i in range(len(reference.graph.operators)) if reference.op_name(i) == "CONV_2D"]
    for i in dots:
        exact = reference.exact_output(i, values)
        codes = values[int(reference.graph.operators[i].outputs[0])].astype(np.float64)
        assert np.abs(codes - exact).max() < 0.55  # TFLM's double rounding can miss by a little over half a code
    with pytest.raises(ValueError, match="not one of"):
        reference.exact_output(len(reference.graph.operators) - 1, values)  # AVERAGE_POOL_2D
