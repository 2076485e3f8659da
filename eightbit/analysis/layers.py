"""Which layers lose accuracy: per-layer error of a quantized model on a few batches (`qm.analyze(data)`,
`eightbit analyze`).

- alone: each int8 op with everything else float (its input/output tensor groups and its weight quantized),
  scored by the SQNR and cosine of the model output against the float model: the sensitivity ranking.  One
  switchable graph serves every op (`analysis.reference`), so the model is never re-quantized.
- cumulative: the full int8 model; at each op's output the SQNR against float (where the error grows) and the
  error the op adds over its inputs' (where it enters); per tensor group the range chosen against the range seen,
  the share of values clipped, the codes used and the tensor's SQNR.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eightbit import qmath
from eightbit.analysis.figures import pyplot, save_png
from eightbit.analysis.reference import SQNR_CAP_DB, QuantSwitch, Reference, _flat, power_db
from eightbit.config import Scheme

HISTOGRAM_SAMPLES = 20_000  # values kept per tensor group and batch for the histograms


@dataclass
class OpRow:
    """One int8 op.  alone_*: the model output with only this op int8; cumulative_* / added_db: in the full int8
    model, the SQNR at this op's output and the error it adds over its inputs' (both in dB, lower is worse)."""

    name: str
    kind: str
    alone_sqnr_db: float
    alone_cosine: float
    cumulative_sqnr_db: float
    added_db: float
    groups: list[str] = field(default_factory=list)


@dataclass
class TensorRow:
    """One quantized tensor group: chosen range vs the float values seen, clipping and codes, and its SQNR in the
    full int8 model (the quantized value against the float model's value at the same place)."""

    group: str
    tensor: str
    chosen: tuple[float, float]
    observed: tuple[float, float]
    clipped: float | None  # share of values outside the chosen range
    codes_used: int | None
    codes_available: int | None
    sqnr_db: float


@dataclass
class LayerAnalysis:
    """The result of `analyze`: rows per op and per tensor group, the ranking, tables and figures."""

    model_name: str
    ops: list[OpRow]
    tensors: list[TensorRow]
    output_sqnr_db: float  # the full int8 model's output against float
    output_cosine: float
    reproduction_db: float  # the rebuilt graph against the quantized model itself (check)
    samples: int
    histograms: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # group -> float values sample

    @property
    def ranking(self) -> list[str]:
        """Op names, most sensitive first (lowest output SQNR when int8 alone)."""
        return [r.name for r in sorted(self.ops, key=lambda r: r.alone_sqnr_db)]

    @property
    def cumulative_ranking(self) -> list[str]:
        """Op names, the one that adds the most error in the full int8 model first."""
        return [r.name for r in sorted(self.ops, key=lambda r: r.added_db)]

    def headline(self) -> str:
        return (
            f"{self.model_name}: full int8 model output SQNR {self.output_sqnr_db:.1f} dB, cosine "
            f"{self.output_cosine:.4f} ({self.samples} samples); {len(self.ops)} int8 ops; most sensitive: "
            + ", ".join(self.ranking[:3])
        )

    def _op_rows(self) -> tuple[list[str], list[list[str]]]:
        rank = {n: i + 1 for i, n in enumerate(self.ranking)}
        head = ["rank", "op", "kind", "alone SQNR dB", "alone cos", "int8 SQNR dB", "added dB"]
        rows = [
            [str(rank[r.name]), r.name, r.kind, f"{r.alone_sqnr_db:.1f}", f"{r.alone_cosine:.4f}"]
            + [f"{r.cumulative_sqnr_db:.1f}", f"{r.added_db:.1f}"]
            for r in sorted(self.ops, key=lambda r: rank[r.name])
        ]
        return head, rows

    def _tensor_rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["group", "tensor", "chosen range", "observed range", "clipped %", "codes used", "SQNR dB"]
        rows = [
            [
                t.group,
                t.tensor,
                f"[{t.chosen[0]:.4g}, {t.chosen[1]:.4g}]",
                f"[{t.observed[0]:.4g}, {t.observed[1]:.4g}]",
                "" if t.clipped is None else f"{100 * t.clipped:.3f}",
                "" if t.codes_used is None else f"{t.codes_used}/{t.codes_available}",
                f"{t.sqnr_db:.1f}",
            ]
            for t in self.tensors
        ]
        return head, rows

    def table(self) -> str:
        """The op and tensor tables for a terminal."""
        parts = [self.headline(), ""]
        for head, rows in (self._op_rows(), self._tensor_rows()):
            widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
            parts += ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *rows]]
            parts.append("")
        return "\n".join(parts)

    def markdown(self, figures: list[str] = ()) -> str:
        """A Markdown report: headline, figures (paths relative to the report), op table, tensor table."""
        lines = [f"# Per-layer error: {self.model_name}", "", self.headline(), ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures] + ([""] if figures else [])
        lines += [
            "alone: only this op int8 (its input/output tensors and weight quantized), the rest float: SQNR and "
            "cosine of the model output. int8 SQNR: at this op's output in the full int8 model. added: the error "
            "this op adds over its inputs', in dB (lower is worse).",
            "",
        ]
        for title, (head, rows) in (("Ops", self._op_rows()), ("Tensor groups", self._tensor_rows())):
            lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)

    def figures(self, folder: str | Path, worst: int = 4) -> list[Path]:
        """Write the PNGs into `folder`: SQNR bars per op (alone, and in the full int8 model) and, for the
        `worst` most sensitive ops, the histogram of their worst input/output tensor with the chosen range."""
        folder = Path(folder)
        paths = [_alone_bars(self, folder / "sqnr_alone.png"), _cumulative_bars(self, folder / "sqnr_int8.png")]
        by_name = {r.name: r for r in self.ops}
        tensors = {t.group: t for t in self.tensors}
        for i, name in enumerate(self.ranking[:worst], 1):
            groups = [g for g in by_name[name].groups if g in self.histograms and g in tensors]
            if groups:
                group = min(groups, key=lambda g: tensors[g].sqnr_db)
                path = folder / f"hist_{i}_{_safe(name)}.png"
                paths.append(_histogram(self, name, tensors[group], self.histograms[group], path))
        return paths

    def save(self, folder: str | Path, *, worst: int = 4, overwrite: bool = False) -> Path:
        """Write report.md, table.txt, analysis.json and the PNGs into `folder`, all at once: the files are made in
        a temporary folder beside it, which then takes its place (an existing folder only with overwrite)."""
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} already exists; choose another folder or pass overwrite=True (--force)")
        if not folder.parent.is_dir():
            raise FileNotFoundError(f"the folder {folder.parent} does not exist; create it first")
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            figures = [p.name for p in self.figures(tmp, worst)]
            (tmp / "report.md").write_text(self.markdown(figures))
            (tmp / "table.txt").write_text(self.table())
            (tmp / "analysis.json").write_text(json.dumps(self.to_dict(), indent=1))
            _replace_folder(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "histograms"}
        out["ranking"] = self.ranking
        return out


