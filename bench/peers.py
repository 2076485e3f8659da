"""Peer int8 quantizers that eightbit is compared against, all starting from the same fp32 ONNX file.

Static (calibrated) peers, for CNNs and transformers alike:

* `Peer.ORT_U8S8`, `Peer.ORT_DEFAULT`: ORT `quantize_static` after ORT's `quant_pre_process` (retried with
  `auto_merge=True` where symbolic shape inference fails, as on dynamo-exported BERT), QDQ, per-channel
  weights, MinMax calibration, with (a) uint8 activations x int8 weights (U8S8: the format x86 integer kernels
  run fast) and (b) ORT's default int8 activations x int8 weights (S8S8).
* `Peer.NNCF`: NNCF post-training quantization of an OpenVINO model read from the ONNX file (default preset,
  default model type), saved as OpenVINO IR and meant to run on OpenVINO with the f32 precision hint.

Transformer recipes (the settings each project documents for BERT-like encoders):

* `Peer.ORT_DYNAMIC`: ONNX Runtime's CPU recipe for transformers: the ORT transformer optimizer
  (`onnxruntime.transformers.optimizer.optimize_model`, model_type "bert", heads and hidden size detected),
  which fuses subgraphs into contrib ops (Attention, SkipLayerNormalization, BiasGelu, ...), then
  `quantize_dynamic` with ORT's defaults (int8 weights, per tensor; activations quantized at run time, so no
  calibration data).  Whatever the optimizer could not fuse stays as plain ONNX ops: on a transformers BertModel
  from the dynamo exporter it fuses SkipLayerNormalization / BiasGelu but not Attention or
  EmbedLayerNormalization (attention stays MatMul / Softmax; its MatMuls are still quantized dynamically).
  `PeerResult.fused_ops` says which fusions happened.
* `Peer.NNCF_TRANSFORMER`: as `Peer.NNCF` with `model_type=nncf.ModelType.TRANSFORMER` (SmoothQuant plus NNCF's
  ignored patterns for transformers).

`ort_optimized_fp32` writes the fp32 model through the same ORT transformer optimizer (no quantization): the
strongest ORT fp32 baseline for transformers, next to the plain fp32 file.

Calibration data is a sequence of feeds, batch 1 each: an array per item for a single-input model, or a dict
{input name: array} per item (any model, e.g. a BERT encoder's input_ids and attention_mask).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Calib", "Peer", "PeerResult", "fused_op_counts", "ort_optimized_fp32", "quantize_peer"]

log = logging.getLogger(__name__)

# One calibration feed: the array for a single-input model, or {input name: array}.
Calib = np.ndarray | Mapping[str, np.ndarray]


class Peer(enum.Enum):
    """A third-party int8 quantization recipe."""

    ORT_U8S8 = "ort-qdq-u8s8"
    ORT_DEFAULT = "ort-qdq-s8s8"
    NNCF = "nncf-openvino"
    ORT_DYNAMIC = "ort-dynamic"
    NNCF_TRANSFORMER = "nncf-openvino-transformer"


# Peers that take no calibration data.
_UNCALIBRATED = frozenset({Peer.ORT_DYNAMIC})


@dataclass(frozen=True, kw_only=True)
class PeerResult:
    """Where a peer wrote its model and how long quantization took (seconds, wall clock).

    fused_ops: for peers that run the ORT transformer optimizer, the fused operators it produced (non-zero
    counts; empty if it fused nothing or failed); None for the others.  notes: anything a reader of the
    results should know (e.g. an optimizer that failed and was skipped)."""

    peer: Peer
    path: Path
    seconds: float
    fused_ops: dict[str, int] | None = None
    notes: tuple[str, ...] = field(default=())


@dataclass
class _Output:
    path: Path
    fused_ops: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)


def _input_names(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _feeds(calib: Sequence[Calib], names: list[str]) -> list[dict[str, np.ndarray]]:
    """Each calibration item as {input name: array}, checked against the model's inputs."""
    feeds = []
    for k, item in enumerate(calib):
        if isinstance(item, Mapping):
            feed = dict(item)
        else:
            if len(names) != 1:
                raise ValueError(
                    f"calibration item {k} is an array, but the model has inputs {names}; "
                    "give a dict {input name: array} per item"
                )
            feed = {names[0]: item}
        if set(feed) != set(names):
            raise ValueError(f"calibration item {k} has inputs {sorted(feed)}; the model has {names}")
        feeds.append({n: np.asarray(feed[n]) for n in names})
    return feeds


