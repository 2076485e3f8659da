"""Command line: `eightbit quantize` and `eightbit bench`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
from pathlib import Path

import torch

from eightbit.config import AdaRound
from eightbit.data import Normalization
from eightbit.export.onnx import ParityError
from eightbit.graph.capture import CaptureError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def shape(text: str) -> tuple[int, ...]:
    """argparse type: a shape such as 1,3,224,224 (positive integers)."""
    try:
        return tuple(positive_int(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}") from None


def _load_model(spec: str) -> tuple[torch.nn.Module, tuple[int, ...] | None]:
    """A model from `package.module:factory` or a saved torch.export program (.pt2), and the input shape
    the program was exported with (None for factories)."""
    if spec.endswith(".pt2"):
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable torch.export program: {exc}") from exc
        user_inputs = set(program.graph_signature.user_inputs)
        shapes = [
            tuple(int(d) for d in n.meta["val"].shape)
            for n in program.graph.nodes
            if n.op == "placeholder" and n.name in user_inputs and hasattr(n.meta.get("val"), "shape")
        ]
        return program.module(), (shapes[0] if len(shapes) == 1 else None)
    if ":" not in spec:
        raise ValueError(f"model must be 'package.module:factory' or a .pt2 file, got {spec!r}")
    module_name, factory = spec.split(":", 1)
    module = importlib.import_module(module_name)
    if not hasattr(module, factory):
        raise ValueError(f"{module_name} has no attribute {factory!r}")
    model = getattr(module, factory)()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model.eval(), None


def _config(args):
    from eightbit import Granularity, QuantConfig, int8_weights, uint8_activations

    granularity = Granularity.PER_TENSOR if args.per_tensor_weights else Granularity.PER_CHANNEL
    weights = int8_weights(
        bits=args.weight_bits, granularity=granularity, method=args.weight_method, power_of_two=args.pow2
    )
    activations = uint8_activations(method=args.method, percentile=args.percentile, power_of_two=args.pow2)
    return QuantConfig(weights=weights, activations=activations, keep_float=tuple(args.keep_float), **_recovery(args))


def _recovery(args) -> dict:
    """QuantConfig's equalize/adaround from the recovery flags."""
    from eightbit import AdaRound, Equalize, Relu6Handling

    found = {}
    if args.equalize:
        found["equalize"] = Equalize(relu6=Relu6Handling(args.equalize_relu6))
    if args.adaround:
        found["adaround"] = AdaRound(iterations=args.adaround_iterations, samples=args.adaround_samples)
    return found


def _batches(args, folder, program_shape):
    """A re-iterable stream of input batches from a folder, as the data arguments describe."""
    from eightbit.data import ImagePreprocess, calibration_files, folder_batches

    calibration_files(folder)
    if args.input_shape and program_shape and args.input_shape[1:] != program_shape[1:]:
        raise ValueError(
            f"--input-shape {_shape_text(args.input_shape)} does not match the shape the program was exported "
            f"with, {_shape_text(program_shape)}"
        )
    preprocess = ImagePreprocess(
        size=args.image_size,
        resize=args.resize or round(args.image_size * 256 / 224),
        normalization=Normalization(args.normalize),
    )
    shape = args.input_shape or program_shape
    make = functools.partial(
        folder_batches,
        folder,
        batch_size=args.batch_size,
        preprocess=preprocess,
        sample_shape=shape,
        limit=args.max_samples,
    )
    return _Reiterable(make)


def _shape_text(shape) -> str:
    return ",".join(str(d) for d in shape)


def _check_model_accepts(model: torch.nn.Module, batches, program_shape, folder) -> None:
    """Read the first batch (shape errors in the files surface here) and run the model on one sample of it, so
    that inputs the model cannot take are named before the slow work.  Saved programs are checked against the
    shape they were exported with instead: they may accept no other batch size."""
    first = next(iter(batches))
    if program_shape:
        return
    try:
        with torch.no_grad():
            model(first[:1])
    except Exception as exc:
        raise ValueError(
            f"the model does not accept inputs of shape {tuple(first[:1].shape)} (from the files in {folder} and "
            f"--input-shape / --image-size): {type(exc).__name__}: {exc}"
        ) from exc