def analyze(
    qm,
    data,
    model=None,
    *,
    batches: int = 4,
    progress: bool = True,
    input_fn=None,
    name: str | None = None,
) -> LayerAnalysis:
    """Per-layer error of `qm` on the first `batches` batches of `data` (model inputs, or batches that
    `input_fn` maps to them), against `model`, the float model it was quantized from (default: the one given to
    `quantize`, if the caller still holds it).  Costs 2 + (number of int8 ops) forward passes per batch."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    ref = Reference(qm, model, input_fn)
    model_name = name or ref.model_name
    inputs = ref.batches(data, batches)
    reproduction = ref.check(inputs[0])
    acc = _Accumulators(ref)
    for args in inputs:
        acc.add_batch(args)
    alone = {}
    for op in tqdm(ref.ops, desc="layers (one int8 at a time)", disable=not progress):
        ref.set_int8({op})
        signal = noise = cosine = 0.0
        for args, reference in zip(inputs, acc.float_outputs, strict=True):
            got = _flat(ref.run(args))
            signal += float(reference.pow(2).sum())
            noise += float((got - reference).pow(2).sum())
            cosine += float(torch.nn.functional.cosine_similarity(reference, got, dim=1).sum())
        alone[op] = (power_db(signal, noise), cosine / acc.samples)
    ref.set_int8(set())
    rows = [
        OpRow(op, ref.prepared.placement.quantized_ops[op].kind.value, *alone[op], *acc.op_cumulative(op))
        for op in ref.ops
    ]
    for row in rows:
        row.groups = list(ref.op_groups[row.name])
    return LayerAnalysis(
        model_name,
        rows,
        acc.tensor_rows(),
        power_db(acc.out_signal, acc.out_noise),
        acc.out_cosine / acc.samples,
        reproduction,
        acc.samples,
        acc.histograms(),
    )


class _Accumulators:
    """Sums over batches of the float and full-int8 runs: output, per-op and per-tensor-group statistics."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.float_outputs: list[torch.Tensor] = []
        self.samples = 0
        self.out_signal = self.out_noise = self.out_cosine = 0.0
        self.op_out = {op: [0.0, 0.0] for op in ref.ops}  # signal, noise at the op's output
        self.op_in = {op: [[0.0, 0.0] for _ in taps] for op, taps in ref.input_taps.items()}
        self.groups = {g: _GroupStats(s) for g, s in ref.switches.items()}
        self._generator = torch.Generator().manual_seed(0)

    def _run(self, ops_on) -> tuple[torch.Tensor, dict, dict, dict]:
        ref = self.ref
        ref.set_int8(ops_on)
        ref.record(True)
        out = _flat(ref.run(self._args))
        seen = {g: list(s.seen) for g, s in ref.switches.items()}
        taps = {op: t.value for op, t in ref.taps.items()}
        inputs = {op: [t.value for t in ts] for op, ts in ref.input_taps.items()}
        ref.record(False)
        return out, seen, taps, inputs

    @torch.no_grad()
    def add_batch(self, args: tuple) -> None:
        self._args = args
        f_out, f_seen, f_taps, f_in = self._run(set())
        q_out, q_seen, q_taps, q_in = self._run(None)
        self.float_outputs.append(f_out)
        self.samples += f_out.shape[0]
        self.out_signal += float(f_out.pow(2).sum())
        self.out_noise += float((q_out - f_out).pow(2).sum())
        self.out_cosine += float(torch.nn.functional.cosine_similarity(f_out, q_out, dim=1).sum())
        for op in self.ref.ops:
            _add_power(self.op_out[op], f_taps[op], q_taps[op])
            for sums, f, q in zip(self.op_in[op], f_in[op], q_in[op], strict=True):
                _add_power(sums, f, q)
        for group, stats in self.groups.items():
            stats.add([x for x, _ in f_seen[group]], [y for _, y in q_seen[group]], self._generator)

    def op_cumulative(self, op: str) -> tuple[float, float]:
        """(SQNR at the op's output, error it adds in dB) in the full int8 model.  Noise-to-signal ratios add
        to first order, so the op's own share is its output's ratio less the worst input's."""
        signal, noise = self.op_out[op]
        out_ratio = noise / max(signal, 1e-300)
        in_ratio = max((n / max(s, 1e-300) for s, n in self.op_in[op]), default=0.0)
        return power_db(signal, noise), power_db(1.0, max(out_ratio - in_ratio, 0.0))

    def tensor_rows(self) -> list[TensorRow]:
        return [stats.row(group, self.ref.prepared.placement.groups[group][0]) for group, stats in self.groups.items()]

    def histograms(self) -> dict[str, torch.Tensor]:
        return {g: torch.cat(s.sample) for g, s in self.groups.items() if s.sample}


