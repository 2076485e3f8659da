"""How far LiteRT's kernels are from TensorFlow Lite Micro on an int8 .tflite, and where the difference comes from.

For each LiteRT kernel set (XNNPACK, the optimized builtin kernels, the reference kernels):
- the model outputs against TFLM's: largest difference in codes, how many codes differ, top-1 flips;
- the first operator whose output differs from TFLM's (every operator's output is made a model output, so that
  a delegate writes its intermediate tensors), and by how much;
- each kernel alone: every operator re-run with TFLM's arithmetic (the integer reference, bit-exact with TFLM) on
  LiteRT's own inputs, so that a difference inherited from earlier layers is not counted.  A kernel set whose
  kernels are each within 1 code can still drift further after many layers: high-gain layers amplify a 1-code
  rounding difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eightbit.export.tflite_run import LiteRTKernels, litert_interpreter, run_tflm, with_every_output
from eightbit.integer.executor import IntegerReference

_DOT = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class Mismatch:
    """The first operator whose output differs between two executions of the same file."""

    index: int
    op: str
    output: str
    differing: int
    max_codes: int


@dataclass
class KernelError:
    """One operator type's outputs against TFLM's kernel on the same inputs (codes).  For dot products, of the
    values that differ: how many times LiteRT's and TFLM's value is the exact result correctly rounded."""

    max_codes: int = 0
    differing: int = 0
    total: int = 0
    litert_correct: int = 0
    tflm_correct: int = 0


@dataclass
class RuntimeAgreement:
    """One LiteRT kernel set against TFLM on the given samples."""

    kernels: LiteRTKernels
    samples: int
    max_codes: int  # model outputs vs TFLM
    differing: int
    total: int
    top1_flips: int
    first_divergence: Mismatch | None  # the first operator that differs from TFLM (first sample that differs)
    kernel_errors: dict[str, KernelError] = field(default_factory=dict)  # by operator type, each kernel alone

    @property
    def worst_kernel_codes(self) -> int:
        return max((e.max_codes for e in self.kernel_errors.values()), default=0)

    def __str__(self) -> str:
        head = (
            f"LiteRT {self.kernels.value} vs TFLM on {self.samples} samples: outputs max {self.max_codes} codes, "
            f"{self.differing} of {self.total} differ, {self.top1_flips} top-1 flips"
        )
        first = self.first_divergence
        where = (
            "no operator differs"
            if first is None
            else f"first differing operator: {first.index} {first.op} ({first.differing} values differ, "
            f"by up to {first.max_codes} codes)"
        )
        kernels = ", ".join(
            f"{op} {e.max_codes} ({100 * e.differing / max(e.total, 1):.2f}% of values)"
            for op, e in self.kernel_errors.items()
            if e.max_codes
        )
        alone = f"each kernel alone (on LiteRT's own inputs) within {self.worst_kernel_codes} code(s) of TFLM's" + (
            f": {kernels}" if kernels else ""
        )
        lines = [head, f"  {where}; {alone}"]
        litert = sum(e.litert_correct for e in self.kernel_errors.values())
        tflm = sum(e.tflm_correct for e in self.kernel_errors.values())
        if litert or tflm:
            lines.append(
                f"  where a dot-product kernel differs, the correctly rounded value is LiteRT's in {litert} and "
                f"TFLM's in {tflm} cases"
            )
        return "\n".join(lines)


def _tensors(interp, indices) -> dict[int, np.ndarray]:
    return {i: interp.get_tensor(i).copy() for i in indices}


def compare_runtimes(
    model: bytes,
    samples: list[list[np.ndarray]],
    kernels: tuple[LiteRTKernels, ...] = tuple(LiteRTKernels),
    *,
    kernel_samples: int = 4,
) -> list[RuntimeAgreement]:
    """LiteRT (each kernel set) against TFLM on `samples` (each a list of int8 input arrays).  The per-kernel
    check runs on the first `kernel_samples` samples (one integer-reference pass per sample and kernel set)."""
    if not samples:
        raise ValueError("compare_runtimes needs at least one sample")
    reference = IntegerReference(model)
    graph = reference.graph
    if any(reference.tensor_type(int(i)) != "INT8" for i in (*graph.inputs, *graph.outputs)):
        raise ValueError("compare_runtimes needs a file with int8 inputs and outputs (exported with float_io=False)")
    outputs = [int(op.outputs[0]) for op in graph.operators]
    tflm = [run_tflm(model, sample, all_tensors=True) for sample in samples]
    every = with_every_output(model)
    results = []
    for kind in kernels:
        interp = litert_interpreter(every, kernels=kind)
        inputs = interp.get_input_details()
        out_codes, tflm_codes, first, errors = [], [], None, {}
        for s, sample in enumerate(samples):
            for detail, value in zip(inputs, sample, strict=True):
                interp.set_tensor(detail["index"], value)
            interp.invoke()
            ours = _tensors(interp, outputs)
            (tflm_out, *_), tflm_all = tflm[s]
            out_codes.append(ours[int(graph.outputs[0])].reshape(1, -1).astype(np.int64))
            tflm_codes.append(tflm_out.reshape(1, -1).astype(np.int64))
            if first is None:
                first = _first_divergence(reference, outputs, ours, tflm_all)
            if s < kernel_samples:
                _kernel_errors(reference, sample, ours, errors)
        got, want = np.concatenate(out_codes), np.concatenate(tflm_codes)
        diff = np.abs(got - want)
        flips = int((got.argmax(1) != want.argmax(1)).sum())
        results.append(
            RuntimeAgreement(
                kind, len(samples), int(diff.max()), int((diff > 0).sum()), diff.size, flips, first, errors
            )
        )
    return results


def _first_divergence(reference: IntegerReference, outputs, ours, tflm_all) -> Mismatch | None:
    for i, index in enumerate(outputs):
        diff = np.abs(ours[index].reshape(-1).astype(np.int64) - tflm_all[index].reshape(-1).astype(np.int64))
        if diff.any():
            name = reference.graph.tensors[index].name
            name = name.decode() if isinstance(name, bytes) else str(name)
            return Mismatch(i, reference.op_name(i), name, int((diff > 0).sum()), int(diff.max()))
    return None


def _kernel_errors(reference: IntegerReference, sample, ours, errors: dict[str, KernelError]) -> None:
    """Each operator with TFLM's arithmetic on LiteRT's own inputs, against LiteRT's output."""
    values = dict(ours)
    for index, value in zip(reference.graph.inputs, sample, strict=True):
        values[int(index)] = np.asarray(value)
    for i, op in enumerate(reference.graph.operators):
        index = int(op.outputs[0])
        want = reference.run_operator(i, values).reshape(-1).astype(np.int64)
        diff = np.abs(ours[index].reshape(-1).astype(np.int64) - want)
        name = reference.op_name(i)
        error = errors.setdefault(name, KernelError())
        error.max_codes = max(error.max_codes, int(diff.max(initial=0)))
        error.differing += int((diff > 0).sum())
        error.total += diff.size
        if diff.any() and name in _DOT:
            differs = diff > 0
            rounded = np.floor(reference.exact_output(i, values).reshape(-1)[differs] + 0.5)
            error.litert_correct += int((ours[index].reshape(-1)[differs] == rounded).sum())
            error.tflm_correct += int((want[differs] == rounded).sum())
