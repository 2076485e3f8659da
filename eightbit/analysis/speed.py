"""Which quantized ops make the int8 model slower: per-op time of the int8 model (its kernel plus the
quantize/dequantize kernels it needs) against the same op in the float model, on ONNX Runtime or OpenVINO, and
a fallback that re-quantizes with the slow ops kept float.

Mapping runtime kernels back to graph ops: the ONNX exporter writes the emitting graph op into every ONNX node's
doc_string; `eightbit.runtime.profile` ties each kernel to the ONNX nodes it executes (through fusions).  A kernel
then belongs to a quantized op when it executes that op, a fused activation after it, or a Q/DQ node that exists
for it: the Q of one of its inputs, the DQ of its weights, or the DQ that hands its output to a float consumer.
Kernels tied to no node (layout Transposes/Reorders the runtime inserts) are reported as unattributed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from torch import fx

from eightbit.export.emit import SOURCE_OP_PREFIX
from eightbit.export.strip import strip_qdq
from eightbit.graph.ops import DEQUANTIZE, QUANTIZE
from eightbit.graph.placement import FUSED_ACTIVATIONS
from eightbit.graph.utils import module_path
from eightbit.runtime.backends import Backend, RuntimeOptions
from eightbit.runtime.benchmark import OpCategory
from eightbit.runtime.profile import Kernel, KernelProfile, profile_kernels
from eightbit.runtime.speedcheck import model_feeds

__all__ = ["OpTime", "SpeedReport", "compare_ops", "measure_speed", "op_owners", "quantize_without_slow_ops"]

_QDQ = (OpCategory.QUANTIZE, OpCategory.DEQUANTIZE)


@dataclass(frozen=True, kw_only=True)
class OpTime:
    """Milliseconds per run of one quantized op: int8 (kernel + its Q/DQ) and float (the same op in fp32)."""

    op: str
    module: str
    int8_ms: float
    qdq_ms: float
    fp32_ms: float

    @property
    def ratio(self) -> float:
        """int8 time / float time (> 1: the int8 version is slower)."""
        return self.int8_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")

    @property
    def extra_ms(self) -> float:
        """Milliseconds per run the int8 version costs more than the float one (negative: it saves time)."""
        return self.int8_ms - self.fp32_ms


@dataclass(frozen=True, kw_only=True)
class SpeedReport:
    """Per-op int8 vs float time of one model on one backend at one batch size.

    margin / min_extra_ms: an op is slow when its int8 time exceeds the float time by more than `margin` (relative)
    and by at least `min_extra_ms` (absolute), so that timer noise on sub-microsecond kernels flags nothing.
    """

    backend: Backend
    batch: int
    ops: tuple[OpTime, ...]
    int8_wall_ms: float
    fp32_wall_ms: float
    unattributed_ms: float
    unmatched: tuple[str, ...] = ()
    margin: float = 0.1
    min_extra_ms: float = 0.002

    @property
    def slow_ops(self) -> tuple[OpTime, ...]:
        """Ops whose int8 version (with its Q/DQ) costs more than the float op, slowest excess first."""
        slow = [o for o in self.ops if o.extra_ms > max(self.margin * o.fp32_ms, self.min_extra_ms)]
        return tuple(sorted(slow, key=lambda o: -o.extra_ms))

    def lines(self) -> list[str]:
        """Short text for `summary()` and the CLI: the whole-model ratio and every slow op."""
        where = f"{self.backend.value}, batch {self.batch}"
        ratio = self.int8_wall_ms / self.fp32_wall_ms if self.fp32_wall_ms > 0 else float("inf")
        out = [
            f"speed ({where}, profiled): int8 {self.int8_wall_ms:.3f} ms vs fp32 {self.fp32_wall_ms:.3f} ms per run "
            f"({ratio:.2f}x the time); layout/reorder kernels tied to no op: {self.unattributed_ms:.3f} ms"
        ]
        slow = self.slow_ops
        if not self.ops and not self.unmatched:
            out.append(
                "  no kernel could be tied to a quantized op (the ONNX file carries no eightbit op names: written by "
                "the dynamo exporter or another tool)"
            )
        elif not slow:
            out.append("  no quantized op is slower in int8 than in float")
        for o in slow:
            out.append(
                f"  slower in int8: {o.op} ({o.module or 'top level'}): {o.int8_ms:.3f} ms (Q/DQ {o.qdq_ms:.3f}) vs "
                f"fp32 {o.fp32_ms:.3f} ms, {o.ratio:.2f}x, +{o.extra_ms:.3f} ms per run"
            )
        if self.unmatched:
            out.append(f"  not compared (fused differently in fp32): {', '.join(self.unmatched)}")
        return out

    def table(self) -> str:
        """Every quantized op: int8 ms, of which Q/DQ, fp32 ms, ratio."""
        width = max([len(o.op) for o in self.ops] + [2])
        rows = [f"{'op':<{width}}  {'int8 ms':>9} {'Q/DQ ms':>9} {'fp32 ms':>9} {'ratio':>6}"]
        for o in sorted(self.ops, key=lambda o: -o.extra_ms):
            rows.append(f"{o.op:<{width}}  {o.int8_ms:9.4f} {o.qdq_ms:9.4f} {o.fp32_ms:9.4f} {o.ratio:6.2f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return "\n".join(self.lines())


def op_owners(gm: fx.GraphModule, quantized_ops: Iterable[str]) -> dict[str, str]:
    """Graph node name -> the quantized op whose cost it is (see the module docstring); nodes of no quantized op
    are absent."""
    quantized = set(quantized_ops)
    nodes = {n.name: n for n in gm.graph.nodes}
    owners = {name: name for name in quantized if name in nodes}
    for name in list(owners):  # fused activations (ReLU after a conv) run inside the int8 kernel
        node = nodes[name]
        while len(node.users) == 1:
            (user,) = node.users
            if user.op != "call_function" or user.target not in FUSED_ACTIVATIONS:
                break
            owners[user.name] = name
            node = user
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (QUANTIZE, DEQUANTIZE):
            continue
        owner = _qdq_owner(node, owners)
        if owner:
            owners[node.name] = owner
    return owners


def _qdq_owner(node: fx.Node, owners: Mapping[str, str]) -> str | None:
    """A Q's owner: the quantized op it feeds (through its DQ), else the op that produced its input.  A DQ's
    owner: the quantized op whose output it dequantizes (a float consumer reads it), else the op it feeds."""
    if node.target == QUANTIZE:
        return _consumer_owner(node, owners) or _producer_owner(node, owners)
    return _producer_owner(node, owners) or _consumer_owner(node, owners)


def _consumer_owner(node: fx.Node, owners: Mapping[str, str]) -> str | None:
    frontier = list(node.users)
    while frontier:
        user = frontier.pop(0)
        if user.name in owners and user.target not in (QUANTIZE, DEQUANTIZE):
            return owners[user.name]
        if user.op == "call_function" and user.target in (QUANTIZE, DEQUANTIZE):
            frontier += list(user.users)
    return None


def _producer_owner(node: fx.Node, owners: Mapping[str, str]) -> str | None:
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node) and source.op == "call_function" and source.target in (QUANTIZE, DEQUANTIZE):
        source = source.args[0]
    if isinstance(source, fx.Node) and source.name in owners:
        return owners[source.name]
    return None


def onnx_owners(model: onnx.ModelProto, gm: fx.GraphModule, owners: Mapping[str, str]) -> dict[str, str]:
    """ONNX node name -> quantized op, through the graph op each node's doc_string names.  Also covers the float
    twin's clamps: `strip_qdq` turns a Q/DQ pair whose range starts at 0 (a ReLU the quantizer absorbed) into a
    Clip named "<Q output>_clamp", which belongs to the op whose output it clamps."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for node in model.graph.node:
        if not node.doc_string.startswith(SOURCE_OP_PREFIX):
            continue
        graph_op = node.doc_string[len(SOURCE_OP_PREFIX) :]
        if graph_op in owners:
            out[node.name] = owners[graph_op]
        if node.op_type == "QuantizeLinear" and graph_op in nodes:
            producer = _producer_owner(nodes[graph_op], owners)
            if producer:
                out[f"{node.output[0]}_clamp"] = producer
    return out


