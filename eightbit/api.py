"""The public entry point: `quantize(model, calibration_data, example_inputs, config=...)`."""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from eightbit import saved
from eightbit.calibration import adaround
from eightbit.calibration.calibrate import OBSERVER_PREFIX, insert_observers, run_calibration
from eightbit.calibration.encodings import Encoding, activation_encodings
from eightbit.calibration.health import warn_collapsed_ranges
from eightbit.calibration.methods import lookup_method
from eightbit.calibration.observers import InputSamples, Observer, Statistic
from eightbit.calibration.refine import output_aware_ranges
from eightbit.config import QuantConfig, Relu6Handling, overflow_fix_active
from eightbit.convert import convert
from eightbit.fileio import atomic_path
from eightbit.graph.capture import Captured, _with_batch, capture
from eightbit.graph.macs import count_macs, warn_if_mostly_float
from eightbit.graph.placement import Placement, check_keep_float, check_keep_float_nodes, place
from eightbit.graph.transforms import fold_batchnorm, fuse_pad_into_conv, normalize_spellings
from eightbit.graph.transforms.attention import decompose_attention
from eightbit.graph.transforms.equalize import equalize_graph, record_channel_max, relu6_layers
from eightbit.graph.transforms.smooth_quant import apply_smoothing, record_channel_absmax, smoothing_targets
from eightbit.inputs import (
    InputBinder,
    InputFn,
    check_inputs_used,
    float32_model,
    integer_image_error,
    kv_cache_notes,
)
from eightbit.model import QuantizedModel, remember_float_model
from eightbit.runtime import hw


