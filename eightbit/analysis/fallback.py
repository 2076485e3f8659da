"""Accuracy-driven fallback: keep the fewest ops float until the user's metric is within an allowed drop of the
float model's (`qm.fallback(metric, max_drop=..., out=...)`, `eightbit analyze --max-drop`).

Candidates are prefixes of the sensitivity ranking (`analysis.layers`): "the k most sensitive ops float".  The
search doubles k (1, 2, 4, ...) until the target is met, then bisects between the last k that failed and the
first that passed, so it costs 2 + about 2 log2(k) metric evaluations (the float model and the full int8 model
first).  It assumes the metric improves as more ops stay float; each candidate reuses the int8 model's encodings
(`Reference.variant`), nothing is recalibrated.

Every evaluation is logged (`log.jsonl` in the output folder) and each new best candidate is written at once to
`best/` (the ONNX model, its encodings and the keep-float list, replaced as one folder), so a run that is
interrupted, fails inside the metric or runs out of its time budget keeps its best result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from eightbit.analysis.layers import _replace_folder, analyze
from eightbit.analysis.reference import Reference
from eightbit.export.onnx import ParityError
from eightbit.fileio import atomic_path
from eightbit.model import QuantizedModel, float_model_of

BEST = "best"
LOG = "log.jsonl"
KEEP_FLOAT = "keep_float.json"


@dataclass
class Candidate:
    """One evaluated model: the ops kept float (the k most sensitive) and its metric."""

    index: int  # evaluation number (0: the float model)
    float_ops: list[str]
    metric: float
    meets: bool
    seconds: float  # building the variant and evaluating the metric


@dataclass
class FallbackResult:
    """What the search found.  `model` is the best candidate (None if none met the target and none beat the
    int8 model); `evaluations` counts every metric call, the float model's included."""

    float_metric: float
    target: float
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    model: QuantizedModel | None = None
    stopped: str = ""
    out: Path | None = None

    @property
    def evaluations(self) -> int:
        return len(self.candidates)

    @property
    def met(self) -> bool:
        return self.best is not None and self.best.meets

    def summary(self) -> str:
        lines = [
            f"float metric {self.float_metric:.4f}, target >= {self.target:.4f}; {self.evaluations} metric "
            f"evaluations; {self.stopped}"
        ]
        for c in self.candidates:
            ops = "float model" if c.index == 0 else f"{len(c.float_ops)} ops float"
            lines.append(f"  #{c.index}: {ops}: {c.metric:.4f} {'meets' if c.meets else 'below'} ({c.seconds:.1f} s)")
        if self.best is not None:
            best = self.best
            lines.append(f"best: {len(best.float_ops)} ops float {best.float_ops}, metric {best.metric:.4f}")
        return "\n".join(lines)


def accuracy_fallback(
    qm: QuantizedModel,
    metric: Callable[[nn.Module], float],
    *,
    max_drop: float,
    out: str | Path,
    model: nn.Module | None = None,
    ranking: list[str] | None = None,
    data=None,
    time_budget: float | None = None,
    export: bool = True,
    progress: bool = True,
) -> FallbackResult:
    """Keep the fewest of `qm`'s most sensitive ops float until `metric` (a function of a model, higher is better)
    is at least its value on the float `model` minus `max_drop`.

    ranking: op names, most sensitive first (e.g. `qm.analyze(data).ranking`); computed from `data` if not given.
    out: a folder (created if missing; its parent must exist) for `log.jsonl` and `best/` (model.onnx when
        `export`, encodings.json, keep_float.json); reload the best model with `load_best`.
    time_budget: seconds after which no new candidate is evaluated (the best so far is kept).
    """
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0 (the allowed metric drop), got {max_drop}")
    out = _output_folder(out)
    model = model if model is not None else float_model_of(qm)
    ref = Reference(qm, model)
    if ranking is None:
        if data is None:
            raise ValueError("pass ranking (e.g. qm.analyze(data).ranking) or data to compute it from")
        ranking = analyze(qm, data, model, progress=progress).ranking
    unknown = [op for op in ranking if op not in ref.ops]
    if unknown:
        raise ValueError(f"ranking names ops that are not int8 in this model: {unknown[:4]}; valid: {ref.ops[:8]}")
    search = _Search(qm, ref, metric, out, export, time_budget, ranking)
    float_model = model if model is not None else float_model_of(qm)
    try:
        search.run(float_model, max_drop)
    except BaseException as exc:  # the best so far is on disk already; say why the search ended, then re-raise
        search.result.stopped = f"interrupted: {type(exc).__name__}: {exc}"
        search.write_log()
        raise
    search.write_log()
    return search.result