def _cmd_quantize(args) -> int:
    from eightbit import quantize
    from eightbit.fileio import check_output_path

    check_output_path(args.out, args.force)  # fail before the slow work
    if args.encodings:
        if Path(args.encodings).resolve() == Path(args.out).resolve():
            raise ValueError("--encodings and --out name the same file; give the encodings their own .json path")
        check_output_path(args.encodings, args.force)
    config = _config(args)
    if args.tflite:  # TFLite's kernel constraints are applied at placement: int8 classifier, shared parameters
        from eightbit import Target

        check_output_path(args.tflite, args.force)
        config = dataclasses.replace(config, target=Target.TFLITE)
    model, program_shape = _load_model(args.model)
    batches = _batches(args, args.calib, program_shape)
    _check_model_accepts(model, batches, program_shape, args.calib)
    # A saved program is captured at the shape it was exported with (it may accept no other batch size).
    example = torch.zeros(program_shape) if program_shape else None
    qm = quantize(model, batches, example, config=config, progress=not args.quiet)
    report = qm.export_onnx(args.out, overwrite=args.force, check=not args.no_parity_check)
    print(qm.summary() if args.verbose else qm.summary().split("\n\n")[0])
    print(f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB)")
    if report.parity is not None:
        print(report.parity)
    if args.tflite:
        tflite = qm.export_tflite(args.tflite, overwrite=args.force)
        print(f"wrote {tflite.path} ({tflite.size_bytes / 1e6:.2f} MB, TFLM arena {tflite.arena_bytes} bytes)")
        print("; ".join(str(p) for p in tflite.parity))
    if args.encodings:
        qm.save_encodings(args.encodings, overwrite=args.force)
        print(f"wrote {args.encodings}")
    return 0


def _cmd_compare(args) -> int:
    from eightbit.analysis.compare import compare_methods, format_results

    config = _config(args)
    model, program_shape = _load_model(args.model)
    evaluation = torch.cat(list(_batches(args, args.eval, program_shape)))
    example = torch.zeros(program_shape) if program_shape else None
    calibration = _batches(args, args.calib, program_shape)
    _check_model_accepts(model, calibration, program_shape, args.calib)
    if example is not None:
        from eightbit.api import calibrate

        calibrate(model, calibration, example, config=config, progress=False)  # fails early on a bad program
    common = dict(methods=args.methods, weight_methods=args.weight_methods, config=config, progress=not args.quiet)
    if args.recovery:
        from dataclasses import replace

        from eightbit import AdaRound, Equalize, Relu6Handling
        from eightbit.analysis.compare import compare_recovery

        common["config"] = replace(
            config,
            equalize=Equalize(relu6=Relu6Handling(args.equalize_relu6)),
            adaround=AdaRound(iterations=args.adaround_iterations, samples=args.adaround_samples),
        )
        passes, results = compare_recovery(model, calibration, evaluation, steps=args.recovery, **common)
        print(format_results(results, ", ".join(f"{k} {v:.1f} s" for k, v in passes.items())))
        return 0
    seconds, results = compare_methods(model, calibration, evaluation, **common)
    print(format_results(results, seconds))
    return 0


class _Reiterable:
    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return iter(self._make())


def _cmd_bench(args) -> int:
    from eightbit.runtime.cli import bench_cli

    return bench_cli(args)


