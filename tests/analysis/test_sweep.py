"""Batch-sweep report: table, time split, CPU flags, and PNGs that are real images."""

import json
import re

import pytest

import eightbit
from eightbit.analysis.figures import check_png
from eightbit.analysis.sweep import SPLIT_KEYS, run_sweep, shares
from eightbit.cli import main
from eightbit.runtime.backends import Backend
from eightbit.runtime.profile import OVERHEAD
from eightbit.runtime.sweep import parse_batches
from tests.helpers import ResidualNet, calibration_batches


def _few(batch):
    return 1, 4, 3


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "residual.onnx"
    eightbit.quantize(ResidualNet().eval(), calibration_batches(), progress=False).export_onnx(path, check=False)
    return path


@pytest.fixture(scope="module")
def swept(residual_onnx, tmp_path_factory, monkeypatch_module):
    import eightbit.runtime.sweep as sweep_module

    monkeypatch_module.setattr(sweep_module, "default_iters", _few)
    out = tmp_path_factory.mktemp("report")
    report, points = run_sweep(residual_onnx, [1, 2], list(Backend), out, model_name="ResidualNet")
    return report, points


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_backend_and_batch_is_measured_and_split(swept):
    _, points = swept
    assert [(p.backend, p.batch) for p in points] == [(b, n) for b in Backend for n in (1, 2)]
    for p in points:
        assert p.speedup > 0 and p.int8.batch == p.batch
        for profile in (p.int8_profile, p.fp32_profile):
            split = profile.split()
            # the parts (int8/float compute, quantize, dequantize, layout, overhead) add up to the run's wall time
            assert sum(split.values()) == pytest.approx(profile.wall_ms, rel=1e-6)
            assert profile.kernel_ms <= profile.wall_ms * 1.5  # measured kernels fit in the measured wall time
            assert sum(shares(split).values()) == pytest.approx(1.0)
        assert p.int8_profile.split()["int8 compute"] > 0 and p.fp32_profile.split()["int8 compute"] == 0
        assert p.fp32_profile.split()["quantize"] == 0


def test_report_embeds_valid_pngs_and_records_the_cpu(swept):
    report, _ = swept
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 3  # speedup + one split per runtime
    for image in images:
        width, height = check_png(report.parent / image)
        assert width > 400 and height > 300
    assert "int8-relevant flags" in text and "VNNI" in text
    assert "| onnxruntime | 2 |" in text and "| openvino | 1 |" in text
    assert all(key in text for key in SPLIT_KEYS) and OVERHEAD in SPLIT_KEYS
    assert not list(report.parent.glob("*.tmp*"))
    data = json.loads(report.with_suffix(".json").read_text())
    assert len(data["points"]) == 4 and data["points"][0]["int8_profile"]["kernels"]


def test_cli_sweep_writes_the_report(residual_onnx, tmp_path, capsys, monkeypatch):
    import eightbit.runtime.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "default_iters", _few)
    args = ["bench", str(residual_onnx), "--sweep", "2,1", "--report", str(tmp_path / "r"), "--backends", "onnxruntime"]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "wrote" in printed
    (report,) = (tmp_path / "r").glob("*.md")
    assert "residual: int8 vs fp32 batch sweep" in report.read_text()
    for png in (tmp_path / "r").glob("*.png"):
        check_png(png)


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "1,-2"])
def test_bad_sweep_lists_are_refused(text):
    with pytest.raises(ValueError, match="positive batch sizes"):
        parse_batches(text)


def test_sweep_list_is_sorted_and_deduplicated():
    assert parse_batches("8, 1,8,2") == [1, 2, 8]