class Calibration:
    """The statistics of one calibration pass over a captured model.

    `quantize(config)` turns them into a `QuantizedModel` for any method whose statistics were collected (see
    `calibrate(..., methods=...)`), without another pass over the data: output-aware methods (`eq`,
    `cross_entropy`) only replay the few input samples kept.  `save`/`load` keep them on disk (samples
    included), so another method can be tried in a later session.
    """

    def __init__(
        self,
        prepared: _Prepared,
        observers: dict[str, Observer],
        collected: frozenset[Statistic],
        samples: InputSamples | None = None,
    ):
        self._prepared = prepared
        self._observers = observers
        self.collected = collected
        self.samples = samples
        self.progress = True  # progress bars for long steps (AdaRound)

    @property
    def config(self) -> QuantConfig:
        return self._prepared.config

    def quantize(self, config: QuantConfig | None = None) -> QuantizedModel:
        """The quantized model for `config` (default: the calibration's own); placement options must match."""
        config = config or self.config
        if _placement_key(config) != _placement_key(self.config):
            raise ValueError(
                "this calibration was collected with other placement options (keep_float, "
                "keep_float_ops, fold_batchnorm, quantize_outputs, activation granularity); "
                "run eightbit.calibrate again with this config"
            )
        for name in dict.fromkeys((config.activations.method, config.weights.method)):
            missing = sorted(s.value for s in lookup_method(name).needs - self.collected)
            if missing:
                raise ValueError(
                    f"method {name!r} needs statistics {missing} that this calibration did not collect; pass "
                    f"methods=[{name!r}] to eightbit.calibrate (with a new cache file, if one is used)"
                )
        quantized = self._quantize(config, copy.deepcopy(self._prepared))  # convert rewrites the graph in place
        warn_if_mostly_float(quantized.macs)
        return quantized

    def _quantize_once(self) -> QuantizedModel:
        """`quantize()` with the calibration's own config, consuming this calibration (no graph copy)."""
        return self._quantize(self.config, self._prepared)

    def _quantize(self, config: QuantConfig, prepared: _Prepared) -> QuantizedModel:
        observers = {g: prepared.gm.get_submodule(OBSERVER_PREFIX + g) for g in self._observers}
        fixed = prepared.placement.fixed_ranges  # ranges the target's kernels define (TFLite LOGISTIC/SOFTMAX)
        act = activation_encodings(observers, prepared.placement, config.activations, fixed)
        weight_ranges = None
        if lookup_method(config.activations.method).output_aware or lookup_method(config.weights.method).output_aware:
            act_ranges, weight_ranges = output_aware_ranges(
                prepared.gm,
                prepared.placement,
                observers,
                act,
                self._sample_batches(),
                config,
                overflow_fix=overflow_fix_active(config, hw.saturation_risk()),
            )
            act = activation_encodings(observers, prepared.placement, config.activations, {**act_ranges, **fixed})
        notes = warn_collapsed_ranges(observers, act, config.activations)
        if config.adaround is not None:
            return self._adaround(config, prepared, act, notes)
        return prepared.finish(act, config, weight_ranges, notes)

    def _adaround(self, config: QuantConfig, prepared: _Prepared, act: dict[str, Encoding], notes) -> QuantizedModel:
        """Learn the weights' rounding, put the learned weights in the graph and convert with the same ranges
        (so convert's rounding reproduces the learned codes); the decisions go into the weight encodings."""
        fix = overflow_fix_active(config, hw.saturation_risk())
        results = adaround.adaround_layers(
            prepared.gm,
            prepared.placement,
            act,
            self._sample_batches(),
            config,
            overflow_fix=fix,
            progress=self.progress,
        )
        learned = {k: r.weight for k, (r, _) in results.items()}
        adaround.apply_learned_weights(
            prepared.gm, prepared.placement, learned, act if config.bias_correction else None
        )
        ranges = saved.saved_weight_ranges(
            {"weights": {k: asdict(enc) for k, (_, enc) in results.items()}}, prepared.placement, prepared.gm
        )
        qm = prepared.finish(act, config, ranges, [*notes, adaround.summary_line(results)])
        for name, (result, _) in results.items():
            qm.weight_encodings[name].rounding = adaround.rounding_to_text(result.up)
        return qm

    def _sample_batches(self) -> list[tuple]:
        """The kept input samples as batches the captured graph accepts."""
        batches = [] if self.samples is None else self.samples.batches
        if batches and not self._prepared.captured.dynamic_batch:
            return list(_rebatch(iter(batches), _batch_size(self._prepared.args)))
        return list(batches)

    def save(self, path, *, overwrite: bool = False) -> None:
        """Save the statistics (atomically) for `calibrate(..., cache=path)` to reuse."""
        payload = {
            "version": saved.CACHE_VERSION,
            "weights": self._prepared.fingerprint,
            "groups": self._prepared.placement.groups,
            "collected": sorted(s.value for s in self.collected),
            "stats": {g: {s.value: dict(vars(c)) for s, c in o.stats.items()} for g, o in self._observers.items()},
            "samples": None if self.samples is None else [list(b) for b in self.samples.batches],
        }
        with atomic_path(path, overwrite) as tmp:
            torch.save(payload, tmp)

    def _load_stats(self, path: Path) -> None:
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable eightbit calibration cache: {exc}") from None
        saved.check_cache(payload, path, self._prepared.placement, self._prepared.fingerprint)
        for group, stats in payload["stats"].items():
            observer = self._observers[group]
            for name, state in stats.items():
                statistic = Statistic(name)
                if statistic in observer.stats:
                    vars(observer.stats[statistic]).update(state)
        self.collected = frozenset(Statistic(v) for v in payload["collected"])
        if payload.get("samples") is not None:
            self.samples = InputSamples(max(1, sum(_batch_size(tuple(b)) for b in payload["samples"])))
            for batch in payload["samples"]:
                self.samples.update(tuple(batch))