class _GroupStats:
    """Streaming statistics of one tensor group's float values (range, clipping, codes) and int8 error."""

    def __init__(self, switch: QuantSwitch) -> None:
        self.switch = switch
        enc = switch.enc
        self.uniform = enc.scheme == Scheme.UNIFORM.value
        self.lo = math.inf
        self.hi = -math.inf
        self.count = self.clipped = 0
        self.signal = self.noise = 0.0
        self.codes = torch.zeros(enc.qmax - enc.qmin + 1, dtype=torch.bool) if self.uniform else None
        self.sample: list[torch.Tensor] = []

    def add(self, floats: list[torch.Tensor], int8s: list[torch.Tensor], generator: torch.Generator) -> None:
        enc, switch = self.switch.enc, self.switch
        for x, y in zip(floats, int8s, strict=True):
            x = x.float()
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
            self.count += x.numel()
            _add_power(s := [self.signal, self.noise], x, y)
            self.signal, self.noise = s
            flat = x.reshape(-1)
            pick = torch.randperm(flat.numel(), generator=generator)[:HISTOGRAM_SAMPLES]
            self.sample.append(flat[pick].clone())
            if not self.uniform:
                continue
            axis = None if enc.axis is None else enc.axis
            scale = qmath.broadcast(switch.scale, x, axis)
            zero = qmath.broadcast(switch.zero_point, x, axis).float()
            raw = torch.round(x / scale) + zero
            self.clipped += int(((raw < enc.qmin) | (raw > enc.qmax)).sum())
            codes = switch.quantize(x).reshape(-1).long() - enc.qmin
            self.codes |= torch.bincount(codes, minlength=self.codes.numel()).bool()

    def chosen(self) -> tuple[float, float]:
        enc = self.switch.enc
        if not self.uniform:
            return (-65504.0, 65504.0)
        lows = [(enc.qmin - z) * s for s, z in zip(enc.scale, enc.zero_point, strict=True)]
        highs = [(enc.qmax - z) * s for s, z in zip(enc.scale, enc.zero_point, strict=True)]
        return (min(lows), max(highs))

    def row(self, group: str, tensor: str) -> TensorRow:
        return TensorRow(
            group,
            tensor,
            self.chosen(),
            (self.lo, self.hi),
            self.clipped / max(self.count, 1) if self.uniform else None,
            int(self.codes.sum()) if self.uniform else None,
            self.codes.numel() if self.uniform else None,
            power_db(self.signal, self.noise),
        )


