"""Command line: `eightbit quantize`, `compare`, `analyze`, `bench` and `report`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import shutil
import sys
import tempfile
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
    module = _import_from_cwd(module_name)
    if not hasattr(module, factory):
        raise ValueError(f"{module_name} has no attribute {factory!r}")
    model = getattr(module, factory)()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model.eval(), None


def _import_from_cwd(module_name: str):
    """Import `module_name` as `python -m` would: the current folder first (the console script does not put it on
    sys.path, so `eightbit quantize mymodel:build` missed ./mymodel.py)."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            raise ModuleNotFoundError(
                f"no module {module_name!r} in the current folder ({cwd}) or on the Python path; run eightbit "
                "from the folder that holds it, or install its package",
                name=exc.name,
            ) from None
        raise
    finally:
        if added:
            sys.path.remove(cwd)


def _config(args):
    from eightbit import Granularity, QuantConfig, int8_weights, uint8_activations

    granularity = Granularity.PER_TENSOR if args.per_tensor_weights else Granularity.PER_CHANNEL
    weights = int8_weights(
        bits=args.weight_bits, granularity=granularity, method=args.weight_method, power_of_two=args.pow2
    )
    activations = uint8_activations(method=args.method, percentile=args.percentile, power_of_two=args.pow2)
    return QuantConfig(
        weights=weights,
        activations=activations,
        keep_float=tuple(args.keep_float),
        keep_float_nodes=tuple(args.keep_float_node),
        **_recovery(args),
    )


def _recovery(args) -> dict:
    """QuantConfig's equalize/adaround from the recovery flags."""
    from eightbit import AdaRound, Equalize, Relu6Handling

    found = {}
    if args.equalize:
        found["equalize"] = Equalize(relu6=Relu6Handling(args.equalize_relu6))
    if args.adaround:
        found["adaround"] = AdaRound(iterations=args.adaround_iterations, samples=args.adaround_samples)
    return found


def _batches(args, folder, program_shape, model: torch.nn.Module | None = None):
    """A re-iterable stream of input batches from a folder, as the data arguments describe (with `model` and no
    input shape, .npy/.pt files the model takes only as single samples are stacked: see `_per_sample_shape`)."""
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
    shape = args.input_shape or program_shape or (None if model is None else _per_sample_shape(model, folder, args))
    make = functools.partial(
        folder_batches,
        folder,
        batch_size=args.batch_size,
        preprocess=preprocess,
        sample_shape=shape,
        limit=args.max_samples,
    )
    return _Reiterable(make)


def _per_sample_shape(model: torch.nn.Module, folder, args) -> tuple[int, ...] | None:
    """Whether each .npy/.pt file holds a batch (files are concatenated: None) or one sample (files are stacked:
    the shape of one sample with a batch axis of 1), asked of the model: two copies of the first file are tried
    concatenated, then stacked.  Files the model takes neither way are an input-form error, said so."""
    from eightbit.data import IMAGE_SUFFIXES, calibration_files, load_sample

    path = calibration_files(folder)[0]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return None  # images are single samples already
    stored = load_sample(path)
    errors = []
    for form, pair in (("concatenated", torch.cat([stored, stored])), ("stacked", torch.stack([stored, stored]))):
        try:
            with torch.no_grad():
                model(pair)
        except Exception as exc:
            errors.append(f"{form} into {tuple(pair.shape)}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        if form == "concatenated":
            return None
        print(  # a choice made for the user: always said, --quiet or not
            f"eightbit: each file in {folder} holds one sample of shape {tuple(stored.shape)}; stacking them "
            "into batches (pass --input-shape to say otherwise)",
            file=sys.stderr,
        )
        return (1, *stored.shape)
    raise ValueError(
        f"the model takes the files in {folder} neither as batches nor as single samples ({path.name} holds "
        f"{tuple(stored.shape)}); this is a problem of the input form, not of the model: files "
        + "; files ".join(errors)
        + ". Pass --input-shape with the shape of one batch (e.g. 1,3,224,224), or save the files in that form"
    )


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:200]


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
    from eightbit.fileio import atomic_path, check_output_path

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
    batches = _batches(args, args.calib, program_shape, model)
    _check_model_accepts(model, batches, program_shape, args.calib)
    # A saved program is captured at the shape it was exported with (it may accept no other batch size).
    example = torch.zeros(program_shape) if program_shape else None
    if args.keep_slow_float:  # profile every quantized op on ORT; re-quantize with the slower ones' modules float
        from eightbit.analysis.speed import quantize_without_slow_ops

        qm, _ = quantize_without_slow_ops(
            model, batches, example, config=config, batch=args.deploy_batch, progress=not args.quiet
        )
    else:
        qm = quantize(model, batches, example, config=config, progress=not args.quiet)
    with tempfile.TemporaryDirectory() as tmp:
        try:  # written to a temporary file first: a model refused for its parity or speed leaves no file
            report = qm.export_onnx(Path(tmp) / "model.onnx", check=not args.no_parity_check)
        except ParityError as exc:
            raise ParityError(exc.report, args.out) from None
        check = _speed_check(args, qm, report.path)
        print(qm.summary() if args.verbose else qm.summary().split("\n\n")[0])
        if check is not None:
            print(check.line())
            if check.slower and args.allow_slower:
                print(f"WARNING: int8 is slower than fp32; written because of --allow-slower. {check.advice()}")
        with atomic_path(args.out, args.force) as out:
            shutil.copyfile(report.path, out)
    print(f"wrote {args.out} ({report.size_bytes / 1e6:.2f} MB)")
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