@dataclass
class _Prepared:
    """A captured, BN-folded graph with its placement: everything before statistics."""

    gm: fx.GraphModule
    captured: Captured
    placement: Placement
    config: QuantConfig
    args: tuple
    input_names: list[str]
    folded: int
    binder: InputBinder
    fingerprint: str
    notes: list[str] = field(default_factory=list)
    smooth_alpha: float | None = None
    source: weakref.ref | None = None  # the user's float model (for analysis), never kept alive by us

    def finish(
        self, act: dict[str, Encoding], config: QuantConfig, weight_ranges: dict | None = None, notes=()
    ) -> QuantizedModel:
        fix = overflow_fix_active(config, hw.saturation_risk())
        notes = list(notes)
        macs = count_macs(self.gm, self.placement)  # before convert renames the layers it rewrites
        weights = convert(
            self.gm, self.placement, act, config, overflow_fix=fix, weight_ranges=weight_ranges, notes=notes
        )
        example = _with_batch(self.args, 2) if self.captured.dynamic_batch else self.args
        quantized = QuantizedModel(
            self.gm,
            config=config,
            placement=self.placement,
            activations=act,
            weights=weights,
            captured=self.captured,
            example_args=example,
            input_names=self.input_names,
            call_plan=self.binder.plan,
            folded_batchnorms=self.folded,
            smooth_alpha=self.smooth_alpha,
            notes=[*self.notes, *notes],
            weights_fingerprint=self.fingerprint,
            macs=macs,
        )
        remember_float_model(quantized, self.source)
        return quantized


def _placement_key(config: QuantConfig) -> tuple:
    a = config.activations
    return (
        config.keep_float,
        config.keep_float_ops,
        config.keep_float_nodes,
        config.fold_batchnorm,
        config.quantize_outputs,
        config.smooth_quant,
        config.equalize,
        a.granularity,
        a.channel_axis,
        config.target,
    )


def _prepare(
    model: nn.Module, example_inputs, config: QuantConfig, input_fn: InputFn | None = None, *, from_data=False
) -> _Prepared:
    """Capture a float32 view of `model` with `example_inputs` (model inputs; with `from_data`, the first
    calibration batch, which goes through `input_fn`) and place Q/DQ.  Refuses misspelled keep_float names."""
    fingerprint = saved.weights_fingerprint(model)
    source = _weak(model)
    model, note, half = float32_model(model)
    binder = InputBinder(model, input_fn, model_dtype=half)
    args = binder.batch(example_inputs, 0) if from_data else binder.example(example_inputs)
    try:
        captured = capture(binder.plan.module(model), args, names=binder.names)
    except Exception as exc:
        error = integer_image_error(args, binder.names)
        if error is not None:
            raise error from exc
        raise
    binder.expect(args, captured.dynamic_axes)
    gm = captured.graph_module
    check_inputs_used(gm, binder.plan)
    check_keep_float(gm, config.keep_float, (name for name, _ in model.named_modules()))
    normalize_spellings(gm)  # one spelling per quantizable op (string padding, addmm, in-place ops...)
    folded = fold_batchnorm(gm) if config.fold_batchnorm else 0
    fuse_pad_into_conv(gm)
    decompose_attention(gm)
    check_keep_float_nodes(gm, config)
    notes = [*([note] if note else []), *kv_cache_notes(model, binder.plan, args)]
    placement = place(gm, config)
    return _Prepared(
        gm, captured, placement, config, args, binder.names, folded, binder, fingerprint, notes, source=source
    )


def _weak(model: nn.Module) -> weakref.ref | None:
    try:
        return weakref.ref(model)
    except TypeError:
        return None


