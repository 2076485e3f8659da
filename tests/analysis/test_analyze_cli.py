"""`eightbit analyze`: the report folder, and the fallback with --max-drop."""

import json

import numpy as np
import pytest

from eightbit.analysis.figures import check_png
from eightbit.cli import main


@pytest.fixture()
def npy_folder(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(folder / f"{i}.npy", rng.standard_normal((3, 16, 16)).astype(np.float32))
    return folder


def test_analyze_writes_the_report_then_refuses_to_overwrite(npy_folder, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["analyze", "tests.helpers:ResidualNet", "--calib", str(npy_folder), "--input-shape", "1,3,16,16"]
    argv += ["--out", str(out), "--batch-size", "4", "--batches", "2", "--worst", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ResidualNet: full int8 model output SQNR" in printed and "alone SQNR dB" in printed
    ranking = json.loads((out / "analysis.json").read_text())["ranking"]
    assert ranking and ranking[0] in printed
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        check_png(png)
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    fallback = [*argv, "--force", "--eval", str(npy_folder), "--max-drop", "0.0"]
    assert main(fallback) == 0
    info = json.loads((out / "fallback" / "best" / "keep_float.json").read_text())
    assert info["meets"] and info["metric"] == 1.0  # agreement with float on the eval inputs, nothing dropped
    assert (out / "fallback" / "best" / "model.onnx").stat().st_size > 0
    assert main([*argv, "--force", "--max-drop", "0.1"]) == 2
    assert "go together" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::eightbit.MostlyFloatWarning")  # one of two convs float, as asked
def test_quantize_keeps_the_ops_the_fallback_names(npy_folder, tmp_path, capsys):
    argv = ["quantize", "tests.helpers:ResidualNet", "--calib", str(npy_folder), "--input-shape", "1,3,16,16"]
    argv += ["--out", str(tmp_path / "m.onnx"), "--quiet", "--verbose"]
    assert main([*argv, "--keep-float-node", "conv2d_1"]) == 0
    assert any("conv2d_1" in line and "keep_float_nodes" in line for line in capsys.readouterr().out.splitlines())
    assert main([*argv, "--force", "--keep-float-node", "conv2d_99"]) == 2
    assert "keep_float_nodes name 'conv2d_99'" in capsys.readouterr().err