def _add_power(sums: list[float], reference: torch.Tensor | None, candidate: torch.Tensor | None) -> None:
    if reference is None or candidate is None:
        return
    reference, candidate = reference.double(), candidate.double()
    sums[0] += float(reference.pow(2).sum())
    sums[1] += float((candidate - reference).pow(2).sum())


# -- figures ------------------------------------------------------------------------------------------------------


def _bar_figure(n: int):
    plt = pyplot()
    return plt.subplots(figsize=(8, max(3.0, 0.2 * n + 1.2)))


def _alone_bars(result: LayerAnalysis, path: Path) -> Path:
    rows = result.ops
    worst = set(result.ranking[:4])
    fig, ax = _bar_figure(len(rows))
    values = [min(r.alone_sqnr_db, SQNR_CAP_DB) for r in rows]
    ax.barh(range(len(rows)), values, color=["tab:red" if r.name in worst else "tab:blue" for r in rows])
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(
        xlabel="model output SQNR vs float (dB, higher is better)",
        ylabel="op (graph order)",
        title=f"{result.model_name}: each op int8 alone (rest float); red: 4 most sensitive",
    )
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def _cumulative_bars(result: LayerAnalysis, path: Path) -> Path:
    rows = result.ops
    fig, ax = _bar_figure(len(rows))
    y = range(len(rows))
    ax.barh(y, [r.cumulative_sqnr_db for r in rows], color="tab:blue", label="SQNR at the op's output")
    added = [min(r.added_db, SQNR_CAP_DB) for r in rows]
    ax.plot(added, y, "o", color="tab:red", ms=4, label="SQNR of the error this op adds")
    ax.set_yticks(y, [r.name for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(
        xlabel="SQNR vs float (dB, higher is better)",
        ylabel="op (graph order)",
        title=f"{result.model_name}: full int8 model, error by op (output {result.output_sqnr_db:.1f} dB)",
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def _histogram(result: LayerAnalysis, op: str, row: TensorRow, values: torch.Tensor, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = min(row.chosen[0], row.observed[0]), max(row.chosen[1], row.observed[1])
    ax.hist(values.double().numpy(), bins=200, range=(lo, hi) if hi > lo else None, color="tab:blue", log=True)
    for x, label in ((row.chosen[0], "chosen range"), (row.chosen[1], None)):
        ax.axvline(x, color="tab:red", linestyle="--", label=label)
    clipped = "" if row.clipped is None else f", {100 * row.clipped:.2f}% clipped"
    codes = "" if row.codes_used is None else f", {row.codes_used}/{row.codes_available} codes used"
    ax.set(
        xlabel=f"value of tensor {row.tensor} ({row.group}, float model)",
        ylabel="count (log scale)",
        title=f"{result.model_name}: {op}\ntensor SQNR {row.sqnr_db:.1f} dB{clipped}{codes}",
    )
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the folder `new` in the place of `folder` (renames only; the old one is removed afterwards)."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.replace(folder, old / folder.name)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