def calibrate(
    model: nn.Module,
    calibration_data: Iterable,
    example_inputs=None,
    *,
    config: QuantConfig | None = None,
    methods: Iterable[str] = (),
    cache: str | Path | None = None,
    progress: bool = True,
    input_samples: int = 32,
    input_fn: InputFn | None = None,
) -> Calibration:
    """Capture `model` and collect, in one streaming pass, the statistics that the config's activation
    and weight methods and every method in `methods` need (output-aware methods also keep the first
    `input_samples` model inputs).

    cache: statistics are loaded from that file when it exists (no model run) and saved there otherwise.  A cache
        written by another eightbit format version, for another graph/config, or for other weights (a fingerprint
        of every parameter and buffer is stored) is refused with a ValueError that says which differs: delete it
        or pass another path to calibrate again (it is never silently reused, nor silently overwritten).
    input_fn: maps each calibration batch to the model's inputs (a tensor, a tuple of positional inputs or a dict
        of keyword inputs), e.g. `lambda batch: batch[0]` for (inputs, labels) pairs; see `eightbit.inputs`.
        `example_inputs`, when given, are model inputs already."""
    config = config or QuantConfig()
    if (config.smooth_quant is not None or config.equalize is not None) and iter(calibration_data) is calibration_data:
        raise ValueError(
            "SmoothQuant and equalization read calibration_data twice (channel ranges first, then calibration); "
            "pass a list or "
            "a DataLoader, not a one-shot iterator or generator"
        )
    from_data = example_inputs is None
    if from_data:
        example_inputs, calibration_data = _peek(calibration_data)
    prepared = _prepare(model, example_inputs, config, input_fn, from_data=from_data)
    if config.equalize is not None:
        _equalize(prepared, lambda: _calibration_batches(calibration_data, prepared), config)
    if config.smooth_quant is not None:
        _smooth(prepared, lambda: _calibration_batches(calibration_data, prepared), config)
    names = (config.activations.method, config.weights.method, *methods)
    needs = frozenset().union(*(lookup_method(m).needs for m in names))
    if config.adaround is not None:  # AdaRound learns from kept samples too
        needs, input_samples = needs | {Statistic.INPUT_SAMPLES}, max(input_samples, config.adaround.samples)
    observers = insert_observers(prepared.gm, prepared.placement, config.activations, needs)
    samples = InputSamples(input_samples) if Statistic.INPUT_SAMPLES in needs else None
    calibration = Calibration(prepared, observers, needs, samples)
    calibration.progress = progress
    if cache is not None and Path(cache).exists():
        calibration._load_stats(Path(cache))
        return calibration
    batches = _calibration_batches(calibration_data, prepared)
    # A moving average is defined over the user's own batches; a static-batch graph takes one batch size only.
    if Statistic.EMA_MINMAX not in needs and prepared.captured.dynamic_batch:
        batches = _merge_small_batches(batches, MERGED_BATCH)
    run_calibration(prepared.gm, batches, progress=progress, samples=samples)
    if cache is not None:
        calibration.save(cache)
    return calibration


def _calibration_batches(data: Iterable, prepared: _Prepared):
    batches = (prepared.binder.batch(batch, index) for index, batch in enumerate(data))
    if not prepared.captured.dynamic_batch:  # the graph accepts only the example's batch size
        batches = _rebatch(batches, _batch_size(prepared.args))
    return batches


# Calibration batches smaller than this are concatenated: one forward pass and one observer update per 8
# samples instead of per sample (ResNet-50: ~3x faster per sample), for the same min/max and histograms.
MERGED_BATCH = 8


def _merge_small_batches(batches, size: int):
    """Concatenate consecutive positional batches with the same non-batch shapes into batches of up to `size`
    samples (a batch that is already large enough, or shaped differently, passes through alone)."""
    pending: list[tuple] = []
    for args in batches:
        if pending and (
            _batch_size(args) + sum(map(_batch_size, pending)) > size or not _same_shapes(pending[0], args)
        ):
            yield _concat(pending)
            pending = []
        pending.append(args)
    if pending:
        yield _concat(pending)


def _same_shapes(a: tuple, b: tuple) -> bool:
    def key(args):
        return [(x.shape[1:], x.dtype) if isinstance(x, torch.Tensor) else x for x in args]

    return len(a) == len(b) and key(a) == key(b)


def _concat(parts: list[tuple]) -> tuple:
    if len(parts) == 1:
        return parts[0]
    return tuple(
        torch.cat(items) if isinstance(items[0], torch.Tensor) and items[0].dim() > 0 else items[0]
        for items in zip(*parts, strict=True)
    )


