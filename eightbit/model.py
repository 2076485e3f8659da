"""`QuantizedModel`: the int8 model that quantize() returns (runs in PyTorch, summary, encodings, export)."""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict

import torch
from torch import fx, nn

from eightbit.calibration.encodings import Encoding
from eightbit.config import QuantConfig, Scheme
from eightbit.export.onnx import DEFAULT_OPSET, ExportReport, export_onnx
from eightbit.fileio import atomic_path
from eightbit.graph.capture import Captured
from eightbit.graph.macs import MacReport
from eightbit.graph.placement import Placement
from eightbit.inputs import CallPlan
from eightbit.saved import ENCODINGS_VERSION

# QuantizedModel -> weak reference to the float model it was quantized from: analysis compares against it without
# keeping it alive or making it part of the quantized model's state (state_dict, pickling, deepcopy).
_FLOAT_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_float_model(quantized: QuantizedModel, source: weakref.ref | None) -> None:
    if source is not None:
        _FLOAT_MODELS[quantized] = source


def float_model_of(quantized: QuantizedModel) -> nn.Module | None:
    """The float model `quantized` was made from, if the caller still holds it (else None)."""
    ref = _FLOAT_MODELS.get(quantized)
    return None if ref is None else ref()


class QuantizedModel(nn.Module):
    """An int8 model: runs in PyTorch with the exact integer arithmetic of Q/DQ (simulated quantization),
    exports to ONNX, and reports what was quantized.  Its buffers (int8 weights, scales, zero points) are in
    `state_dict()`."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        config: QuantConfig,
        placement: Placement,
        activations: dict[str, Encoding],
        weights: dict[str, Encoding],
        captured: Captured,
        example_args: tuple,
        input_names: list[str],
        folded_batchnorms: int,
        smooth_alpha: float | None = None,
        notes: list[str] | None = None,
        weights_fingerprint: str | None = None,
        macs: MacReport | None = None,
        call_plan: CallPlan | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.placement = placement
        self.activation_encodings = activations
        self.weight_encodings = weights
        self.capture_method = captured.method
        self.capture_note = captured.note
        self.dynamic_axes = captured.dynamic_axes
        self.input_names = input_names
        self.folded_batchnorms = folded_batchnorms
        self.smooth_alpha = smooth_alpha
        self.notes = list(notes or [])  # what the user should know: float32 copy, float biases, collapsed ranges
        self.weights_fingerprint = weights_fingerprint  # of the float model: saved encodings are checked with it
        self.macs = macs or MacReport()  # multiply-accumulates per conv/linear/matmul, int8 or float (and why)
        self._example_args = example_args
        self.call_plan = call_plan  # forward()'s signature and the constants fixed at capture
        self.speed = None  # per-op int8 vs float times (analysis.speed.SpeedReport) once measured

    def measure_speed(self, *, batch: int = 1, backend: str = "onnxruntime", threads: int = 2):
        """Profile every quantized op of the ONNX export against the same op in its float twin on ONNX Runtime or
        OpenVINO at `batch`; ops whose int8 version (with its Q/DQ) is slower are listed by `summary()` and kept
        float by `eightbit.analysis.speed.quantize_without_slow_ops`.  Returns the SpeedReport."""
        from eightbit.analysis.speed import measure_speed

        self.speed = measure_speed(self, batch=batch, backend=backend, threads=threads)
        return self.speed

    def forward(self, *args, **kwargs):
        """Takes the inputs the float model's forward() takes (positional, by keyword, through its **kwargs);
        arguments that were not tensors at capture are constants of the graph: they may be left out, never
        changed.  Returns what the float model returned (a tensor, a tuple, a dict or a `ModelOutput`), with
        the fields that were None or not tensors left out."""
        if self.call_plan is not None:
            args = self.call_plan.graph_inputs(args, kwargs)
        elif kwargs:  # the graph takes forward()'s inputs positionally, in the captured order
            rest = self.input_names[len(args) :]
            if set(kwargs) != set(rest):
                raise TypeError(
                    f"this model takes the inputs {self.input_names}; got {len(args)} positional and "
                    f"keywords {sorted(kwargs)}"
                )
            args = (*args, *(kwargs[n] for n in rest))
        # Float inputs of another precision (a float16 model's inputs) run as the float32 the graph was captured in.
        args = tuple(_as_dtype_of(a, e) for a, e in zip(args, self._example_args, strict=False))
        return self.graph_module(*args)

    def export_onnx(
        self, path, *, overwrite: bool = False, check: bool = True, opset: int | None = None
    ) -> ExportReport:
        """Write a standard QDQ ONNX model (int8 weight initializers, dynamic batch) atomically and check it
        against ONNX Runtime (`ParityError`, and no file, if it disagrees; `check=False` skips the check)."""
        schemes = {e.scheme for e in [*self.weight_encodings.values(), *self.activation_encodings.values()]}
        if Scheme.LOG2.value in schemes:
            raise ValueError(
                "log2 (exponential) weights are a study format: no ONNX runtime executes them, so "
                "export is refused. Compare accuracy in PyTorch, and export with uniform weights."
            )
        needs_16bit = max(self.config.activations.container_bits, self.config.weights.container_bits) > 8
        opset = opset or (21 if needs_16bit else DEFAULT_OPSET)
        return export_onnx(
            self.graph_module,
            path,
            self._example_args,
            input_names=self.input_names,
            dynamic_axes=self.dynamic_axes,
            opset=opset,
            overwrite=overwrite,
            check=check,
            float16=Scheme.FP16.value in schemes,
        )

    def export_tflite(
        self, path, *, float_io: bool = False, float_model: bool = False, overwrite: bool = False, check: bool = True
    ):
        """Write a fully int8 TFLite model (LiteRT, TensorFlow Lite Micro; batch 1, NHWC) atomically and check its
        output codes on both interpreters.  float_io: float32 input/output through QUANTIZE/DEQUANTIZE;
        float_model: the float32 model of the same graph (speed baseline).  Needs the `tflite` extra."""
        from eightbit.export.tflite import export_tflite

        return export_tflite(
            self.graph_module,
            path,
            self._example_args,
            float_io=float_io,
            float_model=float_model,
            overwrite=overwrite,
            check=check,
        )

    def encodings(self) -> dict:
        """All quantization parameters as a JSON-ready dict."""
        out = {
            "version": ENCODINGS_VERSION,
            "activations": {k: asdict(v) for k, v in self.activation_encodings.items()},
            "weights": {k: asdict(v) for k, v in self.weight_encodings.items()},
        }
        if self.weights_fingerprint is not None:
            out["weights_fingerprint"] = self.weights_fingerprint
        return out

    def save_encodings(self, path, *, overwrite: bool = False) -> None:
        """Save the quantization parameters as JSON (atomically); `quantize(..., encodings=path)` reuses them."""
        with atomic_path(path, overwrite) as tmp:
            tmp.write_text(json.dumps(self.encodings(), indent=1))

    def analyze(self, data, model: nn.Module | None = None, **options):
        """Per-layer error on a few batches of `data` (model inputs, as for `quantize`): each op int8 alone (the
        sensitivity ranking) and the full int8 model tensor by tensor.  model: the float model this one was
        quantized from (default: the one given to `quantize`, while it is alive).  Options and result:
        `eightbit.analysis.layers.analyze`."""
        from eightbit.analysis.layers import analyze

        return analyze(self, data, model, **options)

    def fallback(self, metric, *, max_drop: float, out, model: nn.Module | None = None, **options):
        """Keep the fewest ops float until `metric(model)` (higher is better) is within `max_drop` of the float
        model's, writing the best model so far to the folder `out` as the search goes.  Options and result:
        `eightbit.analysis.fallback.accuracy_fallback`."""
        from eightbit.analysis.fallback import accuracy_fallback

        return accuracy_fallback(self, metric, max_drop=max_drop, out=out, model=model, **options)

    def summary(self) -> str:
        """The share of multiply-accumulates that run in int8 (and the largest float ops), then a table of every
        compute op: int8 or float, and why."""
        w = self.config.weights
        reduced = sum(1 for e in self.weight_encodings.values() if e.qmax < w.qmax)
        lines = [
            self.macs.headline(),
            *self.macs.float_lines(),
            f"weights: {w.bits}-bit, {'per-channel' if w.per_channel else 'per-tensor'}"
            + (f"; {reduced} GEMM layers use 7-bit codes (overflow fix: this CPU lacks VNNI)" if reduced else ""),
            f"captured with {self.capture_method.value}" + (f" ({self.capture_note})" if self.capture_note else ""),
            f"BatchNorms folded: {self.folded_batchnorms}; activation tensor groups: {len(self.activation_encodings)}"
            + ("" if self.smooth_alpha is None else f"; SmoothQuant alpha {self.smooth_alpha}"),
            f"int8 ops: {len(self.placement.quantized_ops)}; float ops: {len(self.placement.float_ops)}",
            *(f"note: {n}" for n in self.notes),
            *(self.speed.lines() if self.speed is not None else []),
            "",
        ]
        rows = [(name, rule.kind.value, "int8", "") for name, rule in self.placement.quantized_ops.items()]
        rows += [(name, "", "float", why) for name, why in self.placement.float_ops.items()]
        width = max((len(r[0]) for r in rows), default=4)
        lines += [f"{'op':<{width}}  {'kind':<7} {'dtype':<5} note"]
        lines += [f"{n:<{width}}  {k:<7} {d:<5} {w}" for n, k, d, w in rows]
        return "\n".join(lines)


def _as_dtype_of(value, example):
    floats = isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor) and value.is_floating_point()
    if floats and example.is_floating_point() and value.dtype != example.dtype:
        return value.to(example.dtype)
    return value
