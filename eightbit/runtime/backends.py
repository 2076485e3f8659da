"""Run an ONNX (or OpenVINO IR) file on ONNX Runtime or OpenVINO with explicit thread control.

Both backends are wrapped behind one tiny `Runner` interface so that benchmarks and parity checks compare
like with like: the same feeds, the same thread count, and float32 arithmetic for whatever stays in float
(OpenVINO's default precision hint on CPUs with AVX-512 BF16 is bf16, which would silently mix a precision
change into an int8-vs-fp32 comparison).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Backend", "OpenVinoPrecision", "RuntimeOptions", "Runner", "load"]


class Backend(enum.Enum):
    """Inference engine that executes a model file."""

    ORT = "onnxruntime"
    OPENVINO = "openvino"


class OpenVinoPrecision(enum.Enum):
    """OpenVINO INFERENCE_PRECISION_HINT for the float parts of a model."""

    F32 = "f32"
    BF16 = "bf16"


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How a model is executed.

    Attributes:
        threads: intra-op threads (ORT) / INFERENCE_NUM_THREADS (OpenVINO).
        openvino_precision: precision hint for OpenVINO's float computation; F32 keeps comparisons
            like-with-like, BF16 is an explicit opt-in.
        ort_spinning: ORT's default: pool threads spin after each run (lower latency), which steals the
            cores from whatever runs next on a small machine (measured: OpenVINO's batch-1 median on
            EfficientNet-Lite0 rose from 4.2 to 7 ms when interleaved in short blocks with ORT).
    """

    threads: int = 2
    openvino_precision: OpenVinoPrecision = OpenVinoPrecision.F32
    ort_spinning: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class Runner(abc.ABC):
    """A loaded model: named inputs in, list of numpy outputs (in `output_names` order) out."""

    backend: Backend
    path: Path
    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; `feeds` maps every input name to an array."""

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"missing feeds {missing}; the model's inputs are {self.input_names}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, inputs={self.input_names})"


class _OrtRunner(Runner):
    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        if not options.ort_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One model runs at a time here, so inter-op parallelism would only oversubscribe the cores.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises several unrelated types (InvalidProtobuf, Fail, ...)
            raise ValueError(
                f"ONNX Runtime could not load {path}: {e}. Check that the file is a complete ONNX model "
                "(re-export it if it was truncated or written by an interrupted run)."
            ) from e
        self.backend = Backend.ORT
        self.path = path
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_feeds(feeds)
        return self._session.run(self.output_names, {n: feeds[n] for n in self.input_names})


class _OpenVinoRunner(Runner):
    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hint

        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # OpenVINO reports parse failures as a generic RuntimeError
            raise ValueError(
                f"OpenVINO could not read {path}: {e}. Check that the file is a complete ONNX model or "
                "OpenVINO IR (.xml with its .bin next to it); re-export it if it was truncated."
            ) from e
        precision = {OpenVinoPrecision.F32: ov.Type.f32, OpenVinoPrecision.BF16: ov.Type.bf16}
        config = {
            props.inference_num_threads: options.threads,
            hint.performance_mode: hint.PerformanceMode.LATENCY,
            hint.inference_precision: precision[options.openvino_precision],
        }
        # Dimensions that are symbolic in the file (e.g. an exported dynamic batch) stay dynamic here,
        # so one compiled model serves every batch size; no recompilation per shape.
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.backend = Backend.OPENVINO
        self.path = path
        self.input_names = [_port_name(p, i, "input") for i, p in enumerate(self._compiled.inputs)]
        self.output_names = [_port_name(p, i, "output") for i, p in enumerate(self._compiled.outputs)]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_feeds(feeds)
        ordered = [np.ascontiguousarray(feeds[n]) for n in self.input_names]
        self._request.infer(ordered, share_inputs=True)
        # The request reuses its output buffers on the next call, so hand back copies.
        return [self._request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]


def _port_name(port, index: int, kind: str) -> str:
    names = port.get_names()
    return port.get_any_name() if names else f"{kind}_{index}"


_RUNNERS: dict[Backend, type[Runner]] = {Backend.ORT: _OrtRunner, Backend.OPENVINO: _OpenVinoRunner}


def load(path: str | Path, backend: Backend, options: RuntimeOptions | None = None) -> Runner:
    """Load a model file for inference.

    Args:
        path: an .onnx file (both backends) or an OpenVINO IR .xml file (OpenVINO only).
        backend: which engine runs it.
        options: thread count and OpenVINO precision hint; defaults to `RuntimeOptions()`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be parsed by the backend, or the backend cannot read that format.
    """
    path = Path(path)
    options = options or RuntimeOptions()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; export the model first (or check the path)")
    try:
        runner_cls = _RUNNERS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; valid: {[b.name for b in _RUNNERS]}") from None
    if backend is Backend.ORT and path.suffix.lower() == ".xml":
        raise ValueError(f"{path} is OpenVINO IR; ONNX Runtime needs an .onnx file (use Backend.OPENVINO)")
    return runner_cls(path, options)