def _kernel_owner(kernel: Kernel, owner_of: Mapping[str, str]) -> str | None:
    """The quantized op a kernel belongs to: that of the first ONNX node it executes that has one (OpenVINO lists
    the node a fused primitive computes first, then the Q/DQ folded into it)."""
    return next((owner_of[s] for s in kernel.sources if s in owner_of), None)


def per_op_ms(profile: KernelProfile, owner_of: Mapping[str, str]) -> tuple[dict[str, tuple[float, float]], float]:
    """Quantized op -> (ms, Q/DQ ms) per run, and the ms of layout kernels tied to no ONNX node."""
    times: dict[str, tuple[float, float]] = {}
    unattributed = 0.0
    for k in profile.kernels:
        owner = _kernel_owner(k, owner_of)
        if owner is None:
            if not k.sources and k.category is OpCategory.LAYOUT:
                unattributed += k.ms
            continue
        ms, qdq = times.get(owner, (0.0, 0.0))
        times[owner] = (ms + k.ms, qdq + (k.ms if k.category in _QDQ else 0.0))
    return times, unattributed


def compare_ops(
    int8: KernelProfile,
    fp32: KernelProfile,
    owner_of: Mapping[str, str],
    modules: Mapping[str, str] | None = None,
    *,
    margin: float = 0.1,
    min_extra_ms: float = 0.002,
) -> SpeedReport:
    """The per-op report from an int8 and an fp32 profile of the same model (same ONNX node names) and the ONNX
    node -> quantized op map.  Ops with no float kernel of their own (fused into a neighbour in fp32) are listed
    as unmatched instead of compared."""
    int8_ops, unattributed = per_op_ms(int8, owner_of)
    fp32_ops, _ = per_op_ms(fp32, owner_of)
    ops, unmatched = [], []
    for op, (ms, qdq) in int8_ops.items():
        if op not in fp32_ops:
            unmatched.append(op)
            continue
        module = (modules or {}).get(op, "")
        ops.append(OpTime(op=op, module=module, int8_ms=ms, qdq_ms=qdq, fp32_ms=fp32_ops[op][0]))
    return SpeedReport(
        backend=int8.backend,
        batch=int8.batch,
        ops=tuple(ops),
        int8_wall_ms=int8.wall_ms,
        fp32_wall_ms=fp32.wall_ms,
        unattributed_ms=unattributed,
        unmatched=tuple(unmatched),
        margin=margin,
        min_extra_ms=min_extra_ms,
    )


