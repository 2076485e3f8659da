"""The command line: quantize from a folder of samples, bench, compare, and clear errors."""

import numpy as np
import onnx
import pytest
import torch

from eightbit.cli import main

SHAPE = ["--input-shape", "1,3,16,16"]


def _quantize(model: str, calib, out, *extra: str) -> list[str]:
    return ["quantize", model, "--calib", str(calib), "--out", str(out), "--quiet", *extra]


@pytest.fixture()
def npy_folder(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.save(folder / f"{i}.npy", rng.standard_normal((3, 16, 16)).astype(np.float32))
    return folder


def test_quantize_from_npy_folder_then_bench(npy_folder, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    args = _quantize("tests.helpers:ResidualNet", npy_folder, out, *SHAPE, "--encodings", str(tmp_path / "enc.json"))
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "steps" in printed
    assert onnx.load(out).graph.node and (tmp_path / "enc.json").exists()
    assert main(["bench", str(out), "--batch", "4", "--iters", "3", "--backends", "onnxruntime"]) == 0
    table = capsys.readouterr().out
    assert "fp32" in table and "int8" in table


def test_quantize_from_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "img.onnx"
    args = _quantize("tests.helpers:DepthwiseNet", folder, out, "--image-size", "16", "--normalize", "tflite")
    assert main(args) == 0 and out.exists()


def test_saved_export_program_is_accepted(npy_folder, tmp_path):
    from tests.helpers import DepthwiseNet

    program = torch.export.export(DepthwiseNet().eval(), (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "m.pt2")
    assert main(_quantize(str(tmp_path / "m.pt2"), npy_folder, tmp_path / "p.onnx", *SHAPE)) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (_quantize("tests.helpers:ResidualNet", "/nonexistent", "x.onnx"), "does not exist"),
        (_quantize("no_colon", "CALIB", "y.onnx"), "package.module:factory"),
        (_quantize("tests.helpers:Nope", "CALIB", "z.onnx"), "no attribute"),
        (_quantize("missing.pt2", "CALIB", "w.onnx"), "does not exist"),
        (["bench", "missing.onnx"], "does not exist"),
    ],
)
def test_clear_errors(args, message, npy_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(npy_folder) if a == "CALIB" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_existing_output_needs_force(npy_folder, tmp_path, capsys):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"precious")
    args = _quantize("tests.helpers:ResidualNet", npy_folder, out, *SHAPE)
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0 and onnx.load(out).graph.node


def test_corrupt_calibration_file(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "0.npy").write_bytes(b"not an array")
    assert main(_quantize("tests.helpers:ResidualNet", folder, tmp_path / "o.onnx")) == 2
    assert "cannot read calibration file" in capsys.readouterr().err


def test_compare_and_method_options(npy_folder, tmp_path, capsys):
    compare = [
        "compare",
        "tests.helpers:DepthwiseNet",
        "--calib",
        str(npy_folder),
        "--eval",
        str(npy_folder),
        *SHAPE,
        "--methods",
        "minmax",
        "kl",
        "--weight-methods",
        "minmax",
        "admm",
        "--quiet",
    ]
    assert main(compare) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 5 and "| kl | admm |" in table  # header + 4 method pairs
    pow2 = _quantize(
        "tests.helpers:DepthwiseNet",
        npy_folder,
        tmp_path / "pow2.onnx",
        *SHAPE,
        "--method",
        "mse",
        "--weight-method",
        "mse",
        "--pow2",
    )
    assert main(pow2) == 0
    assert main(_quantize("tests.helpers:DepthwiseNet", npy_folder, tmp_path / "x.onnx", "--method", "admm")) == 2
    assert "for weights only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--batch-size", "0"), ("--max-samples", "-1"), ("--max-samples", "0"), ("--input-shape", "1,3,x,16")],
)
def test_bad_numbers_are_argparse_errors(flag, value, npy_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(_quantize("tests.helpers:ResidualNet", npy_folder, tmp_path / "o.onnx", flag, value))
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


def test_input_shape_that_does_not_match_the_files(npy_folder, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(_quantize("tests.helpers:ResidualNet", npy_folder, out, "--input-shape", "1,3,32,32")) == 2
    err = capsys.readouterr().err
    assert "--input-shape" in err and "0.npy" in err and "(3, 16, 16)" in err
    assert not out.exists()


def test_input_shape_that_does_not_match_the_model(tmp_path, capsys):
    folder = tmp_path / "four_channels"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"{i}.npy", np.zeros((4, 16, 16), np.float32))
    out = tmp_path / "o.onnx"
    assert main(_quantize("tests.helpers:ResidualNet", folder, out, "--input-shape", "1,4,16,16")) == 2
    err = capsys.readouterr().err
    assert "does not accept" in err and "(1, 4, 16, 16)" in err
    assert not out.exists()


def test_calibration_files_of_mixed_shapes_are_named(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((3, 16, 16), np.float32))
    np.save(folder / "b.npy", np.zeros((3, 8, 8), np.float32))
    assert main(_quantize("tests.helpers:ResidualNet", folder, tmp_path / "o.onnx", *SHAPE)) == 2
    err = capsys.readouterr().err
    assert "a.npy" in err and "(3, 16, 16)" in err and "b.npy" in err and "(3, 8, 8)" in err


@pytest.fixture()
def no_quantize(monkeypatch):
    """Fail the test if the slow work starts."""
    import eightbit

    def slow_work(*args, **kwargs):
        raise AssertionError("quantize ran before the output paths were checked")

    monkeypatch.setattr(eightbit, "quantize", slow_work)


def test_existing_encodings_need_force_before_the_slow_work(npy_folder, tmp_path, capsys, no_quantize):
    encodings = tmp_path / "enc.json"
    encodings.write_bytes(b"{}")
    out = tmp_path / "o.onnx"
    assert main(_quantize("tests.helpers:ResidualNet", npy_folder, out, *SHAPE, "--encodings", str(encodings))) == 2
    err = capsys.readouterr().err
    assert "enc.json" in err and "--force" in err
    assert encodings.read_bytes() == b"{}" and not out.exists()


def test_output_that_is_a_directory_is_refused_before_the_slow_work(npy_folder, tmp_path, capsys, no_quantize):
    out = tmp_path / "out.onnx"
    out.mkdir()
    assert main(_quantize("tests.helpers:ResidualNet", npy_folder, out, *SHAPE, "--force")) == 2
    assert "is a directory" in capsys.readouterr().err
    assert out.is_dir() and not any(out.iterdir())


@pytest.fixture()
def failing_parity(monkeypatch):
    """ONNX Runtime disagrees with the simulation by 500 steps."""
    import eightbit.export.onnx as export

    monkeypatch.setattr(export, "check_parity", lambda *a: export.ParityReport(9.0, 500.0, 0.9))


def test_parity_failure_exits_non_zero_and_keeps_the_users_files(npy_folder, tmp_path, capsys, failing_parity):
    out, encodings = tmp_path / "m.onnx", tmp_path / "enc.json"
    out.write_bytes(b"earlier model")
    encodings.write_bytes(b"earlier encodings")
    args = _quantize("tests.helpers:ResidualNet", npy_folder, out, *SHAPE, "--force", "--encodings", str(encodings))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "500.00 steps" in err and "--no-parity-check" in err
    assert out.read_bytes() == b"earlier model" and encodings.read_bytes() == b"earlier encodings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "enc.json", "m.onnx"]
    assert main([*args, "--no-parity-check"]) == 0  # the way out: written without the check
    assert onnx.load(out).graph.node and encodings.read_bytes() != b"earlier encodings"


def test_input_shape_that_does_not_match_a_saved_program(npy_folder, tmp_path, capsys, no_quantize):
    from tests.helpers import DepthwiseNet

    program = torch.export.export(DepthwiseNet().eval(), (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "m.pt2")
    args = _quantize(str(tmp_path / "m.pt2"), npy_folder, tmp_path / "p.onnx", "--input-shape", "1,3,32,32")
    assert main(args) == 2
    assert "does not match the shape the program was exported with, 2,3,16,16" in capsys.readouterr().err


def test_misspelled_keep_float_exits_with_the_closest_names(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        np.save(calib / f"{i}.npy", np.random.rand(1, 3, 16, 16).astype(np.float32))
    argv = ["quantize", "tests.helpers:DepthwiseNet", "--calib", str(calib), "--out", str(tmp_path / "m.onnx")]
    code = main([*argv, "--keep-float", "stme", "--input-shape", "1,3,16,16", "--quiet"])
    assert code == 2
    assert "did you mean" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_recovery_flags_and_compare_rows(npy_folder, tmp_path, capsys):
    net = "tests.helpers:DepthwiseNet"
    cle = _quantize(net, npy_folder, tmp_path / "cle.onnx", *SHAPE, "--per-tensor-weights", "--equalize", "--verbose")
    assert main(cle) == 0
    assert "cross-layer equalization: 2 pairs" in capsys.readouterr().out
    ada = ["--weight-bits", "4", "--adaround", "--adaround-iterations", "5", "--adaround-samples", "4", "--verbose"]
    assert main(_quantize(net, npy_folder, tmp_path / "ada.onnx", *SHAPE, *ada)) == 0
    assert "AdaRound: 4 layers" in capsys.readouterr().out
    compare = ["compare", net, "--calib", str(npy_folder), "--eval", str(npy_folder), *SHAPE, "--quiet"]
    steps = ["--methods", "minmax", "--adaround-iterations", "5", "--recovery", "none", "cle", "adaround"]
    assert main([*compare, *steps]) == 0
    table = capsys.readouterr().out
    assert "| recovery |" in table and "| cle | minmax | minmax |" in table and "| adaround | minmax |" in table


DIGIT_CNN = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
"""


def test_per_sample_chw_files_are_stacked_and_a_model_in_the_current_folder_is_found(tmp_path, capsys, monkeypatch):
    """A digit CNN in ./digits.py and a folder of per-sample (1, 28, 28) files, no --input-shape: the files used
    to be concatenated into one (16, 28, 28) 'batch', and the console script did not look in the current folder."""
    (tmp_path / "digits.py").write_text(DIGIT_CNN)
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        np.save(folder / f"{i}.npy", rng.standard_normal((1, 28, 28)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(__import__("sys").modules, "digits", raising=False)
    out = tmp_path / "digits.onnx"
    assert main(_quantize("digits:build", folder, out)) == 0, capsys.readouterr().err
    assert "one sample" in capsys.readouterr().err
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_files_the_model_takes_neither_as_batches_nor_as_samples_blame_the_input_form(tmp_path, capsys):
    folder = tmp_path / "wrong"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"{i}.npy", np.zeros((5, 16, 16), np.float32))
    assert main(_quantize("tests.helpers:ResidualNet", folder, tmp_path / "o.onnx")) == 2
    err = capsys.readouterr().err
    assert "(5, 16, 16)" in err and "--input-shape" in err and "input form" in err
    assert "traceable" not in err


def test_a_module_that_is_not_found_says_where_it_was_looked_for(tmp_path, capsys, monkeypatch, npy_folder):
    monkeypatch.chdir(tmp_path)
    assert main(_quantize("no_such_module:build", npy_folder, tmp_path / "o.onnx")) == 2
    err = capsys.readouterr().err
    assert "no_such_module" in err and "current folder" in err
