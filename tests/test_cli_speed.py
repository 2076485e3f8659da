"""`eightbit quantize` refuses an int8 model that is slower than fp32 at the deployment batch size."""

import numpy as np
import onnx
import pytest

from eightbit.cli import main
from eightbit.runtime.speedcheck import SKIP_ENV


@pytest.fixture()
def vector_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)  # the suite skips the check; these tests are about it
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(folder / f"{i}.npy", rng.standard_normal(8).astype(np.float32))
    return folder


def _args(folder, out, *extra):
    model = "tests.helpers:LinearGeluChain"
    return ["quantize", model, "--calib", str(folder), "--out", str(out), "--input-shape", "1,8", "--quiet", *extra]


def test_slower_int8_model_is_refused_and_not_written(vector_folder, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(_args(vector_folder, out)) == 2
    err = capsys.readouterr().err
    assert f"not writing {out}" in err and "x the time of fp32" in err and "batch 1" in err
    assert "Ops slower in int8: linear" in err and "fcs." in err  # which ops, by how much
    assert "--allow-slower" in err and "--keep-float" in err and "--deploy-batch" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


def test_allow_slower_writes_it_with_a_warning(vector_folder, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(_args(vector_folder, out, "--allow-slower")) == 0
    printed = capsys.readouterr().out
    assert "WARNING: int8 is slower than fp32" in printed and "slower in int8: linear" in printed
    assert f"wrote {out}" in printed and onnx.load(out).graph.node


def test_the_check_can_be_skipped(vector_folder, tmp_path, capsys, monkeypatch):
    assert main(_args(vector_folder, tmp_path / "a.onnx", "--no-speed-check")) == 0
    monkeypatch.setenv(SKIP_ENV, "1")
    assert main(_args(vector_folder, tmp_path / "b.onnx")) == 0
    printed = capsys.readouterr().out
    assert "speed on" not in printed and (tmp_path / "a.onnx").exists() and (tmp_path / "b.onnx").exists()


def test_a_faster_int8_model_is_written_with_its_speedup(tmp_path, capsys, monkeypatch):
    import eightbit.runtime.speedcheck as speedcheck
    from eightbit.runtime.backends import Backend
    from eightbit.runtime.benchmark import Timing

    monkeypatch.delenv(SKIP_ENV, raising=False)
    fast = speedcheck.SpeedCheck(
        int8=Timing(median_ms=1.0, p10_ms=1.0, p90_ms=1.0, iters=20, batch=1),
        fp32=Timing(median_ms=2.0, p10_ms=2.0, p90_ms=2.0, iters=20, batch=1),
        backend=Backend.ORT,
    )
    monkeypatch.setattr(speedcheck, "compare_with_float", lambda *a, **k: fast)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "0.npy", np.ones(8, np.float32))
    assert main(_args(folder, tmp_path / "m.onnx")) == 0
    assert "int8 is 2.00x faster" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::eightbit.MostlyFloatWarning")  # keeping the slow linears float is the point
def test_keep_slow_float_requantizes_with_the_slow_modules_float(vector_folder, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(_args(vector_folder, out, "--keep-slow-float", "--allow-slower", "--verbose")) == 0
    printed = capsys.readouterr().out
    assert "kept float because their int8 version was slower" in printed
    assert "kept float by config" in printed and out.exists()
