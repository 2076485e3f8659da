import json
import warnings

import pytest
import torch
from torch import nn

import eightbit
from eightbit.analysis.figures import check_png
from eightbit.analysis.layers import analyze
from eightbit.analysis.reference import Reference
from tests.analysis.outlier_models import OutlierMLP, batches


@pytest.fixture(scope="module")
def quantized():
    model = OutlierMLP().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eightbit.CollapsedRangeWarning)  # the planted outlier, on purpose
        qm = eightbit.quantize(model, batches(), progress=False)
    return model, qm


def test_planted_outlier_ranks_first_in_both_modes(quantized):
    model, qm = quantized
    result = qm.analyze(batches(), progress=False)
    assert result.ranking[0] == OutlierMLP.OUTLIER_OP
    assert result.cumulative_ranking[0] == OutlierMLP.OUTLIER_OP
    rows = {r.name: r for r in result.ops}
    others = [r.alone_sqnr_db for n, r in rows.items() if n != OutlierMLP.OUTLIER_OP]
    assert rows[OutlierMLP.OUTLIER_OP].alone_sqnr_db < min(others) - 10  # a clear margin, not a tie
    assert result.reproduction_db == 100.0  # the switchable graph with all quantizers on is the int8 model


def test_without_the_outlier_the_layer_is_not_singled_out():
    model = OutlierMLP(outlier=1.0).eval()
    qm = eightbit.quantize(model, batches(), progress=False)
    rows = {r.name: r.alone_sqnr_db for r in qm.analyze(batches(), progress=False).ops}
    assert rows[OutlierMLP.OUTLIER_OP] > 35  # the planted value, not the layer's position, made it rank first


def test_tensor_rows_report_ranges_clipping_and_codes(quantized):
    model, qm = quantized
    result = analyze(qm, batches(), model, batches=2, progress=False)
    fc3_input = next(t for t in result.tensors if t.group in {r.name: r for r in result.ops}["linear_2"].groups)
    assert fc3_input.chosen[1] == pytest.approx(fc3_input.observed[1], rel=0.02)  # minmax on calibration data
    assert fc3_input.codes_used < 40  # one channel at ~40 leaves the rest of the tensor a few codes
    assert fc3_input.clipped == 0.0
    assert result.samples == 64


def test_clipping_is_counted_on_data_beyond_the_calibrated_range(quantized):
    model, qm = quantized
    wide = [3 * b for b in batches()]  # inputs three times larger than the calibration data
    result = analyze(qm, wide, model, progress=False)
    first = next(t for t in result.tensors if t.tensor == "x")
    assert 0.05 < first.clipped < 0.9
    assert first.observed[1] > first.chosen[1]


def test_alone_mode_turns_on_only_the_ops_quantizers(quantized):
    model, qm = quantized
    ref = Reference(qm, model)
    x = batches(1)[0]
    ref.set_int8(set())
    with torch.no_grad():
        torch.testing.assert_close(ref.run((x,)), model(x), rtol=0, atol=1e-5)
    ref.set_int8({"linear"})
    assert [s.on for s in ref.switches.values()] == [True, False, False, False]


def test_save_writes_report_table_json_and_valid_pngs(quantized, tmp_path):
    model, qm = quantized
    result = qm.analyze(batches(), progress=False, name="outlier MLP")
    folder = result.save(tmp_path / "report", worst=2)
    names = sorted(p.name for p in folder.iterdir())
    assert {"report.md", "table.txt", "analysis.json", "sqnr_alone.png", "sqnr_int8.png"} <= set(names)
    pngs = [p for p in folder.iterdir() if p.suffix == ".png"]
    assert len(pngs) == 4  # two bar charts, two histograms
    for png in pngs:
        check_png(png)
    report = (folder / "report.md").read_text()
    assert "outlier MLP" in report and "](sqnr_alone.png)" in report
    assert json.loads((folder / "analysis.json").read_text())["ranking"][0] == OutlierMLP.OUTLIER_OP
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left
    with pytest.raises(FileExistsError):
        result.save(folder)
    result.save(folder, overwrite=True)


def test_table_and_markdown_list_every_op(quantized):
    model, qm = quantized
    result = qm.analyze(batches(), progress=False)
    for text in (result.table(), result.markdown()):
        assert all(name in text for name in ("linear", "linear_1", "linear_2", "linear_3"))


def test_analysis_needs_the_float_model_and_refuses_another():
    model = OutlierMLP(outlier=1.0).eval()
    qm = eightbit.quantize(model, batches(), progress=False)
    other = OutlierMLP().eval()
    with torch.no_grad():
        other.fc1.weight.add_(1.0)
    with pytest.raises(ValueError, match="not the float model"):
        qm.analyze(batches(), other, progress=False)
    del model
    import gc

    gc.collect()
    with pytest.raises(ValueError, match="pass the float model"):
        qm.analyze(batches(), progress=False)


def test_conv_model_reproduces_exactly_and_ranks_every_op():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    qm = eightbit.quantize(model, data, progress=False)
    result = qm.analyze(data, progress=False)
    assert result.reproduction_db == 100.0
    assert sorted(result.ranking) == sorted(qm.placement.quantized_ops)