@contextlib.contextmanager
def _scratch_cwd() -> Iterator[None]:
    """Run in a temporary working directory: a failed symbolic shape inference leaves its temporary model
    (sym_shape_infer_temp.onnx and a <uuid>.data file) in the current directory."""
    import os
    import tempfile

    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _ort_static(fp32: Path, calib: Sequence[Calib], out: Path, activation_u8: bool) -> _Output:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = _feeds(calib, _input_names(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    # ORT's documented recipe: shape inference + graph optimization (folds BatchNorm into Conv, so the
    # quantizer sees Conv -> Relu rather than Conv -> BatchNormalization it would leave in float).
    src, pre = fp32.resolve(), out.with_name(out.stem + ".pre.onnx").resolve()  # absolute: the cwd changes
    notes = []
    with _scratch_cwd():
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as e:
            # Symbolic shape inference gives up on some transformer graphs (e.g. the dynamo export of BertModel:
            # "unsupported broadcast between Min(512, sequence) sequence"); ORT's own remedy is auto_merge, which
            # merges the conflicting symbolic dims.
            notes.append(f"quant_pre_process needed auto_merge=True ({type(e).__name__}: {e})")
            log.info("%s: %s", fp32, notes[-1])
            quant_pre_process(str(src), str(pre), auto_merge=True)
    act = QuantType.QUInt8 if activation_u8 else QuantType.QInt8
    try:
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=act,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        pre.unlink(missing_ok=True)
    return _Output(out, notes=notes)


def _ort_u8s8(fp32: Path, calib: Sequence[Calib], out: Path) -> _Output:
    return _ort_static(fp32, calib, out, activation_u8=True)


def _ort_default(fp32: Path, calib: Sequence[Calib], out: Path) -> _Output:
    return _ort_static(fp32, calib, out, activation_u8=False)


@contextlib.contextmanager
def _quiet_producer_warning() -> Iterator[None]:
    """The optimizer warns when the model's producer is not "pytorch" (ours says "eightbit"): harmless here."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "producer not matched" not in record.getMessage()

    logger, drop = logging.getLogger("onnxruntime.transformers.optimizer"), _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _transformer_optimize(fp32: Path, out: Path) -> _Output:
    """ORT's transformer optimizer (BERT fusions, fp32) from `fp32` to `out`.  If it fails, `out` is a copy of
    `fp32` and the failure is in the notes: the quantizer still has a graph to work on."""
    import shutil

    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _quiet_producer_warning():
            model = optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0)
        stats = model.get_fused_operator_statistics()
        model.save_model_to_file(str(out))
    except Exception as e:  # a graph the optimizer cannot handle: fall back to the plain graph
        note = f"ORT transformer optimizer failed ({type(e).__name__}: {e}); graph left unfused"
        log.warning("%s: %s", fp32, note)
        shutil.copyfile(fp32, out)
        return _Output(out, {}, [note])
    fused = {op: n for op, n in stats.items() if n}
    notes = []
    if not fused.get("Attention") and not fused.get("MultiHeadAttention"):
        notes.append("ORT transformer optimizer fused no Attention: attention runs as MatMul/Softmax ops")
    log.info("ORT transformer optimizer on %s: fused %s", fp32.name, fused or "nothing")
    return _Output(out, fused, notes)


def ort_optimized_fp32(fp32_onnx: str | Path, out: str | Path) -> Path:
    """Write `fp32_onnx` passed through ORT's transformer optimizer (as `Peer.ORT_DYNAMIC` does before
    quantizing; fp32, no quantization) to `out`: ORT's strongest fp32 baseline for a transformer.  If the
    optimizer fails, `out` is a plain copy (logged as a warning); `fused_op_counts(out)` tells what fused."""
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"fp32 model {fp32_onnx} does not exist; export it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    return _transformer_optimize(fp32_onnx, out).path


def fused_op_counts(onnx_path: str | Path) -> dict[str, int]:
    """Count of each ONNX Runtime contrib operator (com.microsoft domain: fused Attention, SkipLayerNormalization,
    BiasGelu, DynamicQuantizeMatMul, ...) in a model file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft"))


def _drop_initializer_value_info(onnx_path: Path) -> None:
    """Remove the shape annotations (value_info) that the dynamo exporter writes for initializers.

    quantize_dynamic transposes Gemm weights (e.g. a classifier head) for MatMulInteger but leaves those
    annotations as they were, and its own shape inference then fails ("Inferred shape and existing shape
    differ").  They carry nothing shape inference cannot recover from the initializers themselves."""
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.value_info if v.name not in inits]
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        onnx.save(model, str(onnx_path))


