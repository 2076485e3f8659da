"""The command line: quantize from a folder of samples, bench, and clear errors."""

import numpy as np
import onnx
import pytest
import torch

from eightbit.cli import main


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
    rc = main(
        [
            "quantize",
            "tests.helpers:ResidualNet",
            "--calib",
            str(npy_folder),
            "--out",
            str(out),
            "--input-shape",
            "1,3,16,16",
            "--quiet",
            "--encodings",
            str(tmp_path / "enc.json"),
        ]
    )
    assert rc == 0
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
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    out = tmp_path / "img.onnx"
    args = [
        "quantize",
        "tests.helpers:DepthwiseNet",
        "--calib",
        str(folder),
        "--out",
        str(out),
        "--image-size",
        "16",
        "--normalize",
        "tflite",
        "--quiet",
    ]
    assert main(args) == 0 and out.exists()


def test_saved_export_program_is_accepted(npy_folder, tmp_path):
    from tests.helpers import DepthwiseNet

    program = torch.export.export(DepthwiseNet().eval(), (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "p.onnx"
    assert (
        main(
            [
                "quantize",
                str(tmp_path / "m.pt2"),
                "--calib",
                str(npy_folder),
                "--out",
                str(out),
                "--input-shape",
                "1,3,16,16",
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "tests.helpers:ResidualNet", "--calib", "/nonexistent", "--out", "x.onnx"], "does not exist"),
        (["quantize", "no_colon", "--calib", "CALIB", "--out", "y.onnx"], "package.module:factory"),
        (["quantize", "tests.helpers:Nope", "--calib", "CALIB", "--out", "z.onnx"], "no attribute"),
        (["quantize", "missing.pt2", "--calib", "CALIB", "--out", "w.onnx"], "does not exist"),
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
    args = [
        "quantize",
        "tests.helpers:ResidualNet",
        "--calib",
        str(npy_folder),
        "--out",
        str(out),
        "--input-shape",
        "1,3,16,16",
        "--quiet",
    ]
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0 and onnx.load(out).graph.node


def test_corrupt_calibration_file(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "0.npy").write_bytes(b"not an array")
    assert (
        main(
            [
                "quantize",
                "tests.helpers:ResidualNet",
                "--calib",
                str(folder),
                "--out",
                str(tmp_path / "o.onnx"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "cannot read calibration file" in capsys.readouterr().err


def test_compare_and_method_options(npy_folder, tmp_path, capsys):
    rc = main(
        [
            "compare",
            "tests.helpers:DepthwiseNet",
            "--calib",
            str(npy_folder),
            "--eval",
            str(npy_folder),
            "--input-shape",
            "1,3,16,16",
            "--methods",
            "minmax",
            "kl",
            "--weight-methods",
            "minmax",
            "admm",
            "--quiet",
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 5 and "| kl | admm |" in table  # header + 4 method pairs
    out = tmp_path / "pow2.onnx"
    assert (
        main(
            [
                "quantize",
                "tests.helpers:DepthwiseNet",
                "--calib",
                str(npy_folder),
                "--out",
                str(out),
                "--input-shape",
                "1,3,16,16",
                "--method",
                "mse",
                "--weight-method",
                "mse",
                "--pow2",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "quantize",
                "tests.helpers:DepthwiseNet",
                "--calib",
                str(npy_folder),
                "--out",
                str(tmp_path / "other.onnx"),
                "--method",
                "admm",
                "--quiet",
            ]
        )
        == 2
    )
    assert "for weights only" in capsys.readouterr().err
