"""Run a .tflite model on the LiteRT interpreter (`ai-edge-litert`) or the TensorFlow Lite Micro interpreter
(`tflite-micro`): outputs, every intermediate tensor (for layer-by-layer comparison), and TFLM's arena size."""

from __future__ import annotations

import contextlib
import enum
import os
import re
import tempfile

import numpy as np


class LiteRTKernels(enum.Enum):
    """Which LiteRT kernels run an int8 model (the interpreter's `experimental_op_resolver_type`).

    XNNPACK: the default delegate (fp32 requantization, the fast path); BUILTIN: TFLite's optimized builtin
    kernels without the default delegate; REFERENCE: TFLite's reference kernels (BUILTIN_REF, the closest to
    TFLite Micro, slow)."""

    XNNPACK = "xnnpack"
    BUILTIN = "builtin"
    REFERENCE = "reference"


def _litert():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError("running .tflite files needs the `tflite` extra: pip install 'eightbit[tflite]'") from None
    return Interpreter


def _tflm():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise ImportError("running TFLite Micro needs the `tflite` extra: pip install 'eightbit[tflite]'") from None
    return runtime


def litert_interpreter(
    model: bytes,
    *,
    threads: int = 1,
    preserve: bool = False,
    xnnpack: bool = True,
    kernels: LiteRTKernels | None = None,
):
    """A LiteRT interpreter with tensors allocated.  `kernels` picks the op resolver (default XNNPACK;
    `xnnpack=False` is the older spelling of LiteRTKernels.BUILTIN)."""
    Interpreter = _litert()
    if kernels is None:
        kernels = LiteRTKernels.XNNPACK if xnnpack else LiteRTKernels.BUILTIN
    if not isinstance(kernels, LiteRTKernels):
        raise TypeError(f"kernels must be a LiteRTKernels, got {kernels!r}")
    kwargs = {"experimental_op_resolver_type": _resolver(kernels)}
    interp = Interpreter(model_content=model, num_threads=threads, experimental_preserve_all_tensors=preserve, **kwargs)
    interp.allocate_tensors()
    return interp


def _resolver(kernels: LiteRTKernels):
    from ai_edge_litert.interpreter import OpResolverType

    return {
        LiteRTKernels.XNNPACK: OpResolverType.AUTO,
        LiteRTKernels.BUILTIN: OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        LiteRTKernels.REFERENCE: OpResolverType.BUILTIN_REF,
    }[kernels]


def run_litert(
    model: bytes,
    inputs: list[np.ndarray],
    *,
    all_tensors: bool = False,
    xnnpack: bool = True,
    kernels: LiteRTKernels | None = None,
):
    """Outputs (and, with all_tensors, every tensor by index) of one LiteRT invocation."""
    interp = litert_interpreter(model, preserve=all_tensors, xnnpack=xnnpack, kernels=kernels)
    for detail, value in zip(interp.get_input_details(), inputs, strict=True):
        interp.set_tensor(detail["index"], value)
    interp.invoke()
    outputs = [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]
    if not all_tensors:
        return outputs
    tensors = {}
    for d in interp.get_tensor_details():
        with contextlib.suppress(ValueError):  # tensors without data
            tensors[d["index"]] = interp.get_tensor(d["index"]).copy()
    return outputs, tensors


def run_tflm(model: bytes, inputs: list[np.ndarray], *, all_tensors: bool = False, arena_size: int | None = None):
    """Outputs (and, with all_tensors, every tensor by index) of one TFLM invocation."""
    runtime = _tflm()
    kinds = runtime.InterpreterConfig
    config = kinds.kPreserveAllTensors if all_tensors else kinds.kAllocationRecording
    if arena_size is None:  # TFLM's default (10x the file) is too small for small models or preserved tensors
        arena_size = 10 * len(model) + (16 << 20 if all_tensors else 1 << 20)
    interp = runtime.Interpreter.from_bytes(model, arena_size=arena_size, intrepreter_config=config)
    for i, value in enumerate(inputs):
        interp.set_input(value, i)
    interp.invoke()
    outputs = [np.array(interp.get_output(i)) for i in range(len(_output_indices(model)))]
    if not all_tensors:
        return outputs
    tensors = {}
    for index in range(_tensor_count(model)):
        with contextlib.suppress(Exception):  # constants TFLM does not expose
            found = interp.GetTensor(index, 0)
            tensors[index] = np.asarray(found["tensor_data"]).reshape(found["shape"])
    return outputs, tensors


def with_every_output(model: bytes) -> bytes:
    """The same model with every operator's output made a model output.  A delegate (XNNPACK) then has to write
    each intermediate tensor where the caller can read it; the arithmetic is unchanged."""
    import flatbuffers
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    parsed = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    graph = parsed.subgraphs[0]
    graph.outputs = [int(op.outputs[0]) for op in graph.operators]
    builder = flatbuffers.Builder(1024)
    builder.Finish(parsed.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _subgraph(model: bytes):
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    return schema.Model.GetRootAs(model, 0).Subgraphs(0)


def _output_indices(model: bytes) -> list[int]:
    return list(_subgraph(model).OutputsAsNumpy())


def _tensor_count(model: bytes) -> int:
    return _subgraph(model).TensorsLength()


def tflm_arena_bytes(model: bytes, inputs: list[np.ndarray]) -> int:
    """The tensor arena TFLM's planner needs for `model` (its RecordingMicroAllocator's total), in bytes."""
    runtime = _tflm()
    interp = runtime.Interpreter.from_bytes(model, arena_size=10 * len(model) + (1 << 20))
    for i, value in enumerate(inputs):
        interp.set_input(value, i)
    interp.invoke()
    text = _captured_stderr(interp.print_allocations)
    match = re.search(r"Arena allocation total (\d+) bytes", text)
    if match is None:
        raise RuntimeError(f"TFLM did not report its arena use: {text[:200]!r}")
    return int(match.group(1))


def _captured_stderr(fn) -> str:
    """What `fn` writes to the process's stderr (file descriptor 2: TFLM prints from C++)."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")