class SlowerThanFloatError(ValueError):
    """The int8 model is slower than its float twin at the user's batch size; nothing was written."""


def _speed_check(args, qm, path: Path):
    """Time the exported int8 model against its float twin on ONNX Runtime at --deploy-batch (None when skipped).
    When int8 is slower, profile every op so that `summary()` names the slow ones, and refuse unless
    --allow-slower."""
    from eightbit.runtime.speedcheck import SKIP_ENV, compare_with_float, speed_check_skipped

    if args.no_speed_check or speed_check_skipped():
        return None
    try:
        check = compare_with_float(path, args.deploy_batch)
    except ValueError as exc:  # inputs with symbolic sizes besides the batch: no shape to time the model at
        print(f"speed check skipped: {exc}")
        return None
    if check.slower:
        qm.measure_speed(batch=args.deploy_batch)  # which ops, by how much (printed by summary())
        if not args.allow_slower:
            slow = ", ".join(f"{o.op} ({o.module or 'top level'}, {o.ratio:.2f}x)" for o in qm.speed.slow_ops)
            slow = slow or "none alone (the Q/DQ and layout kernels between ops add up)"
            raise SlowerThanFloatError(
                f"not writing {args.out}: the int8 model is {check.ratio:.2f}x the time of fp32 "
                f"({check.int8.median_ms:.3f} vs {check.fp32.median_ms:.3f} ms per call on {check.backend.value}, "
                f"batch {args.deploy_batch}). Ops slower in int8: {slow}. {check.advice()} (or set {SKIP_ENV}=1 to "
                "skip this check)"
            )
    return check


def _cmd_compare(args) -> int:
    from eightbit.analysis.compare import compare_methods, format_results

    config = _config(args)
    model, program_shape = _load_model(args.model)
    evaluation = torch.cat(list(_batches(args, args.eval, program_shape, model)))
    example = torch.zeros(program_shape) if program_shape else None
    calibration = _batches(args, args.calib, program_shape, model)
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


def _cmd_analyze(args) -> int:
    from eightbit import quantize

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; choose another folder or pass --force")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first")
    if (args.max_drop is None) != (args.eval is None):
        raise ValueError("--max-drop and --eval go together: the fallback's metric is top-1 agreement on --eval")
    model, program_shape = _load_model(args.model)
    batches = _batches(args, args.calib, program_shape)
    _check_model_accepts(model, batches, program_shape, args.calib)
    example = torch.zeros(program_shape) if program_shape else None
    qm = quantize(model, batches, example, config=_config(args), progress=not args.quiet)
    name = args.name or args.model.rsplit(":", 1)[-1]
    result = qm.analyze(batches, model, batches=args.batches, progress=not args.quiet, name=name)
    result.save(out, worst=args.worst, overwrite=args.force)
    print(result.table())
    print(f"wrote {out}/ (report.md, table.txt, analysis.json, PNGs)")
    if args.max_drop is not None:
        _fallback(args, qm, model, result.ranking, out / "fallback", program_shape)
    return 0


def _fallback(args, qm, model, ranking, out: Path, program_shape) -> None:
    """Accuracy-driven fallback with top-1 agreement against the float model on the --eval inputs as metric."""
    evaluation = list(_batches(args, args.eval, program_shape))
    with torch.no_grad():
        reference = [model(b).argmax(-1) for b in evaluation]

    def agreement(candidate) -> float:
        with torch.no_grad():
            hits = sum(int((candidate(b).argmax(-1) == r).sum()) for b, r in zip(evaluation, reference, strict=True))
        return hits / sum(len(r) for r in reference)

    result = qm.fallback(
        agreement, max_drop=args.max_drop, out=out, model=model, ranking=ranking, time_budget=args.time_budget
    )
    print(result.summary())
    print(f"wrote {out}/ (log.jsonl; best/: model.onnx, encodings.json, keep_float.json)")


class _Reiterable:
    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return iter(self._make())