def _equalize(prepared: _Prepared, batches, config: QuantConfig) -> None:
    """Cross-layer equalization of the prepared graph (with `batches`: one pass over the data first, for the
    ReLU6 bounds) and the placement redone for the rewritten graph."""
    settings = config.equalize
    bounded = settings.relu6 is Relu6Handling.BOUNDED and relu6_layers(prepared.gm)
    if bounded and batches is None:
        raise ValueError(
            "equalization with Relu6Handling.BOUNDED needs calibration data (the ReLU6 inputs' maxima); pass "
            "calibration_data, or use Equalize(relu6=Relu6Handling.SKIP) with saved encodings"
        )
    channel_max = {}
    if bounded:
        run = lambda gm: run_calibration(gm, batches(), progress=False)  # noqa: E731
        channel_max = record_channel_max(prepared.gm, relu6_layers(prepared.gm), run)
    report = equalize_graph(
        prepared.gm,
        relu6=settings.relu6,
        channel_max=channel_max,
        absorb_high_bias=settings.absorb_high_bias,
        sigmas=settings.sigmas,
        max_rounds=settings.max_rounds,
        tolerance=settings.tolerance,
    )
    prepared.placement = place(prepared.gm, config)
    prepared.notes.append(report.line())


def _smooth(prepared: _Prepared, batches, config: QuantConfig) -> None:
    """Apply SmoothQuant to the prepared graph (one extra pass over the data; one short trial per alpha when
    several are given) and redo the placement for the rescaled graph."""
    targets = smoothing_targets(prepared.gm, prepared.placement)
    absmax = record_channel_absmax(
        prepared.gm, list(targets), lambda gm: run_calibration(gm, batches(), progress=False)
    )
    alphas = config.smooth_quant.alphas
    alpha = (
        alphas[0]
        if len(alphas) == 1
        else min(alphas, key=lambda a: _trial_error(prepared, targets, absmax, a, batches, config))
    )
    apply_smoothing(prepared.gm, targets, absmax, alpha)
    prepared.placement = place(prepared.gm, config)
    prepared.smooth_alpha = alpha


def _trial_error(prepared: _Prepared, targets, absmax, alpha: float, batches, config: QuantConfig) -> float:
    """Relative squared output error of a quick smoothed + quantized trial on the first few batches."""
    subset = list(itertools.islice(batches(), config.smooth_quant.search_batches))
    trial = copy.deepcopy(prepared)
    apply_smoothing(trial.gm, targets, absmax, alpha)
    trial.placement = place(trial.gm, config)
    observers = insert_observers(trial.gm, trial.placement, config.activations)
    run_calibration(trial.gm, subset, progress=False)
    quantized = trial.finish(activation_encodings(observers, trial.placement, config.activations), config)
    error = reference = 0.0
    with torch.no_grad():
        for args in subset:
            want = torch.utils._pytree.tree_leaves(prepared.gm(*args))
            got = torch.utils._pytree.tree_leaves(quantized(*args))
            for w, g in zip(want, got, strict=True):
                error += float((g.float() - w.float()).pow(2).sum())
                reference += float(w.float().pow(2).sum())
    return error / max(reference, 1e-30)