def _average(profiles: list[KernelProfile]) -> KernelProfile:
    """Kernel-wise mean of several profiles of one model (rounds interleaved with the other model)."""
    sums: dict[str, list] = {}
    for p in profiles:
        for k in p.kernels:
            sums.setdefault(k.name, [k, 0.0])[1] += k.ms
    kernels = tuple(replace(k, ms=total / len(profiles)) for k, total in sums.values())
    wall = float(np.mean([p.wall_ms for p in profiles]))
    return replace(profiles[0], kernels=kernels, wall_ms=wall, runs=sum(p.runs for p in profiles))


def measure_speed(
    qm,
    *,
    batch: int = 1,
    backend: Backend | str = Backend.ORT,
    threads: int = 2,
    runs: int = 20,
    rounds: int = 2,
    margin: float = 0.1,
    onnx_path: str | Path | None = None,
) -> SpeedReport:
    """Profile the QuantizedModel's ONNX export and its float twin (Q/DQ stripped) at `batch`, `rounds` times each
    in alternation, and compare every quantized op.  `onnx_path`: an existing export of `qm` (else one is written
    to a temporary folder)."""
    backend = Backend(backend)
    options = RuntimeOptions(threads=threads)
    owners = op_owners(qm.graph_module, qm.placement.quantized_ops)
    modules = {n.name: module_path(n) for n in qm.graph_module.graph.nodes if n.name in qm.placement.quantized_ops}
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(onnx_path) if onnx_path else Path(tmp) / "int8.onnx"
        if not onnx_path:
            qm.export_onnx(int8_path, check=False)
        model = onnx.load(int8_path)
        fp32_path = Path(tmp) / "fp32.onnx"
        onnx.save(strip_qdq(model), fp32_path)
        feeds = model_feeds(model, batch)
        profiles: dict[str, list[KernelProfile]] = {"int8": [], "fp32": []}
        for i in range(max(rounds, 1)):
            order = [("int8", int8_path), ("fp32", fp32_path)]
            for label, path in order if i % 2 == 0 else reversed(order):
                profiles[label].append(profile_kernels(path, backend, feeds, options=options, runs=runs))
    return compare_ops(
        _average(profiles["int8"]),
        _average(profiles["fp32"]),
        onnx_owners(model, qm.graph_module, owners),
        modules,
        margin=margin,
    )


def slow_modules(report: SpeedReport, qm) -> tuple[tuple[str, ...], list[str]]:
    """Module paths to keep float for the report's slow ops (`QuantConfig.keep_float` works on modules), and a
    note for each slow op that cannot be kept float alone (top level, or its module holds other int8 ops)."""
    modules = {n.name: module_path(n) for n in qm.graph_module.graph.nodes if n.name in qm.placement.quantized_ops}
    slow = {o.op for o in report.slow_ops}
    keep, notes = [], []
    for op in sorted(slow, key=list(modules).index):
        module = modules.get(op, "")
        others = [o for o, m in modules.items() if o not in slow and m and (m == module or m.startswith(module + "."))]
        if not module or others:
            notes.append(f"{op} is not kept float: its module ({module or 'top level'}) also holds fast int8 ops")
        elif module not in keep:
            keep.append(module)
    return tuple(keep), notes


def quantize_without_slow_ops(
    model,
    calibration_data,
    example_inputs=None,
    *,
    config=None,
    batch: int = 1,
    backend: Backend | str = Backend.ORT,
    threads: int = 2,
    margin: float = 0.1,
    progress: bool = False,
):
    """Speed-driven fallback: quantize, profile every quantized op against its float version, and quantize again
    with the modules of the ops whose int8 version is slower kept float (`QuantConfig.keep_float`).

    Returns the QuantizedModel (its `speed` attribute holds the report measured on it, `summary()` prints it) and
    the report of the first quantization (which ops were slow, by how much)."""
    from eightbit.api import quantize
    from eightbit.config import QuantConfig

    config = config or QuantConfig()
    qm = quantize(model, calibration_data, example_inputs, config=config, progress=progress)
    first = measure_speed(qm, batch=batch, backend=backend, threads=threads, margin=margin)
    keep, notes = slow_modules(first, qm)
    if keep:
        config = replace(config, keep_float=tuple(dict.fromkeys((*config.keep_float, *keep))))
        qm = quantize(model, calibration_data, example_inputs, config=config, progress=progress)
        qm.notes.append(f"kept float because their int8 version was slower ({Backend(backend).value}): {keep}")
    qm.notes.extend(notes)
    qm.speed = measure_speed(qm, batch=batch, backend=backend, threads=threads, margin=margin) if keep else first
    return qm, first