def _cmd_bench(args) -> int:
    from eightbit.runtime.cli import bench_cli, check_quantized, load_onnx

    if not args.sweep:
        return bench_cli(args)
    from eightbit.analysis.sweep import format_points, run_sweep
    from eightbit.runtime.backends import Backend
    from eightbit.runtime.sweep import parse_batches

    batches = parse_batches(args.sweep)
    model = Path(args.model)
    check_quantized(load_onnx(model, "int8"), model)
    out_dir = Path(args.report or f"{model.stem}_sweep")
    report, points = run_sweep(
        model,
        batches,
        [Backend(b) for b in args.backends],
        out_dir,
        fp32_path=args.fp32,
        threads=args.threads,
        progress=None if args.quiet else print,
    )
    print(format_points(points))
    print(f"wrote {report} (and its PNGs)")
    return 0


def _cmd_report(args) -> int:
    from eightbit.analysis import deployment

    return deployment.run(args)


def _report_parser(sub) -> None:
    from eightbit.analysis.deployment import add_arguments  # running it needs the `tflite` extra; parsing does not

    r = sub.add_parser(
        "report",
        help="deployment report of an int8 .tflite: channel alignment, weights, TFLM arena, int16 accumulation, "
        "TFLM vs eightbit's integer reference, LiteRT vs TFLM (needs [tflite])",
    )
    r.add_argument("--target", required=True, choices=["mcu"], help="mcu: microcontrollers and integer-only NPUs")
    add_arguments(r)
    r.set_defaults(func=_cmd_report)


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
    p.add_argument(
        "--keep-float-node",
        action="append",
        default=[],
        metavar="OP",
        help="single op to keep float, by name as the summary lists it (what `analyze --max-drop` finds)",
    )
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
        "--deploy-batch",
        type=positive_int,
        default=1,
        help="batch size the model will run at: the int8 model is timed against fp32 on ONNX Runtime at this size",
    )
    q.add_argument(
        "--allow-slower",
        action="store_true",
        help="write the int8 model even when it is slower than fp32 at --deploy-batch (by default it is refused)",
    )
    q.add_argument(
        "--keep-slow-float",
        action="store_true",
        help="profile every quantized op against its float version at --deploy-batch and keep the modules of the "
        "ops whose int8 version is slower float (quantizes twice)",
    )
    q.add_argument(
        "--no-speed-check",
        action="store_true",
        help="skip the int8-vs-fp32 timing (also: environment EIGHTBIT_SKIP_SPEED_CHECK=1)",
    )
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
    a = sub.add_parser("analyze", help="per-layer error of the int8 model (and, with --max-drop, keep layers float)")
    _model_and_data_args(a)
    a.add_argument("--out", required=True, help="folder for report.md, table.txt, analysis.json and the PNGs")
    a.add_argument("--force", action="store_true", help="replace an existing --out folder")
    a.add_argument("--batches", type=positive_int, default=4, help="calibration batches the analysis runs on")
    a.add_argument("--worst", type=positive_int, default=4, help="histograms for this many most sensitive ops")
    a.add_argument("--name", help="model name for titles (default: the factory's name)")
    a.add_argument("--eval", help="folder of held-out inputs: the fallback's metric is top-1 agreement on them")
    a.add_argument(
        "--max-drop", type=float, help="keep the fewest ops float so that top-1 agreement >= 1 - this (e.g. 0.01)"
    )
    a.add_argument("--time-budget", type=float, help="seconds after which the fallback evaluates no new candidate")
    a.set_defaults(func=_cmd_analyze)
    b = sub.add_parser("bench", help="fp32 vs int8 latency and throughput of an int8 ONNX model")
    b.add_argument("model", help="int8 QDQ .onnx file (its fp32 counterpart is derived by removing Q/DQ)")
    b.add_argument("--fp32", help="the fp32 .onnx to compare against (default: derived from the int8 model)")
    b.add_argument("--batch", type=positive_int, default=32, help="throughput batch size")
    b.add_argument("--threads", type=positive_int, default=2)
    b.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    b.add_argument("--iters", type=positive_int, default=30)
    b.add_argument("--breakdown", action="store_true", help="show where ONNX Runtime spends time, per op category")
    b.add_argument(
        "--sweep",
        metavar="B1,B2,...",
        help="batch sweep, e.g. 1,2,4,8,16,32,64,128: latency, throughput, speedup and the time split per batch "
        "size and runtime, written as a Markdown report with PNGs",
    )
    b.add_argument("--report", metavar="DIR", help="folder for the sweep report (default: <model>_sweep)")
    b.add_argument("--quiet", action="store_true", help="no per-batch progress lines during a sweep")
    b.set_defaults(func=_cmd_bench)
    _report_parser(sub)
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