def quantize(
    model: nn.Module,
    calibration_data: Iterable | None = None,
    example_inputs=None,
    *,
    config: QuantConfig | None = None,
    encodings: str | Path | dict | None = None,
    progress: bool = True,
    input_fn: InputFn | None = None,
) -> QuantizedModel:
    """Quantize `model` to int8 (never modifying it).

    calibration_data: an iterable or DataLoader of model inputs (tensor, tuple of tensors, or dict of keyword
        inputs), streamed once; not needed when `encodings` are given.  Batches that do not fit forward() (e.g.
        (inputs, labels) pairs) are refused: pass `input_fn`.
    example_inputs: one input batch used for capture (model inputs); defaults to the first calibration batch.
    encodings: parameters saved by `QuantizedModel.save_encodings` (path or dict) to skip calibration.  Impossible
        values (NaN, zero or negative scales, zero points out of range) or tensor groups that do not match the
        model are refused; encodings saved for other weights are used with a warning.
    input_fn: maps each calibration batch to the model's inputs (a tensor, a tuple of positional inputs or a dict
        of keyword inputs), as NNCF's transform_fn: `input_fn=lambda batch: batch[0]` for (inputs, labels).

    Float inputs in float64/float16/bfloat16 are cast to float32 with a warning; integer image batches (uint8,
    int64) are refused with the conversion to write (eightbit does not guess their scaling).  float16/bfloat16
    models are calibrated and quantized as a float32 copy (a warning and a summary line say so).
    """
    config = config or QuantConfig()
    if encodings is None:
        if calibration_data is None:
            raise ValueError("pass calibration_data (representative inputs) or encodings saved from an earlier run")
        calibration = calibrate(
            model, calibration_data, example_inputs, config=config, progress=progress, input_fn=input_fn
        )
        quantized = calibration._quantize_once()
        warn_if_mostly_float(quantized.macs)
        return quantized
    if example_inputs is None:
        raise ValueError("example_inputs is required when quantizing from saved encodings")
    if config.smooth_quant is not None:
        raise ValueError("saved encodings cannot be reused with smooth_quant (the smoothing needs calibration data)")
    source = saved.read_encodings(encodings)
    prepared = _prepare(model, example_inputs, config)
    if config.equalize is not None:
        _equalize(prepared, None, config)
    insert_observers(prepared.gm, prepared.placement, config.activations)
    act = saved.load_activation_encodings(source, prepared.placement, config.activations, prepared.gm)
    saved.warn_if_other_weights(source, prepared.fingerprint)
    # Searched weight scales cannot be recomputed without data: reuse the saved ones.
    output_aware = lookup_method(config.weights.method).output_aware
    weight_ranges = saved.saved_weight_ranges(source, prepared.placement, prepared.gm) if output_aware else None
    learned = {}
    if config.adaround is not None:  # the learned rounding is in the file: no data needed
        learned = adaround.saved_weights(prepared.gm, prepared.placement, source.get("weights", {}))
        adaround.apply_learned_weights(
            prepared.gm, prepared.placement, learned, act if config.bias_correction else None
        )
        saved_ranges = saved.saved_weight_ranges(source, prepared.placement, prepared.gm)
        weight_ranges = {k: v for k, v in saved_ranges.items() if k in learned}
    quantized = prepared.finish(act, config, weight_ranges)
    for name in learned:
        quantized.weight_encodings[name].rounding = source["weights"][name]["rounding"]
    warn_if_mostly_float(quantized.macs)
    return quantized


def _peek(data: Iterable):
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("calibration_data is empty; pass at least one batch of representative inputs") from None
    rest = data if iterator is not data else itertools.chain([first], iterator)  # re-iterable: start over
    return first, rest


def _batch_size(args: tuple) -> int:
    return next(a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0)


def _rebatch(batches, size: int):
    """Regroup positional batches into batches of exactly `size` samples.  A final partial batch is
    completed by repeating its own samples (min/max are unchanged by repeats)."""
    pending: list[tuple] = []
    for args in batches:
        pending.append(args)
        while sum(_batch_size(a) for a in pending) >= size:
            merged = tuple(
                torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0]
                for parts in zip(*pending, strict=True)
            )
            yield tuple(m[:size] if isinstance(m, torch.Tensor) else m for m in merged)
            rest = tuple(m[size:] if isinstance(m, torch.Tensor) else m for m in merged)
            pending = [rest] if _batch_size(rest) else []
    if pending:
        (rest,) = pending
        n = _batch_size(rest)
        idx = torch.arange(size) % n
        yield tuple(m[idx] if isinstance(m, torch.Tensor) else m for m in rest)