def _model_and_data_args(p: argparse.ArgumentParser) -> None:
    from eightbit.calibration.methods import METHODS

    p.add_argument("model", help="package.module:factory (a callable returning an nn.Module) or a .pt2 program")
    p.add_argument("--calib", required=True, help="folder of calibration images, .npy or .pt files")
    act_methods = sorted(n for n, m in METHODS.items() if m.activation_range)
    weight_methods = sorted(n for n, m in METHODS.items() if m.weight_range)
    # Not argparse choices: QuantConfig's own error says which role a misplaced method is for.
    p.add_argument("--method", default="minmax", help=f"activation calibration method {act_methods}")
    p.add_argument("--weight-method", default="minmax", help=f"weight calibration method {weight_methods}")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--pow2", action="store_true", help="power-of-two scales (shift-only NPUs)")
    p.add_argument("--per-tensor-weights", action="store_true")
    p.add_argument("--weight-bits", type=int, default=8, help="weight bit width (2-8; e.g. 4 with --adaround)")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization + bias absorption (per-tensor)")
    p.add_argument("--equalize-relu6", choices=["bounded", "to_relu", "skip"], default="bounded")
    p.add_argument("--adaround", action="store_true", help="learn the weights' rounding (AdaRound; low-bit weights)")
    defaults = AdaRound()  # one source for the defaults: the config's
    p.add_argument("--adaround-iterations", type=int, default=defaults.iterations, help="AdaRound steps per layer")
    p.add_argument(
        "--adaround-samples", type=int, default=defaults.samples, help="calibration samples AdaRound learns from"
    )
    p.add_argument("--keep-float", action="append", default=[], metavar="MODULE", help="submodule to keep float")
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument(
        "--resize", type=positive_int, default=None, help="shorter side before centre crop (default size*256/224)"
    )
    p.add_argument("--normalize", choices=[n.value for n in Normalization], default="imagenet")
    p.add_argument("--input-shape", type=shape, help="shape of one batch for .npy/.pt samples, e.g. 1,3,224,224")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-samples", type=positive_int, default=None)
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eightbit", description="Turn PyTorch models into fast int8 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a PyTorch model to an int8 ONNX (QDQ) model")
    _model_and_data_args(q)
    q.add_argument("--out", required=True, help="output .onnx path")
    q.add_argument("--force", action="store_true", help="overwrite existing output files")
    q.add_argument("--encodings", help="also save the quantization parameters (JSON) here")
    q.add_argument("--tflite", help="also write a fully int8 .tflite here (LiteRT, TFLite Micro; needs [tflite])")
    q.add_argument("--verbose", action="store_true", help="print the per-op table")
    q.add_argument(
        "--no-parity-check",
        action="store_true",
        help="write the ONNX file without running it on ONNX Runtime (by default a file that disagrees with the "
        "simulated int8 model is not written)",
    )
    q.set_defaults(func=_cmd_quantize)
    c = sub.add_parser("compare", help="quantize with each calibration method and compare accuracy against fp32")
    _model_and_data_args(c)
    c.add_argument("--eval", required=True, help="folder of evaluation inputs (same formats as --calib)")
    c.add_argument(
        "--methods",
        nargs="+",
        default=["minmax", "ema", "percentile", "mse", "kl"],
        help="activation methods to compare (eq and cross_entropy search on sample inputs: slower)",
    )
    c.add_argument("--weight-methods", nargs="+", default=["minmax"], help="weight methods (eq: EasyQuant scales)")
    c.add_argument(
        "--recovery",
        nargs="+",
        default=None,
        metavar="STEP",
        help="also compare accuracy-recovery steps: none, cle, adaround, cle+adaround (one calibration pass each)",
    )
    c.set_defaults(func=_cmd_compare)
    b = sub.add_parser("bench", help="fp32 vs int8 latency and throughput of an int8 ONNX model")
    b.add_argument("model", help="int8 QDQ .onnx file (its fp32 counterpart is derived by removing Q/DQ)")
    b.add_argument("--fp32", help="the fp32 .onnx to compare against (default: derived from the int8 model)")
    b.add_argument("--batch", type=positive_int, default=32, help="throughput batch size")
    b.add_argument("--threads", type=positive_int, default=2)
    b.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    b.add_argument("--iters", type=positive_int, default=30)
    b.add_argument("--breakdown", action="store_true", help="show where ONNX Runtime spends time, per op category")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ParityError as exc:  # not a usage error: the export itself is wrong
        print(f"eightbit: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, ImportError, CaptureError) as exc:
        print(f"eightbit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