def _ort_dynamic(fp32: Path, calib: Sequence[Calib], out: Path) -> _Output:
    del calib  # dynamic quantization measures activation ranges at run time
    from onnxruntime.quantization import QuantType, quantize_dynamic

    opt = out.with_name(out.stem + ".opt.onnx")
    try:
        res = _transformer_optimize(fp32, opt)
        _drop_initializer_value_info(opt)
        quantize_dynamic(str(opt), str(out), weight_type=QuantType.QInt8, per_channel=False)
    finally:
        opt.unlink(missing_ok=True)
    res.path = out
    return res


def _nncf_quantize(fp32: Path, calib: Sequence[Calib], out: Path, transformer: bool) -> _Output:
    import nncf
    import openvino as ov

    feeds = _feeds(calib, _input_names(fp32))  # checks the items against the model's inputs
    # Single-input arrays go in as they are; dicts go in keyed by input name, which OpenVINO's infer accepts
    # (the ONNX frontend keeps the ONNX input names).
    items = feeds if any(isinstance(c, Mapping) for c in calib) else list(calib)
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset(items)
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(items), **kwargs)
    xml = out.with_suffix(".xml")
    # save_model would otherwise store remaining float weights as fp16; keep f32 for a like-with-like run.
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return _Output(xml)


def _nncf(fp32: Path, calib: Sequence[Calib], out: Path) -> _Output:
    return _nncf_quantize(fp32, calib, out, transformer=False)


def _nncf_transformer(fp32: Path, calib: Sequence[Calib], out: Path) -> _Output:
    return _nncf_quantize(fp32, calib, out, transformer=True)


_PEERS: dict[Peer, Callable[[Path, Sequence[Calib], Path], _Output]] = {
    Peer.ORT_U8S8: _ort_u8s8,
    Peer.ORT_DEFAULT: _ort_default,
    Peer.NNCF: _nncf,
    Peer.ORT_DYNAMIC: _ort_dynamic,
    Peer.NNCF_TRANSFORMER: _nncf_transformer,
}


def quantize_peer(peer: Peer, fp32_onnx: str | Path, calib: Sequence[Calib] | None, out: str | Path) -> PeerResult:
    """Quantize `fp32_onnx` with `peer`, calibrating on `calib` (one batch-1 feed per sample: an array for a
    single-input model, or a dict {input name: array}; ignored, and may be None, for `Peer.ORT_DYNAMIC`).

    `out` is the target file; the NNCF peers write OpenVINO IR next to it (`out` with an .xml suffix, plus .bin).
    """
    try:
        fn = _PEERS[peer]
    except KeyError:
        raise ValueError(f"unknown peer {peer!r}; valid: {[p.value for p in _PEERS]}") from None
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"fp32 model {fp32_onnx} does not exist; export it first")
    calib = [] if calib is None else calib
    if peer not in _UNCALIBRATED and len(calib) == 0:
        raise ValueError(f"{peer.value} needs calibration data; got none")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = fn(fp32_onnx, calib, out)
    seconds = time.perf_counter() - t0
    return PeerResult(peer=peer, path=res.path, seconds=seconds, fused_ops=res.fused_ops, notes=tuple(res.notes))