class _Search:
    def __init__(self, qm, ref: Reference, metric, out: Path, export: bool, time_budget, ranking) -> None:
        self.qm, self.ref, self.metric, self.out, self.export = qm, ref, metric, out, export
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        self.ranking = list(ranking)
        self.result = FallbackResult(float("nan"), float("nan"), out=out)
        self.tried: dict[int, Candidate] = {}

    def run(self, float_model: nn.Module, max_drop: float) -> None:
        start = time.perf_counter()
        value = float(self.metric(float_model))
        self.result.float_metric, self.result.target = value, value - max_drop
        self.result.candidates.append(Candidate(0, [], value, True, time.perf_counter() - start))
        self.write_log()
        n = len(self.ranking)
        if self.evaluate(0) is None or self.tried[0].meets:
            return self._stop("the int8 model meets the target" if 0 in self.tried else None)
        failed, passed, k = 0, None, 1
        while passed is None and k <= n:  # doubling: 1, 2, 4, ... ops float, then all of them
            if self.evaluate(k) is None:
                return self._stop(None)
            failed, passed = (failed, k) if self.tried[k].meets else (k, None)
            k = n if k < n and 2 * k > n else 2 * k
        if passed is None:
            return self._stop(f"not met even with all {n} ranked ops float")
        while passed - failed > 1:  # bisection between the last failure and the first success
            mid = (failed + passed) // 2
            if self.evaluate(mid) is None:
                return self._stop(None)
            failed, passed = (failed, mid) if self.tried[mid].meets else (mid, passed)
        self._stop(f"met with {passed} ops float")

    def _stop(self, reason: str | None) -> None:
        self.result.stopped = reason or "time budget spent"

    def evaluate(self, k: int) -> Candidate | None:
        """The metric of the model with the k most sensitive ops float (None once the time budget is spent)."""
        if k in self.tried:
            return self.tried[k]
        if self.deadline is not None and time.monotonic() > self.deadline:
            return None
        start = time.perf_counter()
        ops = self.ranking[:k]
        candidate_model = self.qm if k == 0 else self.ref.variant(ops)
        value = float(self.metric(candidate_model))
        found = Candidate(len(self.result.candidates), ops, value, value >= self.result.target, 0.0)
        found.seconds = time.perf_counter() - start
        self.tried[k] = found
        self.result.candidates.append(found)
        if _better(found, self.result.best):
            self.result.best, self.result.model = found, candidate_model
            self.write_best(found, candidate_model)
        self.write_log()
        return found

    def write_log(self) -> None:
        lines = [json.dumps({"event": "candidate", **asdict(c)}) for c in self.result.candidates]
        summary = {k: v for k, v in asdict(self.result).items() if k not in ("candidates", "best", "model", "out")}
        lines.append(json.dumps({"event": "status", **summary, "evaluations": self.result.evaluations}))
        with atomic_path(self.out / LOG, overwrite=True) as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    def write_best(self, found: Candidate, model: QuantizedModel) -> None:
        """Replace `best/` by this candidate in one rename: model.onnx, encodings.json, keep_float.json."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{BEST}.", dir=self.out))
        note = None
        try:
            if self.export:
                try:
                    model.export_onnx(tmp / "model.onnx")
                except ParityError as exc:  # still keep the encodings; say why there is no ONNX file
                    note = f"ONNX export refused: {exc}"
            model.save_encodings(tmp / "encodings.json")
            info = {
                "keep_float_nodes": list(model.config.keep_float_nodes),
                "float_ops_added": found.float_ops,
                "metric": found.metric,
                "meets": found.meets,
                "float_metric": self.result.float_metric,
                "target": self.result.target,
                "evaluation": found.index,
                "note": note,
            }
            (tmp / KEEP_FLOAT).write_text(json.dumps(info, indent=1))
            _replace_folder(tmp, self.out / BEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _better(found: Candidate, best: Candidate | None) -> bool:
    """Meeting the target beats missing it; among those that meet, fewer float ops; among misses, a higher metric."""
    if best is None:
        return True
    if found.meets != best.meets:
        return found.meets
    if found.meets:
        return len(found.float_ops) < len(best.float_ops)
    return found.metric > best.metric


def _output_folder(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; give a folder for the fallback's log and best model")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first")
    out.mkdir(exist_ok=True)
    return out


def load_best(out: str | Path, model: nn.Module, example_inputs, config=None) -> QuantizedModel:
    """The best model a fallback wrote to `out`, rebuilt from `model` (the float model) with its encodings and
    keep-float list; `config`: the config the int8 model was made with (default QuantConfig())."""
    from eightbit import QuantConfig, quantize

    best = Path(out) / BEST
    info = json.loads((best / KEEP_FLOAT).read_text())
    config = replace(config or QuantConfig(), keep_float_nodes=tuple(info["keep_float_nodes"]))
    return quantize(model, encodings=best / "encodings.json", example_inputs=example_inputs, config=config)
